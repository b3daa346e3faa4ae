"""Who an activated image competes with in its index: the nearest *other* stored codes and the next
IVF cells, found with the index itself at the start of activation.

The paper's loss only pulls a descriptor towards its target. Retrieval needs more: the query (the
released image, or a copy of it) must land in the original's IVF cell (``nprobe = 1``: the nearest
centroid wins) and, inside the cells it visits, score its own stored code above every other one.
Both conditions are differences of scores that are *linear* in the query descriptor ``f``
(unit-norm): with the index's scores (:func:`activeindex.index.search`: ``1 - ||f - a||²/2`` for
L2, ``<f, a>`` for inner product),

    score(f, a) = <f, a> + b(a),   b(a) = -||a||²/2 (L2) or 0 (IP), up to a constant,

so each (own, competitor) pair is one vector ``w = a_comp - a_own`` and one offset
``b = b(a_comp) - b(a_own)``: the competitor outscores the own anchor when ``<f, w> + b > 0``.
The competitor term of :func:`activeindex.activation.optimize.activate_batch` pushes every such
difference below ``-margin`` (a soft hinge).

- Codes: the index is searched with the original's descriptor, as a query would be (same nprobe);
  the hits' reconstructions that differ from the own code's reconstruction are the competitors (the
  own code may already be in the index, as in the evaluation, or not yet, as in ``add``).
- Cells: for IVF indexes, the coarse quantiser's next centroids after the own one (in the space of
  a pre-transform, mapped back as :func:`.targets.compute_targets` does for the centroid target).
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from activeindex.activation.targets import _codec
from activeindex.errors import ActivationError

SAME_CODE = 1e-5  # reconstructions closer than this are one code (the own one, or a duplicate)


@dataclass
class Competitors:
    """Per image ``i`` and pair ``j``: ``<f, w[i, j]> + b[i, j]`` = competitor score - own score;
    ``valid[i, j]`` False for padding (fewer competitors than pairs)."""

    w: np.ndarray  # (n, K, d) float32
    b: np.ndarray  # (n, K) float32
    valid: np.ndarray  # (n, K) bool

    @property
    def pairs(self) -> int:
        return int(self.w.shape[1])

    def gaps(self, f: np.ndarray) -> np.ndarray:
        """(n, K) competitor - own score differences for descriptors ``f`` (n, d); -inf where invalid."""
        g = np.einsum("nd,nkd->nk", f.astype(np.float32), self.w) + self.b
        return np.where(self.valid, g, -np.inf)


def _offsets(a: np.ndarray, metric: int) -> np.ndarray:
    return -0.5 * np.square(a).sum(axis=-1) if metric == faiss.METRIC_L2 else np.zeros(a.shape[:-1], np.float32)


def _pack(own: np.ndarray, comps: list[np.ndarray], metric: int, k: int) -> Competitors:
    """own (n, d) anchors, comps[i] (k_i, d) competitor anchors → the pairs, padded to ``k``."""
    n, d = own.shape
    w = np.zeros((n, k, d), np.float32)
    b = np.zeros((n, k), np.float32)
    valid = np.zeros((n, k), bool)
    own_b = _offsets(own, metric)
    for i, c in enumerate(comps):
        c = c[:k]
        if len(c):
            w[i, : len(c)] = c - own[i]
            b[i, : len(c)] = _offsets(c, metric) - own_b[i]
            valid[i, : len(c)] = True
    return Competitors(w, b, valid)


def code_competitors(index: faiss.Index, x: np.ndarray, k: int) -> Competitors:
    """The ``k`` nearest other stored codes of each original descriptor ``x`` (n, d), against its
    own code (the index's reconstruction of ``x``)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    codec = _codec(index)
    own = np.asarray(codec.sa_decode(codec.sa_encode(x)), dtype=np.float32)
    comps: list[np.ndarray] = []
    if index.ntotal > 0:
        _, ids = index.search(x, min(int(index.ntotal), k + 2))
        for i, row in enumerate(ids):
            keep = []
            for id_ in row[row >= 0]:
                try:
                    r = index.reconstruct(int(id_))
                except RuntimeError as exc:
                    raise ActivationError(
                        f"the competitor term needs an index that reconstructs stored codes by id "
                        f"({type(faiss.downcast_index(index)).__name__} cannot: {exc}); use margin_weight 0"
                    ) from exc
                if np.linalg.norm(r - own[i]) > SAME_CODE:
                    keep.append(r)
            comps.append(np.asarray(keep, np.float32).reshape(-1, index.d))
    else:
        comps = [np.zeros((0, index.d), np.float32) for _ in range(len(x))]
    return _pack(own, comps, index.metric_type, k)


def cell_competitors(index: faiss.Index, x: np.ndarray, k: int) -> Competitors | None:
    """The ``k`` next IVF centroids of each ``x`` against its own (nearest) one; None if not IVF."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return None
    pre = _codec(index)
    chain = []
    if isinstance(pre, faiss.IndexPreTransform):
        chain = [faiss.downcast_VectorTransform(pre.chain.at(i)) for i in range(pre.chain.size())]
    xs = np.ascontiguousarray(x, dtype=np.float32)
    for vt in chain:
        xs = vt.apply(xs)
    _, lists = ivf.quantizer.search(xs, min(int(ivf.nlist), k + 1))
    cents = ivf.quantizer.reconstruct_batch(lists.ravel()).reshape(*lists.shape, -1)
    for vt in reversed(chain):
        cents = vt.reverse_transform(cents.reshape(-1, cents.shape[-1])).reshape(*lists.shape, -1)
    cents = np.asarray(cents, np.float32)
    return _pack(cents[:, 0], [c for c in cents[:, 1:]], ivf.quantizer.metric_type, k)


def find_competitors(index: faiss.Index, x: np.ndarray, k: int) -> Competitors:
    """Code pairs, then (IVF) cell pairs, side by side: (n, 2k) pairs for IVF, (n, k) otherwise."""
    codes = code_competitors(index, x, k)
    cells = cell_competitors(index, x, k)
    if cells is None:
        return codes
    return Competitors(np.concatenate([codes.w, cells.w], axis=1), np.concatenate([codes.b, cells.b], axis=1),
                       np.concatenate([codes.valid, cells.valid], axis=1))
