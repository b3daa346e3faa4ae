"""Score normalisation, threshold calibration, and the collection's copy decisions."""

from __future__ import annotations

import numpy as np
import pytest

from activeindex.calibration import (
    EDITS_PER_IMAGE,
    CalibrationSet,
    calibration_edits,
    calibration_scores,
    calibration_set,
    edit_keys,
    split_training,
)
from activeindex.collection import Collection
from activeindex.errors import CollectionError
from activeindex.images import load_image
from activeindex.index import Metric
from activeindex.scoring import (
    Background,
    CalibrationError,
    CalibrationScores,
    CopyTarget,
    Normalization,
    calibrate,
    describe_threshold,
    design_effect,
    threshold_is_stale,
    fpr_upper_bound,
    implied_precision,
)


def unit(rng, n, d=32):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("metric", list(Metric))
@pytest.mark.parametrize("beta,n", [(1.0, 3), (2.0, 10)])
def test_normalisation_subtracts_mean_top_n_background_similarity(metric, beta, n):
    rng = np.random.default_rng(0)
    xb, xq = unit(rng, 200), unit(rng, 7)
    bg = Background(xb, metric, Normalization(beta, n))
    S = rng.normal(size=(7, 5)).astype(np.float32)
    sims = xq @ xb.T  # unit vectors: both metrics' scores are the cosine
    expect = S - beta * np.sort(sims, axis=1)[:, ::-1][:, :n].mean(axis=1, keepdims=True)
    np.testing.assert_allclose(bg.normalize(S, xq), expect, atol=1e-5)


def test_normalisation_rejects_bad_settings():
    with pytest.raises(ValueError):
        Normalization(beta=1.0, n=0)
    with pytest.raises(ValueError, match="fewer than n"):
        Background(unit(np.random.default_rng(0), 2), Metric.L2, Normalization(n=3))


def synthetic_scores(seed: int = 1, n_match: int = 500, n_non: int = 1000) -> CalibrationScores:
    rng = np.random.default_rng(seed)
    n = n_match + n_non
    matching = np.arange(n) < n_match
    scores = np.where(matching, rng.normal(0.6, 0.15, n), rng.normal(0.2, 0.1, n)).astype(np.float32)
    correct = matching & (rng.random(n) < 0.9)  # some matching queries find a wrong top-1
    return CalibrationScores(scores, correct, matching)


def test_fpr_upper_bound_is_clopper_pearson():
    # k = 0 has a closed form: (1 - u)^n = 1 - confidence.
    for n in (10, 299, 1000):
        assert fpr_upper_bound(0, n) == pytest.approx(1 - 0.05 ** (1 / n), rel=1e-9)
    assert fpr_upper_bound(10, 10) == 1.0
    up = fpr_upper_bound(np.arange(6), 500)
    assert (np.diff(up) > 0).all() and (up > np.arange(6) / 500).all()


def test_fpr_calibration_holds_the_bound_with_the_most_recall():
    cal = synthetic_scores()
    non = cal.scores[~cal.matching].astype(np.float64)
    for fpr in (0.005, 0.01, 0.05):
        thr = calibrate(cal, CopyTarget(fpr=fpr))
        flagged = int((non >= thr.threshold).sum())
        assert int((cal.scores[~cal.matching] >= thr.threshold).sum()) == flagged  # float32 compare agrees
        assert thr.bound_met and thr.fpr == flagged / len(non)
        assert thr.fpr_upper == pytest.approx(float(fpr_upper_bound(flagged, len(non)))) and thr.fpr_upper <= fpr
        # One more flagged non-matching query (the next lower threshold) would break the bound.
        assert fpr_upper_bound(flagged + 1, len(non)) > fpr
        right = cal.matching & cal.correct & (cal.scores >= thr.threshold)
        assert thr.recall == pytest.approx(right.sum() / cal.matching.sum())
        assert f"{flagged} of {len(non)} non-matching" in thr.meaning and "unrelated images" in thr.meaning
    assert calibrate(cal, CopyTarget(fpr=0.005)).threshold >= calibrate(cal, CopyTarget(fpr=0.05)).threshold


def test_fpr_calibration_with_too_few_non_matching_queries_says_so(caplog):
    cal = synthetic_scores(n_match=20, n_non=20)
    thr = calibrate(cal, CopyTarget(fpr=0.01))
    assert not thr.bound_met and thr.fpr == 0.0 and thr.threshold > cal.scores[~cal.matching].max()
    assert "cannot show a false-positive rate" in caplog.text and "calibrate with more images" in thr.meaning


def test_precision_calibration_needs_a_prior_and_reaches_it():
    with pytest.raises(CalibrationError, match="--prior"):
        CopyTarget(fpr=None, precision=0.9)
    with pytest.raises(CalibrationError, match="not both"):
        CopyTarget(fpr=0.01, precision=0.9, prior=1.0)
    cal = synthetic_scores()
    for prior in (1.0, 0.2):
        thr = calibrate(cal, CopyTarget(fpr=None, precision=0.8, prior=prior))
        assert thr.precision >= 0.8 and thr.target == "precision"
        assert thr.precision == pytest.approx(implied_precision(thr.recall, thr.wrong, thr.fpr_upper, prior))
        assert f"{prior:g} copies per non-copy" in thr.meaning
    # A rarer copy needs a stricter threshold for the same precision.
    assert (calibrate(cal, CopyTarget(fpr=None, precision=0.8, prior=0.2)).threshold
            >= calibrate(cal, CopyTarget(fpr=None, precision=0.8, prior=1.0)).threshold)


def test_implied_precision_counts_wrong_matches_and_false_positives():
    # 1 copy per 10 non-copies: 0.1 * 0.8 right, 0.1 * 0.1 wrong, 0.01 false positives.
    assert implied_precision(0.8, 0.1, 0.01, 0.1) == pytest.approx(0.08 / (0.09 + 0.01))


def test_calibration_fails_loudly_when_no_threshold_reaches_the_precision():
    n = 40
    matching = np.arange(n) < 20
    scores = np.where(matching, 0.1, 0.9).astype(np.float32)  # non-copies score higher: hopeless
    with pytest.raises(CalibrationError, match="no threshold reaches precision"):
        calibrate(CalibrationScores(scores, matching.copy(), matching), CopyTarget(fpr=None, precision=0.9, prior=1.0))
    with pytest.raises(CalibrationError, match="no matching"):
        calibrate(CalibrationScores(scores, np.zeros(n, bool), np.zeros(n, bool)))


def test_describe_threshold_reads_collections_calibrated_for_a_precision():
    old = {"threshold": 0.12, "precision_target": 0.9, "recall": 0.7, "precision": 0.92,
           "n_matching": 10, "n_nonmatching": 10, "method": "x"}
    assert "recalibrate" in describe_threshold(old) and "does not hold" in describe_threshold(old)
    assert "not flagged" in describe_threshold(None)


def test_split_training_is_disjoint_and_bounded():
    bg, cal = split_training(101, seed=3, max_calibration=30)
    assert len(cal) == 30 and len(bg) == 71 and not set(bg) & set(cal)
    bg, cal = split_training(50, seed=3)
    assert len(cal) == 24 and len(bg) == 26


def test_collection_scores_are_normalised_and_decided_at_the_threshold(tmp_path, tiny_extractor, train_vectors):
    rng = np.random.default_rng(2)
    coll = Collection.create(tmp_path / "c", tiny_extractor, "Flat", train_vectors, background=train_vectors[:100])
    xb = unit(rng, 20)
    coll.add_vectors(xb, [f"r{i}" for i in range(20)], [f"h{i}" for i in range(20)])
    S, I, raw = coll.search_arrays(xb[:5], k=3)
    np.testing.assert_allclose(S, coll.background.normalize(raw, xb[:5]), atol=1e-6)
    assert (I[:, 0] == np.arange(1, 6)).all()
    assert all(m.copy is None for row in coll.search(xb[:5], 3) for m in row)  # not calibrated yet

    matching = np.arange(600) < 300
    cal = CalibrationScores(np.where(matching, 0.5, 0.1).astype(np.float32), matching.copy(), matching)
    thr = coll.calibrate(cal, CopyTarget(fpr=0.01), "test")
    assert 0.1 < thr.threshold <= 0.5 and thr.recall == 1.0 and thr.fpr == 0.0
    coll.close()
    with Collection.open(tmp_path / "c") as again:  # threshold, normalisation and scores persist
        assert again.config.threshold == thr.threshold and again.background is not None
        assert again.info()["copy_decision"] == thr.meaning
        rows = again.search(xb[:5], 3)
        assert all(m.copy == (m.score >= thr.threshold) for row in rows for m in row)
        assert again.calibrate(None, CopyTarget(fpr=0.05)).method == "test"


def test_calibration_scores_on_real_edits(tmp_path, tiny_extractor, train_vectors, image_dir):
    coll = Collection.create(tmp_path / "c", tiny_extractor, "IVF4,Flat", train_vectors, nprobe=4)
    images = [load_image(p) for p in sorted(image_dir.iterdir())[:40]]
    cset = calibration_set(tiny_extractor, images, seed=0, dihedral=False)
    cal = calibration_scores(coll, cset)
    v = EDITS_PER_IMAGE
    assert cset.n_images == 40 and len(cal.scores) == v * 40
    # A quarter are references, each searched for under v edits; the groups say whose edit a query is.
    assert cal.matching.sum() == v * 10 and not cal.correct[~cal.matching].any()
    np.testing.assert_array_equal(cal.groups, np.tile(np.arange(40), v))
    # Identity (edit 0) copies of the first references find themselves: the pipeline is wired up.
    assert cal.correct[0] and cal.scores[0] > 0.99
    assert coll.index.ntotal == 0  # calibration worked on a copy of the index


def test_calibrate_without_stored_scores_says_how(tmp_path, tiny_extractor, train_vectors):
    coll = Collection.create(tmp_path / "c", tiny_extractor, "Flat", train_vectors)
    with pytest.raises(CollectionError, match="activeindex calibrate"):
        coll.calibrate(None)


def test_calibration_leaves_out_background_images(tmp_path, tiny_extractor, image_dir, caplog):
    from activeindex.calibration import calibrate_from_images
    from activeindex.features import extract_paths

    paths = sorted(image_dir.iterdir())
    xb = extract_paths(paths[:30], tiny_extractor).features
    coll = Collection.create(tmp_path / "c", tiny_extractor, "Flat", xb, background=xb)
    thr = calibrate_from_images(coll, paths)  # 30 of the 64 are the background
    assert thr.n_matching + thr.n_nonmatching == 34 * EDITS_PER_IMAGE and thr.n_nonmatching_images == 34 - 8
    assert "30 of 64 images are in the normalisation background" in caplog.text


def test_create_collection_holds_calibration_images_out_of_index_training(tmp_path, tiny_extractor, image_dir,
                                                                         monkeypatch):
    # References drawn from the index's training vectors get better codes than the images a user
    # adds, so the calibration images must stay out of index training.
    from activeindex.calibration import MATCHING_SHARE, create_collection

    seen = {}
    create = Collection.create.__func__

    def spy(cls, root, extractor, factory, xt, **kw):
        seen["xt"], seen["background"] = xt, kw.get("background")
        return create(cls, root, extractor, factory, xt, **kw)

    monkeypatch.setattr(Collection, "create", classmethod(spy))
    paths = sorted(image_dir.iterdir())
    coll, thr = create_collection(tmp_path / "c", tiny_extractor, "Flat", paths)
    bg, cal = split_training(len(paths))
    assert len(seen["xt"]) == len(bg) and np.array_equal(seen["xt"], seen["background"])
    n_match = round(len(cal) * MATCHING_SHARE)
    assert thr.n_matching == EDITS_PER_IMAGE * n_match and thr.n_nonmatching == EDITS_PER_IMAGE * (len(cal) - n_match)
    coll.close()


def test_recalibrate_searches_the_stored_descriptors_against_the_grown_index(tmp_path, tiny_extractor, train_vectors,
                                                                             image_dir):
    from activeindex.calibration import calibrate_from_images, load_calibration_set, recalibrate

    coll = Collection.create(tmp_path / "c", tiny_extractor, "Flat", train_vectors)
    first = calibrate_from_images(coll, sorted(image_dir.iterdir()))
    assert first.n_indexed == 0 and "against 0 indexed images" in first.meaning
    xb = unit(np.random.default_rng(5), 300)
    coll.add_vectors(xb, [f"r{i}" for i in range(300)], [f"h{i}" for i in range(300)])
    again = recalibrate(coll)
    expect = calibrate(calibration_scores(coll, load_calibration_set(coll)))
    assert again.n_indexed == 300 and again.threshold == expect.threshold and again.n_nonmatching == first.n_nonmatching
    assert "against 300 indexed images" in again.meaning and coll.config.threshold == again.threshold
    coll.close()


def test_recalibrate_without_stored_descriptors_says_how(tmp_path, tiny_extractor, train_vectors):
    from activeindex.calibration import recalibrate

    coll = Collection.create(tmp_path / "c", tiny_extractor, "Flat", train_vectors)
    with pytest.raises(CollectionError, match="--images"):
        recalibrate(coll)


def _separable_scores(n: int = 400) -> CalibrationScores:
    rng = np.random.default_rng(0)
    matching = np.arange(n) < n // 2
    scores = np.where(matching, rng.normal(0.8, 0.05, n), rng.normal(0.2, 0.05, n)).astype(np.float32)
    return CalibrationScores(scores, matching.copy(), matching)


def test_a_calibration_goes_stale_as_the_index_grows_and_says_so():
    info = {**calibrate(_separable_scores(), CopyTarget(fpr=0.05)).to_dict(), "n_indexed": 60}
    assert not threshold_is_stale(info, 120) and threshold_is_stale(info, 121)
    assert not threshold_is_stale({**info, "n_indexed": None}, 10**6) and not threshold_is_stale(None, 10**6)
    assert not threshold_is_stale({**info, "n_indexed": 3}, 100)  # small indexes: at least 50 more
    fresh, stale = describe_threshold(info, indexed_now=100), describe_threshold(info, indexed_now=500)
    assert "STALE" not in fresh and fresh == describe_threshold(info)
    assert stale.startswith("STALE: calibrated with 60 images indexed, now 500") and "activeindex calibrate" in stale
    assert stale.endswith(describe_threshold(info))


# -- several edits per calibration image -----------------------------------------------------------
def test_each_calibration_image_gets_different_edits_and_the_first_cycles_as_before():
    n, m, e = 40, 10, len(calibration_edits())
    keys = edit_keys(n, m, 4, e)
    assert keys.shape == (4, n)
    assert all(len(set(keys[:, i])) == 4 for i in range(n))  # one image's edits are all different
    np.testing.assert_array_equal(keys[0], [(i if i < m else i - m) % e for i in range(n)])  # one edit each before
    assert all(np.bincount(row[:m], minlength=e).max() == 1 for row in keys)  # references cycle through the list
    with pytest.raises(ValueError, match="edits per calibration image"):
        edit_keys(n, m, e + 1, e)


def test_design_effect_is_one_for_independent_queries_and_the_group_size_for_copies():
    rng = np.random.default_rng(0)
    t = np.array([0.99, 0.95, 0.8, 0.5])
    s = rng.random(4000)
    np.testing.assert_array_equal(design_effect(s, np.arange(4000), t), 1.0)  # one query per image
    # Four independent draws per image behave as independent queries (the estimate is about 1).
    assert np.all(design_effect(s, np.arange(4000) // 4, t) < 1.15)
    # Four copies of one score: a group is flagged whole or not at all, worth one query, not four.
    np.testing.assert_allclose(design_effect(np.repeat(s[:1000], 4), np.arange(4000) // 4, t), 4.0)
    # Nothing flagged: no dependence can be seen, so a group counts as one query (everything: 1).
    np.testing.assert_array_equal(design_effect(s, np.arange(4000) // 4, np.array([2.0, -1.0])), [4.0, 1.0])


def test_the_bound_with_a_design_effect_is_clopper_pearson_on_the_effective_sample():
    assert fpr_upper_bound(12, 3000, deff=4.0) == pytest.approx(float(fpr_upper_bound(3, 750)), rel=1e-9)
    assert fpr_upper_bound(12, 3000, deff=1.0) == fpr_upper_bound(12, 3000)
    with pytest.raises(ValueError, match="at least 1"):
        fpr_upper_bound(1, 10, deff=0.5)


def _grouped(non: np.ndarray, groups: np.ndarray, n_match: int = 200) -> CalibrationScores:
    scores = np.concatenate([np.full(n_match, 0.9, np.float32), non.astype(np.float32)])
    matching = np.arange(len(scores)) < n_match
    return CalibrationScores(scores, matching.copy(), matching,
                             np.concatenate([np.arange(n_match), n_match + groups]))


def test_edits_of_one_image_tighten_the_bound_only_as_far_as_they_are_independent():
    rng = np.random.default_rng(3)
    one = rng.normal(0.2, 0.1, 800)
    single = calibrate(_grouped(one, np.arange(800)), CopyTarget(fpr=0.01))
    # Four copies of each score: nothing new is learnt, the threshold stays where one edit put it.
    copies = calibrate(_grouped(np.repeat(one, 4), np.arange(3200) // 4), CopyTarget(fpr=0.01))
    assert copies.threshold == pytest.approx(single.threshold) and copies.design_effect == pytest.approx(4.0)
    assert copies.fpr_upper == pytest.approx(single.fpr_upper, rel=1e-6)
    # Counted as independent, the copies would have bought a threshold 4 times as permissive.
    naive = calibrate(_grouped(np.repeat(one, 4), np.arange(3200)), CopyTarget(fpr=0.01))
    assert naive.threshold < single.threshold
    # Four independent draws per image: the bound tightens towards the target (more flagged, less strict).
    four = calibrate(_grouped(rng.normal(0.2, 0.1, 3200), np.arange(3200) // 4), CopyTarget(fpr=0.01))
    assert four.threshold < single.threshold and four.fpr > 1.5 * single.fpr and four.fpr_upper <= 0.01
    assert four.n_nonmatching == 3200 and four.n_nonmatching_images == 800 and four.design_effect < 1.3
    assert "edits of 800 images, counted as dependent" in four.meaning and "of 3200 non-matching" in four.meaning
    assert "counted as dependent" not in single.meaning  # one edit per image: said as before
    # Too few images: with none flagged, 4 edits of each of 80 images count as 80 queries, which
    # cannot show 1 % (320 independent ones would), and the threshold says so.
    few = calibrate(_grouped(np.repeat(one[:80], 4), np.arange(320) // 4), CopyTarget(fpr=0.01))
    assert not few.bound_met and few.fpr == 0.0 and few.fpr_upper == pytest.approx(1 - 0.05 ** (1 / 80))


def test_calibration_scores_and_sets_keep_their_groups_and_read_old_files(tmp_path, tiny_extractor, train_vectors):
    from activeindex.calibration import load_calibration_set, save_calibration_set

    cal = _grouped(np.linspace(0, 0.5, 40), np.arange(40) // 4, n_match=8)
    again = CalibrationScores.from_bytes(cal.to_bytes())
    np.testing.assert_array_equal(again.groups, cal.groups)
    old = CalibrationScores(cal.scores, cal.correct, cal.matching)  # stored before edits were grouped
    assert CalibrationScores.from_bytes(old.to_bytes()).groups is None

    coll = Collection.create(tmp_path / "c", tiny_extractor, "Flat", train_vectors)
    rng = np.random.default_rng(0)
    cset = CalibrationSet(unit(rng, 5), unit(rng, 3 * 20), seed=0, edits_per_image=3)
    save_calibration_set(coll, cset)
    back = load_calibration_set(coll)
    assert back.edits_per_image == 3 and back.n_images == 20
    np.testing.assert_array_equal(calibration_scores(coll, back).groups, np.tile(np.arange(20), 3))
    # A set saved with one edit per image (no edits_per_image stored) reads as one edit each.
    np.savez(coll.root / "calibration_set.npz", refs=cset.refs, queries=cset.queries, seed=np.int64(0))
    assert load_calibration_set(coll).edits_per_image == 1
    with pytest.raises(ValueError, match="per image"):
        CalibrationSet(cset.refs, cset.queries[:-1], seed=0, edits_per_image=3)
    coll.close()
