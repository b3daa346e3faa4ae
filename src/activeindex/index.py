"""FAISS indexes with ids, built from factory strings — the index language stays FAISS's own.

Conventions (as in faiss.contrib): ``xt`` training vectors, ``xb`` database vectors, ``xq`` queries,
``D, I`` distances/scores and ids of a search, ``d`` the dimension.

Every index returned by :func:`build_index` accepts ``add_with_ids``: IVF indexes natively (with a
hashtable direct map, so codes can be reconstructed by id and removal keeps working), others
wrapped in ``IndexIDMap2``.

Scores are similarities, higher = more similar: the inner product for ``ip``, and ``1 - d²/2`` for
``l2`` — the cosine when descriptors are L2-normalised, so one threshold works for both metrics.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator

import faiss
import numpy as np

from activeindex.atomic import atomic_path
from activeindex.errors import CollectionError, DimensionError
from activeindex.settings import Metric  # re-exported (defined there: no torch/FAISS needed)

logger = logging.getLogger(__name__)


def build_index(factory: str, d: int, metric: Metric | str = Metric.L2) -> faiss.Index:
    """An empty index from a FAISS factory string (e.g. ``"IVF4096,PQ8x8"``) that takes ids."""
    metric = Metric(metric)
    index = _factory(factory, d, metric)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        # A hashtable direct map lets us reconstruct stored codes by id (the activation target)
        # and still remove ids, which an array direct map forbids.
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        return index
    if isinstance(faiss.downcast_index(index), (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return index
    # Built through the factory so that the IDMap2 owns its sub-index (wrapping a Python-side
    # index would leave it to the garbage collector).
    return _factory("IDMap2," + factory, d, metric)


FACTORY_HINT = (
    "a FAISS factory string is components separated by commas, without spaces, the coarse "
    "quantiser first, e.g. Flat, IVF256,Flat, IVF256,PQ8x8, OPQ8,IVF256,PQ8, HNSW32 or LSH (case matters)"
)


def _factory(factory: str, d: int, metric: Metric) -> faiss.Index:
    try:
        return faiss.index_factory(d, factory, metric.faiss_metric)
    except RuntimeError as exc:
        msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
        # FAISS's text starts with the C++ function and source line: of no use to the user.
        msg = re.sub(r"^Error in .*? at \S+:\d+: (Error: '.*?' failed: )?", "", msg)
        hint = f"; {FACTORY_HINT}" if "parse" in msg else ""
        if re.search(r"[\s;]", factory):
            guess = re.sub(r"[\s;,]+", ",", factory.strip(" ;"))
            hint = f"; separate the components with commas, without spaces ({guess!r}?){hint}"
        raise CollectionError(f"FAISS cannot build index {factory!r} for d={d}: {msg}{hint}") from exc


def train_index(index: faiss.Index, xt: np.ndarray) -> None:
    """Train on ``xt`` (n, d) float32, with a clear error when there are too few vectors."""
    xt = as_float32_matrix(xt, index.d, "training vectors")
    if index.is_trained:
        return
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and len(xt) < ivf.nlist:
        raise CollectionError(
            f"{len(xt)} training vectors cannot train {ivf.nlist} IVF cells; give at least "
            f"{ivf.nlist} (FAISS advises {39 * ivf.nlist}) or use fewer cells, e.g. "
            f"IVF{max(1, len(xt) // 39)}"
        )
    try:
        with _collapse_native_warnings():
            index.train(xt)
    except RuntimeError as exc:
        lines = [ln for ln in str(exc).splitlines() if ln.strip()]
        raise CollectionError(
            f"training the index on {len(xt)} vectors failed: {lines[-1] if lines else exc}; "
            "give more training images or a smaller index"
        ) from exc


@contextlib.contextmanager
def _collapse_native_warnings() -> Iterator[None]:
    """FAISS's C++ k-means prints one "please provide at least N training points" line per
    sub-quantizer on fd 2; capture them and log each distinct message once."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as cap:
        os.dup2(cap.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            cap.seek(0)
            lines = cap.read().decode(errors="replace").splitlines()
    for line in dict.fromkeys(ln.strip() for ln in lines if ln.strip()):
        logger.warning("faiss: %s", line.removeprefix("WARNING "))


def as_float32_matrix(x: np.ndarray, d: int, what: str = "vectors") -> np.ndarray:
    """Validate (n, d) and return a C-contiguous float32 array."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != d:
        raise DimensionError(f"{what} have shape {x.shape}; expected (n, {d})")
    if x.dtype.kind != "f":  # (np.issubdtype costs microseconds: this runs on every search)
        raise DimensionError(f"{what} have dtype {x.dtype}; expected floating point")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise DimensionError(f"{what} contain NaN or infinite values")
    return x


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = int(nprobe)


def add_with_ids(index: faiss.Index, xb: np.ndarray, ids: np.ndarray) -> None:
    xb = as_float32_matrix(xb, index.d, "database vectors")
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if len(ids) != len(xb):
        raise ValueError(f"{len(xb)} vectors but {len(ids)} ids")
    index.add_with_ids(xb, ids)


def search(index: faiss.Index, xq: np.ndarray, k: int, metric: Metric | str) -> tuple[np.ndarray, np.ndarray]:
    """k-NN search → (S, I): similarities (nq, k) float32 (higher = closer) and ids (-1 = none)."""
    xq = as_float32_matrix(xq, index.d, "query vectors")
    D, I = index.search(xq, int(k))
    S = 1.0 - D / 2.0 if Metric(metric) is Metric.L2 else D
    return S.astype(np.float32), I


def remove_ids(index: faiss.Index, ids: np.ndarray) -> int:
    """Remove ids; returns how many were removed. Raises for index types that cannot remove."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    # IVF's hashtable direct map only accepts an explicit id array; elsewhere a hashed batch
    # selector keeps removal O(ntotal) instead of O(ntotal × len(ids)).
    if faiss.try_extract_index_ivf(index) is not None:
        sel = faiss.IDSelectorArray(len(ids), faiss.swig_ptr(ids))
    else:
        sel = faiss.IDSelectorBatch(ids)
    try:
        return int(index.remove_ids(sel))
    except RuntimeError as exc:
        raise CollectionError(f"this index type cannot remove vectors: {exc}") from exc


def write_index_atomic(index: faiss.Index, path: str | os.PathLike[str]) -> None:
    """Write to a unique temporary file, fsync, then ``os.replace``: a crash leaves the old or the
    new file (see :mod:`activeindex.atomic`)."""
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def read_index(path: str | os.PathLike[str], *, mmap: bool = False) -> faiss.Index:
    """Read an index; ``mmap`` maps the file instead of loading it (read-only use).

    A mapped index's pages are loaded on demand and shared, through the page cache, by every process
    that maps the same file (service replicas). It must never be written to: FAISS aborts the process
    on an add to mapped codes, so callers refuse writes (``Collection.read_only``).
    """
    flags = 0
    if mmap:
        # IO_FLAG_MMAP_IFC (faiss >= 1.10) maps every code array (IVF lists, flat/PQ codes, HNSW
        # storage) as views of the file; the older IO_FLAG_MMAP maps only IVF inverted lists.
        flags = getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP) | faiss.IO_FLAG_READ_ONLY
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as exc:
        raise CollectionError(f"cannot read FAISS index {path}: {exc}") from exc


def stored_ids(index: faiss.Index) -> np.ndarray:
    """The ids of every vector the index holds (int64, one per vector: an id added twice appears
    twice), in storage order. O(ntotal); used to cross-check an index against a database.

    IVF indexes give their inverted lists' ids, id-map wrappers their map; any other index stores
    vectors by position, so its ids are ``0..ntotal-1``.
    """
    idx = faiss.downcast_index(index)
    if isinstance(idx, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return faiss.vector_to_array(idx.id_map).astype(np.int64)
    ivf = faiss.try_extract_index_ivf(idx)
    if ivf is not None and ivf.ntotal == index.ntotal:
        invlists = ivf.invlists
        parts = []
        for lst in range(ivf.nlist):
            n = invlists.list_size(lst)
            if n:
                ptr = invlists.get_ids(lst)
                parts.append(faiss.rev_swig_ptr(ptr, n).astype(np.int64).copy())
                invlists.release_ids(lst, ptr)
        return np.concatenate(parts) if parts else np.empty(0, np.int64)
    return np.arange(index.ntotal, dtype=np.int64)
