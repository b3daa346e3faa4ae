"""Score normalisation, threshold calibration, and the collection's copy decisions."""

from __future__ import annotations

import numpy as np
import pytest

from activeindex.calibration import calibration_scores, calibration_set, split_training
from activeindex.collection import Collection
from activeindex.errors import CollectionError
from activeindex.images import load_image
from activeindex.index import Metric
from activeindex.scoring import Background, CalibrationError, CalibrationScores, Normalization, calibrate


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


def test_calibrated_threshold_reaches_the_precision_with_the_best_recall():
    rng = np.random.default_rng(1)
    n = 400
    matching = np.arange(n) < 200
    scores = np.where(matching, rng.normal(0.6, 0.15, n), rng.normal(0.3, 0.15, n)).astype(np.float32)
    correct = matching & (rng.random(n) < 0.9)  # some matching queries find a wrong top-1
    cal = CalibrationScores(scores, correct, matching)
    for target in (0.8, 0.9, 0.99):
        thr = calibrate(cal, target)
        chosen = scores >= thr.threshold
        assert correct[chosen].mean() >= target and thr.precision == pytest.approx(correct[chosen].mean())
        assert thr.recall == pytest.approx(correct[chosen].sum() / matching.sum())
        # Brute force over every candidate threshold: none reaches the target with more recall.
        best = max(
            (correct[scores >= t].sum() for t in scores if correct[scores >= t].mean() >= target), default=0
        )
        assert correct[chosen].sum() == best
    assert calibrate(cal, 0.99).threshold >= calibrate(cal, 0.8).threshold


def test_calibration_fails_loudly_when_no_threshold_reaches_the_precision():
    n = 40
    matching = np.arange(n) < 20
    scores = np.where(matching, 0.1, 0.9).astype(np.float32)  # non-copies score higher: hopeless
    with pytest.raises(CalibrationError, match="no threshold reaches precision"):
        calibrate(CalibrationScores(scores, matching.copy(), matching), 0.9)
    with pytest.raises(CalibrationError, match="no matching"):
        calibrate(CalibrationScores(scores, np.zeros(n, bool), np.zeros(n, bool)), 0.9)


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

    matching = np.arange(60) < 30
    cal = CalibrationScores(np.where(matching, 0.5, 0.1).astype(np.float32), matching.copy(), matching)
    thr = coll.calibrate(cal, 0.9, "test")
    assert thr.threshold == pytest.approx(0.5)
    coll.close()
    with Collection.open(tmp_path / "c") as again:  # threshold, normalisation and scores persist
        assert again.config.threshold == pytest.approx(0.5) and again.background is not None
        rows = again.search(xb[:5], 3)
        assert all(m.copy == (m.score >= 0.5) for row in rows for m in row)
        assert again.calibrate(None, 0.95).method == "test"


def test_calibration_scores_on_real_edits(tmp_path, tiny_extractor, train_vectors, image_dir):
    coll = Collection.create(tmp_path / "c", tiny_extractor, "IVF4,Flat", train_vectors, nprobe=4)
    images = [load_image(p) for p in sorted(image_dir.iterdir())[:40]]
    cal = calibration_scores(coll, calibration_set(tiny_extractor, images, seed=0))
    assert cal.matching.sum() == 20 and not cal.correct[~cal.matching].any()
    # Identity (edit 0) copies of the first references find themselves: the pipeline is wired up.
    assert cal.correct[0] and cal.scores[0] > 0.99
    assert coll.index.ntotal == 0  # calibration worked on a copy of the index


def test_calibrate_without_stored_scores_says_how(tmp_path, tiny_extractor, train_vectors):
    coll = Collection.create(tmp_path / "c", tiny_extractor, "Flat", train_vectors)
    with pytest.raises(CollectionError, match="activeindex calibrate"):
        coll.calibrate(None, 0.9)


def test_calibration_leaves_out_background_images(tmp_path, tiny_extractor, image_dir, caplog):
    from activeindex.calibration import calibrate_from_images
    from activeindex.features import extract_paths

    paths = sorted(image_dir.iterdir())
    xb = extract_paths(paths[:30], tiny_extractor).features
    coll = Collection.create(tmp_path / "c", tiny_extractor, "Flat", xb, background=xb)
    thr = calibrate_from_images(coll, paths, 0.01)  # 30 of the 64 are the background
    assert thr.n_matching + thr.n_nonmatching == 34
    assert "30 of 64 images are in the normalisation background" in caplog.text
