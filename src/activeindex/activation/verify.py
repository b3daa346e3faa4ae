"""Is a released file still found first, unedited? The check behind activation's promise that an
activated image is never harder to find than its original.

Activation pulls a descriptor towards its own stored code, but the nearest *other* codes can move
closer too: on real photos at the paper's step size 7 of 170 unedited released files ranked a
neighbour's code first (issue 21). :func:`own_code_first` answers, for query descriptors ``y`` and
the originals' descriptors ``x``, whether a search of the index with ``y[i]`` ranks the code of
``x[i]`` first, exactly as FAISS scores it:

- in the space the index searches (after its pre-transform, if any), the own code's distance is
  that of ``y`` to the code's reconstruction (what IVF-PQ's asymmetric distance computes);
- for IVF indexes, the own code is found only if the own cell (the nearest centroid of ``x``) is
  among the ``nprobe`` cells ``y`` visits;
- its rivals are the index's hits for ``y`` (the own code, when already stored, is left out once:
  by its id where the caller gives it, else the hit nearest to its distance) and the codes of the
  other originals of the batch, which ``add`` stores only after releasing them.

Checking the originals themselves (``y = x``) tells which images are found first passively.
"""

from __future__ import annotations

import faiss
import numpy as np

from activeindex.activation.targets import _codec

# Distances closer than this are one code seen twice (the own code already in the index).
SAME_DISTANCE = 1e-4


def _search_space(index: faiss.Index) -> tuple[list, faiss.Index]:
    """(pre-transform chain, the codec that stores vectors in the transformed space)."""
    codec = _codec(index)
    chain = []
    if isinstance(codec, faiss.IndexPreTransform):
        chain = [faiss.downcast_VectorTransform(codec.chain.at(i)) for i in range(codec.chain.size())]
        codec = faiss.downcast_index(codec.index)
    return chain, codec


def _apply(chain: list, v: np.ndarray) -> np.ndarray:
    v = np.ascontiguousarray(v, dtype=np.float32)
    for vt in chain:
        v = vt.apply(v)
    return np.ascontiguousarray(v, dtype=np.float32)


def own_code_first(index: faiss.Index, x: np.ndarray, y: np.ndarray, *, mates: bool = True,
                   own_ids: np.ndarray | None = None) -> np.ndarray:
    """(n,) bool: whether searching ``index`` with ``y[i]`` ranks the code of ``x[i]`` first
    (see the module docstring). ``x`` and ``y``: (n, d) descriptors. ``mates=False``: the originals'
    codes are all stored already, only the index's hits compete (and no (n, n) matrix is made).

    ``own_ids``: the ids under which the own codes are stored, where the caller knows them (−1: not
    stored); the own code is then left out of the hits by its id. Without them it is recognised by
    its distance: the hit nearest to the own code's distance, within :data:`SAME_DISTANCE` — not the
    first such hit, which can be a rival at the same distance (a near-duplicate) ranked before it."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.ascontiguousarray(y, dtype=np.float32)
    n = len(x)
    if n == 0:
        return np.zeros(0, bool)
    chain, codec = _search_space(index)
    xt, yt = _apply(chain, x), _apply(chain, y)
    own = np.asarray(codec.sa_decode(codec.sa_encode(xt)), dtype=np.float32)  # (n, d') in search space
    l2 = index.metric_type == faiss.METRIC_L2
    sign = 1.0 if l2 else -1.0  # compare as "smaller is better"

    def dist(q: np.ndarray, a: np.ndarray) -> np.ndarray:  # q (n, d'), a (m, d') → (n, m)
        if l2:
            return (np.square(q).sum(1)[:, None] - 2.0 * q @ a.T + np.square(a).sum(1)[None, :]).astype(np.float32)
        return -(q @ a.T).astype(np.float32)

    def dist_rows(q: np.ndarray, a: np.ndarray) -> np.ndarray:  # q, a (n, d') → (n,): row i against row i
        if l2:
            return np.square(q - a).sum(1).astype(np.float32)
        return -np.einsum("nd,nd->n", q, a).astype(np.float32)

    d_own = dist_rows(yt, own)
    found = np.ones(n, bool)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        _, own_list = ivf.quantizer.search(xt, 1)
        _, visits = ivf.quantizer.search(yt, max(1, int(ivf.nprobe)))
        found = (visits == own_list).any(axis=1)
    best_other = np.full(n, np.inf, np.float32)
    if mates and n > 1:
        d_all = dist(yt, own)  # row i: y_i against every original's code of the batch
        if ivf is not None:  # a batch-mate's code can only win where y visits its cell
            mate_visible = (visits[:, :, None] == own_list[:, 0][None, None, :]).any(axis=1)  # (n, n)
        else:
            mate_visible = np.ones((n, n), bool)
        np.fill_diagonal(mate_visible, False)
        best_other = np.where(mate_visible, d_all, np.inf).min(axis=1)
    if index.ntotal > 0:
        D, I = index.search(y, min(int(index.ntotal), 3))
        D = sign * D.astype(np.float32)
        for i in range(n):
            hits = [(float(d_), int(id_)) for d_, id_ in zip(D[i], I[i]) if id_ >= 0]
            if own_ids is not None:
                hits = [h for h in hits if h[1] != own_ids[i]]
            elif hits:
                gaps = [abs(d_ - d_own[i]) for d_, _ in hits]
                k = int(np.argmin(gaps))
                if gaps[k] <= SAME_DISTANCE * max(1.0, abs(d_own[i])):
                    del hits[k]  # the own code, already stored
            if hits:
                best_other[i] = min(best_other[i], hits[0][0])
    return found & (d_own <= best_other)
