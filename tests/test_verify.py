"""The rank-1 check of released files (activation/verify.py) and what release_batch does with it."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from PIL import Image

import activeindex.activation.add as add_mod
from activeindex.activation import ActivationConfig
from activeindex.activation.add import Fix, release_batch
from activeindex.activation.verify import own_code_first
from activeindex.collection import Collection
from activeindex.index import build_index, train_index
from helpers import assert_released_files_found_first


def _unit(rng, n, d=32):
    v = rng.normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _trained(factory, rng, metric="l2", nprobe=None):
    index = build_index(factory, 32, metric)
    train_index(index, _unit(rng, 2000))
    if nprobe is not None:
        faiss.extract_index_ivf(index).nprobe = nprobe
    return index


@pytest.mark.parametrize("factory, metric, nprobe", [
    ("IVF8,PQ8x4", "l2", 8), ("PCA16,IVF8,PQ8x4", "l2", 8), ("PQ8x8", "l2", None), ("IVF8,Flat", "l2", 8),
    ("IVF4,PQ8x8", "ip", 4),
])
def test_originals_are_found_first_and_neighbours_are_not(factory, metric, nprobe):
    rng = np.random.default_rng(0)
    index = _trained(factory, rng, metric, nprobe)  # every cell visited: only the codes decide
    x = _unit(rng, 40)
    index.add_with_ids(x, np.arange(40, dtype=np.int64))
    # Stored, queried with themselves: found first, except where two codes of the batch collide.
    assert own_code_first(index, x, x).mean() > 0.9
    # Queried with another image's descriptor: that image's code wins.
    assert not own_code_first(index, x, np.roll(x, 1, axis=0)).any()


@pytest.mark.parametrize("pass_ids", [False, True])
@pytest.mark.parametrize("rival_gap", [-2e-5, 2e-5])
def test_a_stored_rival_at_almost_the_own_distance_is_not_taken_for_the_own_code(pass_ids, rival_gap):
    """A near-duplicate stored before the own code, nearer to the query by less than the tolerance
    that recognises the own code by its distance: it is a rival, not the own code seen twice (a
    released real photo was passed as found first that way, with the rival ranked first)."""
    def at(dist: float, axis: int) -> np.ndarray:  # a unit vector at squared distance dist from e0
        cos = 1.0 - dist / 2.0
        v = np.zeros(8, np.float64)
        v[0], v[axis] = cos, np.sqrt(1.0 - cos * cos)
        return v.astype(np.float32)

    index = build_index("Flat", 8, "l2")
    y = at(0.0, 1)[None]  # the query: e0
    own, rival = at(0.09, 1)[None], at(0.09 + rival_gap, 2)[None]
    index.add_with_ids(np.concatenate([rival, own]), np.array([7, 3], dtype=np.int64))
    got = own_code_first(index, own, y, own_ids=np.array([3]) if pass_ids else None)
    assert bool(got[0]) == (rival_gap > 0)


def test_batch_mates_compete_before_they_are_stored():
    """add stores a batch's codes only after releasing it: the other originals still count."""
    rng = np.random.default_rng(1)
    index = _trained("IVF4,PQ8x8", rng, nprobe=4)
    x = _unit(rng, 6)
    assert own_code_first(index, x, x).all()  # empty index, distinct originals
    y = x.copy()
    y[0] = x[3]  # image 0's released file looks like image 3
    got = own_code_first(index, x, y)
    assert not got[0] and got[1:].all()


def test_an_unvisited_own_cell_is_a_miss():
    rng = np.random.default_rng(2)
    index = _trained("IVF16,Flat", rng, nprobe=1)
    ivf = faiss.extract_index_ivf(index)
    x = _unit(rng, 1)
    _, order = ivf.quantizer.search(x, 2)
    other_cell = ivf.quantizer.reconstruct(int(order[0, 1]))[None]
    y = other_cell / np.linalg.norm(other_cell)  # the next cell's centre: visited instead of the own one
    assert not own_code_first(index, x, y)[0]
    ivf.nprobe = 16  # now every cell is visited, and no other code is stored
    assert own_code_first(index, x, y)[0]


# -- release_batch's repair ------------------------------------------------------------------------
@pytest.fixture()
def stored(tmp_path, tiny_extractor, train_vectors, image_dir):
    coll = Collection.create(tmp_path / "c", tiny_extractor, "IVF4,PQ4x4", train_vectors, nprobe=1)
    paths = sorted(image_dir.glob("*.png"))[:4]
    coll.add_images(paths)
    yield coll, [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    coll.close()


def test_release_batch_describes_the_written_files(stored):
    coll, images = stored
    rb = release_batch(coll.extractor, coll.index, images, ActivationConfig(iterations=3, precision="fp32"))
    written = add_mod.describe_arrays(coll.extractor, [f.pixels for f in rb.files])
    targets = add_mod.compute_targets(coll.index, rb.features)
    np.testing.assert_allclose(rb.cos_after, np.einsum("nd,nd->n", written, targets), atol=1e-6)
    assert (rb.cos_after > rb.cos_before).mean() >= 0.5


def test_evaluate_release_names_the_stored_own_codes_by_id(stored, monkeypatch):
    """evaluate stores the originals before releasing them: its check leaves each own code out of
    the rivals by its id, batch by batch, not by its distance."""
    from activeindex.evaluation import protocol

    coll, images = stored
    ids = coll.first_ids(len(images))
    seen: list[list[int]] = []

    def spy(index, x, y, mates=True, own_ids=None):
        seen.append(None if own_ids is None else own_ids.tolist())
        return own_code_first(index, x, y, mates=mates, own_ids=own_ids)

    monkeypatch.setattr(add_mod, "own_code_first", spy)
    settings = protocol.EvalSettings(batch_size=2, activation={"iterations": 1})
    released, stats = protocol.release(coll, images, ids, protocol.Method.PLAIN, settings)
    assert len(released) == len(images) and stats["fixes"]["none"] + stats["fixes"]["margin"] >= 1
    assert seen and all(s in (ids[:2], ids[2:]) for s in seen)
    assert {tuple(s) for s in seen} == {tuple(ids[:2]), tuple(ids[2:])}


def test_a_file_that_loses_rank_one_is_activated_again_then_released_unchanged(stored, monkeypatch):
    """Image 0 'loses' rank 1 after each activation (the check is forced), image 1 only after the
    first: 0 ends released unchanged, 1 activated again with the competitor term."""
    coll, images = stored
    calls: list[int] = []
    configs: list[ActivationConfig] = []

    def fake(index, x, y, mates=True, own_ids=None):
        if y is x:
            return np.ones(len(x), bool)  # passive: all found first
        calls.append(1)
        got = np.ones(len(x), bool)
        got[0] = len(calls) >= 3  # only the unchanged original is found
        got[1] = len(calls) >= 2
        return got

    optimise = add_mod._optimise

    def spy(ex, index, originals, x, targets, config):
        configs.append(config)
        return optimise(ex, index, originals, x, targets, config)

    monkeypatch.setattr(add_mod, "own_code_first", fake)
    monkeypatch.setattr(add_mod, "_optimise", spy)
    rb = release_batch(coll.extractor, coll.index, images, ActivationConfig(iterations=2, precision="fp32"))
    assert rb.fixes == [Fix.ORIGINAL, Fix.MARGIN, Fix.NONE, Fix.NONE]
    np.testing.assert_array_equal(rb.files[0].pixels, images[0])  # unchanged, said so
    assert rb.files[0].psnr == 100.0
    assert not np.array_equal(rb.files[1].pixels, images[1])
    assert configs[0].margin_weight == 0.0
    assert configs[1].margin_weight == add_mod.REPAIR_MARGIN["margin_weight"]
    assert len(configs[1:]) == 1 and configs[1].margin == add_mod.REPAIR_MARGIN["margin"]


def test_add_activate_reports_the_fixes(stored, tmp_path, monkeypatch, image_dir):
    coll, _ = stored
    monkeypatch.setattr(add_mod, "own_code_first",
                        lambda index, x, y, mates=True, own_ids=None: np.ones(len(x), bool) if y is x else np.zeros(len(x), bool))
    paths = sorted(image_dir.glob("*.png"))[4:6]
    report = add_mod.add_activated(coll, paths, tmp_path / "out", ActivationConfig(iterations=2, precision="fp32"))
    assert report.fixes() == {"margin": 0, "original": 2}
    assert all(r.fix == "original" and r.psnr == 100.0 for r in report.released)


def test_files_outranked_by_later_batches_are_activated_again(stored, tmp_path, monkeypatch, image_dir):
    """release_batch checks a file against the codes stored before it; once the run's last batch is
    stored, every earlier file is checked again, and one that lost rank 1 is activated again with
    the competitor term or, failing that, released unchanged, its record updated."""
    coll, _ = stored
    paths = sorted(image_dir.glob("*.png"))[4:10]
    final = coll.index.ntotal + len(paths)
    rechecked: list[int] = []  # the ids the recheck's second activation names as the own codes

    def fake(index, x, y, mates=True, own_ids=None):
        if index.ntotal == final and own_ids is not None:
            rechecked.extend(own_ids.tolist())
        if y is x:
            return np.ones(len(x), bool)
        return np.full(len(x), index.ntotal < final)  # every file is outranked once all are stored

    monkeypatch.setattr(add_mod, "own_code_first", fake)
    report = add_mod.add_activated(coll, paths, tmp_path / "out", ActivationConfig(iterations=2, precision="fp32"),
                                   batch_size=2)
    assert len(report.released) == 6
    last = {r.name for r in report.released[-2:]}  # the last batch was checked against every code
    for r in report.released:
        if r.name in last:
            assert r.fix == "none" and r.psnr < 100.0
        else:
            assert r.fix == "original" and r.psnr == 100.0 and coll.record(r.id)["psnr"] == 100.0
            source = next(p for p in paths if p.name == r.name)
            np.testing.assert_array_equal(np.asarray(Image.open(r.released).convert("RGB")),
                                          np.asarray(Image.open(source).convert("RGB")))
    assert report.fixes() == {"margin": 0, "original": 4}
    assert set(rechecked) == {r.id for r in report.released if r.name not in last}


def test_the_recheck_keeps_files_that_are_still_first(stored, tmp_path, image_dir):
    """No fake: a real run of three batches; whatever the recheck did, every file whose original is
    found first in the finished collection is found first too, and its record says its quality."""
    coll, _ = stored
    paths = sorted(image_dir.glob("*.png"))[4:10]
    report = add_mod.add_activated(coll, paths, tmp_path / "out", ActivationConfig(iterations=2, precision="fp32"),
                                   batch_size=2)
    assert_released_files_found_first(coll, report, paths)
    for r in report.released:
        assert coll.record(r.id)["psnr"] == pytest.approx(r.psnr)


def test_mates_false_ignores_the_batch_mates():
    rng = np.random.default_rng(1)
    index = _trained("IVF4,PQ8x8", rng, nprobe=4)
    x = _unit(rng, 6)
    y = x.copy()
    y[0] = x[3]
    assert not own_code_first(index, x, y)[0]
    assert own_code_first(index, x, y, mates=False).all()  # nothing stored: no rival at all
    index.add_with_ids(x, np.arange(6, dtype=np.int64))
    assert not own_code_first(index, x, y, mates=False)[0]  # stored, image 3's code wins
