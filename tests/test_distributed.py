"""The Ray backend (same collection as in-process, retries without duplicates), FAISS shard merging,
memory-mapped read-only collections, and a default path that never imports Ray."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from activeindex import index as ix
from activeindex.activation import ActivationConfig
from activeindex.activation.add import add_activated
from activeindex.cli import app
from activeindex.collection import Collection
from activeindex.distributed import shards as sh
from activeindex.distributed.worker import CRASH_ENV
from activeindex.errors import CollectionError
from helpers import assert_released_files_found_first

N_IMAGES = 16


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray with 2 CPUs for the whole module (start-up costs seconds)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture()
def paths(image_dir) -> list[Path]:
    return sorted(image_dir.glob("*.png"))[:N_IMAGES]


def _collection(root: Path, extractor, xt, factory: str = "IVF16,PQ4x4") -> Collection:
    """A collection as the CLI sees it: created, closed, opened again from its files."""
    Collection.create(root, extractor, factory, xt).close()
    return Collection.open(root, extractor=extractor)


def _rows(coll: Collection) -> list[tuple]:
    return coll.db.execute(
        "SELECT id, name, path, sha256, mode, status, released IS NOT NULL FROM images ORDER BY id"
    ).fetchall()


def _codes(coll: Collection, ids: list[int]) -> np.ndarray:
    """What the index stores for each id (decoded codes: equal codes give equal vectors)."""
    return np.stack([coll.index.reconstruct(int(i)) for i in ids])


def _same_collection(a: Collection, b: Collection) -> None:
    assert _rows(a) == _rows(b)
    ids = [r[0] for r in _rows(a)]
    assert a.index.ntotal == b.index.ntotal == len(ids)
    np.testing.assert_array_equal(_codes(a, ids), _codes(b, ids))


# -- FAISS side, no Ray ------------------------------------------------------------------------
@pytest.mark.parametrize("factory", ["IVF16,PQ4x4", "IVF16,Flat", "PQ4x4", "OPQ4,IVF16,PQ4x4"])
def test_merged_shards_equal_one_add(factory, train_vectors):
    xb = train_vectors[:90] + 0.01
    ids = np.arange(1000, 1090)
    whole = ix.build_index(factory, train_vectors.shape[1])
    ix.train_index(whole, train_vectors)
    template = sh.deserialize(sh.serialize(sh.empty_copy(whole)))
    merged = sh.deserialize(sh.serialize(whole))  # as read from disk
    assert sh.can_merge(merged, template)
    parts = []
    for s in range(0, 90, 30):
        part = faiss.clone_index(template)
        ix.add_with_ids(part, xb[s : s + 30], ids[s : s + 30])
        parts.append(sh.deserialize(sh.serialize(part)))
    ix.add_with_ids(whole, xb, ids)
    assert sh.merge_shards(merged, parts) == 90
    np.testing.assert_array_equal(
        np.stack([merged.reconstruct(int(i)) for i in ids]), np.stack([whole.reconstruct(int(i)) for i in ids])
    )
    ivf = faiss.try_extract_index_ivf(merged)
    if ivf is not None:  # the hashtable direct map is back (reconstruct by id above needs it)
        assert ivf.direct_map.type == faiss.DirectMap.Hashtable
    assert ix.remove_ids(merged, ids[:5]) == 5


def test_indexes_that_cannot_merge_are_detected(train_vectors):
    hnsw = ix.build_index("HNSW8", train_vectors.shape[1])
    assert not sh.can_merge(hnsw, sh.deserialize(sh.serialize(sh.empty_copy(hnsw))))


# -- memory-mapped, read-only collections ------------------------------------------------------
def test_mmap_collection_searches_alike_and_refuses_writes(tmp_path, tiny_extractor, train_vectors):
    for factory in ("IVF16,PQ4x4", "PQ4x4", "Flat"):
        root = tmp_path / factory.replace(",", "_")
        with Collection.create(root, tiny_extractor, factory, train_vectors) as c:
            c.add_vectors(train_vectors[:50], [f"n{i}" for i in range(50)], [f"h{i}" for i in range(50)])
        with Collection.open(root) as loaded, Collection.open(root, mmap=True) as mapped:
            assert mapped.read_only and not loaded.read_only
            S1, I1, _ = loaded.search_arrays(train_vectors[:10], 5)
            S2, I2, _ = mapped.search_arrays(train_vectors[:10], 5)
            np.testing.assert_array_equal(I1, I2)
            with pytest.raises(CollectionError, match="read-only"):
                mapped.add_vectors(train_vectors[:1], ["x"], ["hx"])
            with pytest.raises(CollectionError, match="read-only"):
                mapped.remove([1])
            assert mapped.count() == 50


def test_query_mmap_cli(tmp_path, tiny_extractor, train_vectors, paths):
    root = tmp_path / "c"
    Collection.create(root, tiny_extractor, "IVF16,PQ4x4", train_vectors).close()
    runner = CliRunner()
    assert runner.invoke(app, ["add", str(root), *map(str, paths[:4])]).exit_code == 0
    res = runner.invoke(app, ["query", str(root), str(paths[0]), "--mmap", "-k", "1"])
    assert res.exit_code == 0, res.output
    assert paths[0].name in res.stdout


def test_reserved_rows_of_an_unfinished_add_are_rolled_back(tmp_path, tiny_extractor, train_vectors):
    root = tmp_path / "c"
    with _collection(root, tiny_extractor, train_vectors) as c:
        with pytest.raises(CollectionError, match="writing"):
            c.reserve_ids(["a"], ["ha"])
        with c.writing():
            ids = c.reserve_ids(["a", "b"], ["ha", "hb"])
        assert c.count() == 0  # pending rows are invisible
    with Collection.open(root) as c:  # the driver "died": the next open rolls the rows back
        assert c.db.execute("SELECT COUNT(*) FROM images").fetchone()[0] == 0
        with c.writing():
            again = c.reserve_ids(["a"], ["ha"])
            ix.add_with_ids(c.index, train_vectors[:1], np.array(again))
            c.complete_add(again)
        assert again[0] > max(ids) and c.count() == 1  # ids are never reused


# -- Ray ---------------------------------------------------------------------------------------
def test_extract_on_ray_equals_in_process(ray_local, tiny_extractor, paths, tmp_path):
    from activeindex.distributed import RayOptions, RunStats, extract_paths_ray
    from activeindex.features import extract_paths

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    inputs = [*paths[:7], broken, *paths[7:]]
    ref = extract_paths(inputs, tiny_extractor)
    stats = RunStats()
    got = extract_paths_ray(inputs, tiny_extractor, options=RayOptions(shard_size=6), stats=stats)
    assert got.paths == ref.paths
    np.testing.assert_allclose(got.features, ref.features, atol=1e-5)
    assert [(f.path, f.reason) for f in got.failures] == [(f.path, f.reason) for f in ref.failures]
    assert stats.shards == -(-len(inputs) // 6) and stats.worker_threads == {1}


@pytest.mark.parametrize("factory", ["IVF16,PQ4x4", "PQ4x4"])
def test_add_on_ray_gives_the_same_collection(ray_local, tmp_path, tiny_extractor, train_vectors, paths, factory):
    from activeindex.distributed import RayOptions, RunStats, add_images_ray

    with _collection(tmp_path / "a", tiny_extractor, train_vectors, factory) as a, \
            _collection(tmp_path / "b", tiny_extractor, train_vectors, factory) as b:
        ref = a.add_images([*paths, paths[0]])  # a repeat of a file is reported, not added twice
        stats = RunStats()
        got = add_images_ray(b, [*paths, paths[0]], options=RayOptions(shard_size=6), stats=stats)
        assert got.added == ref.added and got.duplicates == ref.duplicates
        assert stats.merged and stats.shards == -(-N_IMAGES // 6)
        _same_collection(a, b)
    with Collection.open(tmp_path / "b") as b:  # what was written is what was merged
        assert b.index.ntotal == N_IMAGES and b.count() == N_IMAGES


def test_add_activated_on_ray_gives_the_same_collection(ray_local, tmp_path, tiny_extractor, train_vectors, paths):
    from activeindex.distributed import RayOptions, add_activated_ray

    config = ActivationConfig(iterations=2, precision="fp32")
    with _collection(tmp_path / "a", tiny_extractor, train_vectors) as a, \
            _collection(tmp_path / "b", tiny_extractor, train_vectors) as b:
        ref = add_activated(a, paths, tmp_path / "ra", config, batch_size=4)
        got = add_activated_ray(b, paths, tmp_path / "rb", config, batch_size=4, options=RayOptions(shard_size=8))
        assert got.added == ref.added
        _same_collection(a, b)
        for r, g in zip(ref.released, got.released):
            assert Path(r.released).name == Path(g.released).name
            assert g.psnr >= config.psnr and b.record(g.id)["psnr"] == pytest.approx(g.psnr)
            if r.fix == g.fix == "none":  # the same optimisation (a fix depends on what each check saw)
                assert abs(g.psnr - r.psnr) < 0.5
        # Both checked every file against the finished collection (workers saw only their batches).
        assert_released_files_found_first(a, ref, paths)
        assert_released_files_found_first(b, got, paths)
    assert sorted(p.name for p in (tmp_path / "rb").iterdir()) == sorted(p.name for p in (tmp_path / "ra").iterdir())


def test_the_driver_rechecks_the_workers_files(ray_local, tmp_path, tiny_extractor, train_vectors, paths, monkeypatch):
    """Workers check their files against their batch only; the driver checks them all once every
    code is stored, and releases again (here: unchanged, the check is forced to fail) those that lost."""
    import activeindex.activation.add as add_mod
    from activeindex.distributed import RayOptions, add_activated_ray

    def fake(index, x, y, mates=True, own_ids=None):  # in the driver only: the workers run the real check
        return np.ones(len(x), bool) if y is x else np.zeros(len(x), bool)

    monkeypatch.setattr(add_mod, "own_code_first", fake)
    config = ActivationConfig(iterations=1, precision="fp32")
    with _collection(tmp_path / "b", tiny_extractor, train_vectors) as b:
        got = add_activated_ray(b, paths[:8], tmp_path / "rb", config, batch_size=4, options=RayOptions(shard_size=4))
        assert got.fixes() == {"margin": 0, "original": 8}
        for r in got.released:
            assert r.psnr == 100.0 and b.record(r.id)["psnr"] == 100.0
            source = next(p for p in paths if p.name == r.name)
            np.testing.assert_array_equal(np.asarray(Image.open(r.released).convert("RGB")),
                                          np.asarray(Image.open(source).convert("RGB")))


def test_a_worker_killed_mid_shard_is_retried_without_duplicates(
    ray_local, tmp_path, tiny_extractor, train_vectors, paths, monkeypatch
):
    from activeindex.distributed import RayOptions, RunStats, add_activated_ray

    marker = tmp_path / "crashed"
    monkeypatch.setenv(CRASH_ENV, f"1:{marker}")  # the worker of shard 1 dies after its first batch
    config = ActivationConfig(iterations=1, precision="fp32")
    out = tmp_path / "out"
    with _collection(tmp_path / "a", tiny_extractor, train_vectors) as a, \
            _collection(tmp_path / "b", tiny_extractor, train_vectors) as b:
        ref = add_activated(a, paths, tmp_path / "ra", config, batch_size=4)
        stats = RunStats()
        got = add_activated_ray(b, paths, out, config, batch_size=4, options=RayOptions(shard_size=8), stats=stats)
        assert marker.exists()  # the first attempt did die
        assert got.added == ref.added and len(got.released) == N_IMAGES
        _same_collection(a, b)
    assert len(list(out.iterdir())) == N_IMAGES  # one released file per image, no leftovers
    with Collection.open(tmp_path / "b") as b:
        ids = [i for i, _ in got.added]
        assert b.index.ntotal == N_IMAGES and sorted(ids) == sorted(set(ids))


def test_cli_workers_flag(ray_local, tmp_path, tiny_extractor, train_vectors, paths):
    root = tmp_path / "c"
    Collection.create(root, tiny_extractor, "IVF16,PQ4x4", train_vectors).close()
    res = CliRunner().invoke(app, ["add", str(root), *map(str, paths[:8]), "--workers", "2", "--shard-size", "3"])
    assert res.exit_code == 0, res.output
    with Collection.open(root) as c:
        assert c.count() == 8 and c.index.ntotal == 8


def test_read_only_collection_refuses_a_ray_add(tmp_path, tiny_extractor, train_vectors, paths):
    from activeindex.distributed import add_images_ray

    root = tmp_path / "c"
    Collection.create(root, tiny_extractor, "IVF16,PQ4x4", train_vectors).close()
    with Collection.open(root, mmap=True) as c, pytest.raises(CollectionError, match="read-only"):
        add_images_ray(c, paths[:2])


# -- the default path ----------------------------------------------------------------------------
def test_default_path_does_not_import_ray(tmp_path, image_dir, train_vectors):
    np.save(tmp_path / "xt.npy", train_vectors)
    code = f"""
import sys
from typer.testing import CliRunner
from activeindex.cli import app
import activeindex.distributed  # importing the backend does not import Ray either
r = CliRunner()
for args in (["create", "{tmp_path}/c", "--model", "builtin:tiny", "--index", "IVF16,PQ4x4", "--train", "{tmp_path}/xt.npy"],
             ["add", "{tmp_path}/c", "{image_dir}"],
             ["extract", "{image_dir}", "-o", "{tmp_path}/f", "--model", "builtin:tiny"],
             ["query", "{tmp_path}/c", "{image_dir}", "-k", "1"]):
    res = r.invoke(app, args)
    assert res.exit_code == 0, (args, res.output)
assert "ray" not in sys.modules, "the default path imported ray"
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_a_shard_whose_retries_run_out_fails_clearly_and_a_rerun_completes(
    ray_local, tmp_path, tiny_extractor, train_vectors, paths, monkeypatch
):
    from activeindex.distributed import RayOptions, add_images_ray
    from activeindex.errors import ActiveIndexError

    monkeypatch.setenv(CRASH_ENV, f"1:{tmp_path / 'crashed'}")
    root = tmp_path / "c"
    with _collection(root, tiny_extractor, train_vectors) as c:
        with pytest.raises(ActiveIndexError, match="shard 1 failed after 0 retries"):
            add_images_ray(c, paths, options=RayOptions(shard_size=6, max_retries=0))
    monkeypatch.delenv(CRASH_ENV)
    with Collection.open(root) as c:  # the round's pending rows were rolled back on open
        assert c.db.execute("SELECT COUNT(*) FROM images").fetchone()[0] == 0 and c.index.ntotal == 0
        report = add_images_ray(c, paths, options=RayOptions(shard_size=6))
        assert len(report.added) == N_IMAGES and c.index.ntotal == N_IMAGES
