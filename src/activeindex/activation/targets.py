"""Where activation pushes a descriptor: the index's own reconstruction of the stored code.

The index keeps the *original* image's code. The default target is that code decoded again —
``sa_decode(sa_encode(x))``, the same vector the index compares queries against (for IVF-PQ: the
IVF centroid plus the decoded PQ residual). The option ``centroid`` targets the centre of the IVF
cell the original falls in.

Which indexes can serve a target: every index with a standalone codec — Flat, PQ, IVF-Flat, IVF-PQ
(also fast-scan), IVF-SQ, any of those behind a pre-transform (OPQ, PCA) — and HNSW through the codec
of its storage. Wrapped in ``IDMap``/``IDMap2`` as collections do. Refused: binary codes (LSH), whose
reconstruction is not a point the search compares against, and anything without a codec.
For exact storage (Flat, IVF-Flat, HNSW-Flat) the reconstruction is the descriptor itself: there is
no quantisation error to undo, and plain activation has nothing to do (robust activation still does).
"""

from __future__ import annotations

import faiss
import numpy as np

from activeindex.errors import ActivationError
from activeindex.settings import TargetKind  # re-exported (defined there: no torch/FAISS needed)

SUPPORTED = "Flat, PQ, IVF-Flat, IVF-PQ (incl. fast-scan), IVF-SQ, OPQ/PCA + any of these, HNSW"


def _codec(index: faiss.Index) -> faiss.Index:
    """The part of ``index`` that encodes vectors: unwrap ID maps and HNSW graphs."""
    index = faiss.downcast_index(index)
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        index = faiss.downcast_index(index.index)
    if isinstance(index, faiss.IndexHNSW):
        index = faiss.downcast_index(index.storage)
    return index


def check_target_support(index: faiss.Index, kind: TargetKind | str = TargetKind.RECONSTRUCTION) -> None:
    """Raise :class:`ActivationError` when ``index`` cannot give a target of ``kind``."""
    kind = TargetKind(kind)
    codec = _codec(index)
    outer = faiss.downcast_index(index)
    if isinstance(outer, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        outer = faiss.downcast_index(outer.index)
    name = type(outer).__name__
    if isinstance(codec, faiss.IndexLSH) or isinstance(codec, faiss.IndexBinary):
        raise ActivationError(
            f"{name} stores binary codes whose reconstruction is not what the search compares; "
            f"activation needs one of: {SUPPORTED}"
        )
    if not codec.is_trained:
        raise ActivationError(f"the index ({name}) is not trained; train it before activating")
    if kind is TargetKind.CENTROID and faiss.try_extract_index_ivf(index) is None:
        raise ActivationError(f"the 'centroid' target needs an IVF index; this one is {name}")
    try:
        probe = np.zeros((1, index.d), dtype=np.float32)
        codec.sa_decode(codec.sa_encode(probe))
    except RuntimeError as exc:
        raise ActivationError(
            f"{name} cannot reconstruct codes (no standalone codec); activation needs one of: {SUPPORTED}"
        ) from exc


def compute_targets(index: faiss.Index, x: np.ndarray, kind: TargetKind | str = TargetKind.RECONSTRUCTION) -> np.ndarray:
    """Targets (n, d) float32 for descriptors ``x`` (n, d) of the originals, unit-normalised (the
    feature loss is a cosine; the direction is what the index compares for normalised queries).
    ``auto`` is resolved for ``index`` (:func:`effective_target`)."""
    kind = TargetKind(kind)
    if kind is TargetKind.AUTO:
        kind = effective_target(index, kind)
    check_target_support(index, kind)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if kind is TargetKind.CENTROID:
        ivf = faiss.try_extract_index_ivf(index)
        chain = []
        pre = _codec(index)
        if isinstance(pre, faiss.IndexPreTransform):
            chain = [faiss.downcast_VectorTransform(pre.chain.at(i)) for i in range(pre.chain.size())]
        xs = x
        for vt in chain:
            xs = vt.apply(xs)
        _, lists = ivf.quantizer.search(xs, 1)
        t = ivf.quantizer.reconstruct_batch(lists[:, 0])
        for vt in reversed(chain):  # a centroid lives in the transformed space; map it back
            t = vt.reverse_transform(t)
    else:
        codec = _codec(index)
        t = codec.sa_decode(codec.sa_encode(x))
    t = np.asarray(t, dtype=np.float32)
    norms = np.linalg.norm(t, axis=1, keepdims=True)
    return t / np.maximum(norms, 1e-12)


def lossless(index: faiss.Index) -> bool:
    """Whether the index stores vectors exactly (Flat, IVF-Flat): then the reconstruction target is
    the original's own descriptor and activating towards it changes nothing."""
    codec = _codec(index)
    probe = np.random.default_rng(0).normal(size=(4, index.d)).astype(np.float32)
    return bool(np.allclose(codec.sa_decode(codec.sa_encode(probe)), probe, atol=1e-5))


def effective_target(index: faiss.Index, kind: TargetKind | str) -> TargetKind:
    """``kind`` as it runs on ``index``: ``auto`` is the centroid on an IVF index and the
    reconstruction elsewhere; a reconstruction target on a lossless IVF index becomes its centroid
    (the only way to push a descriptor deeper into its cell there)."""
    kind = TargetKind(kind)
    if kind is TargetKind.AUTO:
        ivf = faiss.try_extract_index_ivf(index) is not None
        return TargetKind.CENTROID if ivf else TargetKind.RECONSTRUCTION
    if kind is TargetKind.RECONSTRUCTION and faiss.try_extract_index_ivf(index) is not None and lossless(index):
        return TargetKind.CENTROID
    return kind
