from __future__ import annotations

import faiss
import numpy as np
import pytest

from activeindex import index as ix
from activeindex.errors import CollectionError, DimensionError

FACTORIES = ["Flat", "IVF16,Flat", "IVF16,PQ8x8", "PQ8x8", "OPQ8,IVF16,PQ8x8", "HNSW16"]


def _data(n=600, d=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("factory", FACTORIES)
@pytest.mark.parametrize("metric", list(ix.Metric))
def test_ids_survive_add_search_and_write(tmp_path, factory, metric):
    xt, xb = _data(600), _data(200, seed=1)
    index = ix.build_index(factory, 32, metric)
    ix.train_index(index, xt)
    ids = np.arange(1000, 1200, dtype=np.int64)
    ix.add_with_ids(index, xb, ids)
    ix.set_nprobe(index, 16)
    ix.write_index_atomic(index, tmp_path / "i.faiss")
    assert not (tmp_path / "i.faiss.tmp").exists()
    loaded = ix.read_index(tmp_path / "i.faiss")
    S, I = ix.search(loaded, xb[:20], 3, metric)
    # Each vector finds itself (compressed codes still rank the exact vector first on this data).
    assert (I[:, 0] == ids[:20]).mean() >= 0.9
    assert (np.diff(S, axis=1) <= 1e-6).all()  # similarities sorted, higher first


def test_l2_scores_are_cosines_for_unit_vectors():
    xb = _data(50)
    index = ix.build_index("Flat", 32, "l2")
    ix.add_with_ids(index, xb, np.arange(50))
    S, I = ix.search(index, xb[:5], 5, "l2")
    cos = np.einsum("qd,qkd->qk", xb[:5], xb[I])
    np.testing.assert_allclose(S, cos, atol=1e-5)


@pytest.mark.parametrize("factory", ["Flat", "IVF16,PQ8x8", "PQ8x8"])
def test_remove_ids(factory):
    index = ix.build_index(factory, 32)
    ix.train_index(index, _data(600))
    xb = _data(100, seed=2)
    ix.add_with_ids(index, xb, np.arange(100))
    assert ix.remove_ids(index, np.array([3, 4, 500])) == 2
    assert index.ntotal == 98
    _, I = ix.search(index, xb[3:5], 10, "l2")
    assert not np.isin(I, [3, 4]).any()


def test_hnsw_cannot_remove_and_says_so():
    index = ix.build_index("HNSW16", 32)
    ix.add_with_ids(index, _data(50), np.arange(50))
    with pytest.raises(CollectionError, match="cannot remove"):
        ix.remove_ids(index, np.array([1]))


def test_ivf_reconstructs_by_id():
    index = ix.build_index("IVF16,PQ8x8", 32)
    ix.train_index(index, _data(600))
    xb = _data(10, seed=3)
    ix.add_with_ids(index, xb, np.arange(500, 510))
    rec = index.reconstruct(505)
    assert np.linalg.norm(rec - xb[5]) < 0.8  # the PQ reconstruction, close to the vector


def test_too_few_training_vectors():
    index = ix.build_index("IVF64,Flat", 32)
    with pytest.raises(CollectionError, match="IVF"):
        ix.train_index(index, _data(20))


def test_bad_factory_and_dimensions():
    with pytest.raises(CollectionError, match="FAISS cannot build"):
        ix.build_index("NotAnIndex", 32)
    index = ix.build_index("Flat", 32)
    with pytest.raises(DimensionError, match=r"expected \(n, 32\)"):
        ix.add_with_ids(index, np.zeros((3, 16), np.float32), np.arange(3))
    with pytest.raises(DimensionError, match="NaN"):
        ix.add_with_ids(index, np.full((1, 32), np.nan, np.float32), np.arange(1))


def test_mmap_read(tmp_path):
    index = ix.build_index("IVF16,Flat", 32)
    ix.train_index(index, _data(600))
    ix.add_with_ids(index, _data(100, seed=4), np.arange(100))
    ix.write_index_atomic(index, tmp_path / "i.faiss")
    mapped = ix.read_index(tmp_path / "i.faiss", mmap=True)
    assert mapped.ntotal == 100 and isinstance(faiss.try_extract_index_ivf(mapped), faiss.IndexIVF)
