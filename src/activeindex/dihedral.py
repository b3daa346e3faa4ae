"""Rotation- and flip-proof queries: the 8 views of the dihedral group D4, and the merge of their hits.

A copier may rotate an image by a quarter turn or mirror it; a descriptor trained mostly on other
edits then sees another image. A dihedral query describes the query under all 8 elements of D4
(identity, rotations by 90, 180 and 270 degrees, and each of those after a horizontal flip),
searches the index with the 8 descriptors in one call, and keeps for each reference its best
score over the views. One of the views undoes the copier's quarter turn or flip, whichever it was.

The views are taken on the prepared model input, the square (S, S, 3) array, not on the file:
both resize policies (squash to the square, or resize the short side and cut the centre square)
commute with D4 up to the rounding of resampling, so rotating the prepared square is rotating the
image, at no cost in decoding. The view of index j applies ``flip`` (if j >= 4) after ``rot90``
``j % 4`` times (counter-clockwise, as :func:`numpy.rot90`).

Scores. Each view is a query in its own right and is normalised as any query is (against its own
top-n background similarities, :class:`activeindex.scoring.Background`); the merge takes the
maximum of the normalised scores. The best of 8 draws is higher than one draw for unrelated images
too, which is why the dihedral mode has its own calibrated copy threshold.

Cost: 8 descriptions per query (the model runs on 8× the batch); one search of 8 vectors per query.
"""

from __future__ import annotations

import numpy as np

N_VIEWS = 8
VIEW_NAMES = ("identity", "rot90", "rot180", "rot270", "flip", "flip_rot90", "flip_rot180", "flip_rot270")


def view(batch: np.ndarray, j: int) -> np.ndarray:
    """View ``j`` (0..7, see the module doc) of images ``batch`` (b, H, W, C)."""
    if not 0 <= j < N_VIEWS:
        raise ValueError(f"a D4 view index is in 0..7, got {j}")
    out = np.rot90(batch, j % 4, axes=(1, 2))
    return out[:, :, ::-1] if j >= 4 else out


def dihedral_views(batch: np.ndarray) -> np.ndarray:
    """The 8 D4 views of each image of ``batch`` (b, S, S, C) → (b * 8, S, S, C), contiguous.

    Query-major: rows ``8 i .. 8 i + 7`` are the views of image i, in :data:`VIEW_NAMES` order
    (row ``8 i`` is the image itself). The images must be square: a quarter turn of a non-square
    array would not fit the model's input."""
    if batch.ndim != 4 or batch.shape[1] != batch.shape[2]:
        raise ValueError(f"dihedral views need a batch of square images (b, S, S, C), got shape {batch.shape}")
    return np.ascontiguousarray(np.stack([view(batch, j) for j in range(N_VIEWS)], axis=1).reshape(
        (-1, *batch.shape[1:])))


def merge_views(S: np.ndarray, I: np.ndarray, k: int, *, n_views: int = N_VIEWS,
                raw: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Per query, the best score of each reference over its views, the ``k`` best references first.

    ``S``, ``I`` (nq * n_views, k') are the scores and ids of each view's search, query-major (rows
    ``n_views q .. n_views q + n_views - 1`` belong to query q), ids -1 where a search found fewer;
    ``raw`` (same shape, optional) the raw similarities, of which the best view's is kept.
    Returns (scores, ids, raw) each (nq, k), sorted by decreasing score, ties by increasing id
    (so the result does not depend on the order of the views), padded with id -1 and score -inf.

    Exact for the merged top-k whenever each view's top-k' with k' >= k is exact: a reference
    missing from the list of its best view is beaten there by k' others, each of which then has a
    merged score above its own.
    """
    if S.shape != I.shape or S.ndim != 2 or len(S) % n_views:
        raise ValueError(f"scores {S.shape} and ids {I.shape} must be (nq * {n_views}, k') alike")
    nq, kk = len(S) // n_views, S.shape[1]
    S = S.reshape(nq, n_views * kk).astype(np.float32, copy=False)
    I = I.reshape(nq, n_views * kk)
    R = None if raw is None else raw.reshape(nq, n_views * kk)
    out_s = np.full((nq, k), -np.inf, np.float32)
    out_i = np.full((nq, k), -1, np.int64)
    out_r = None if R is None else np.full((nq, k), -np.inf, np.float32)
    # Sort each query's hits by (id, -score): the first row of each id is its best view.
    valid = I >= 0
    for q in range(nq):  # nq small per batch; each step is vectorised over the 8 k' hits
        ids, s = I[q][valid[q]], S[q][valid[q]]
        if not len(ids):
            continue
        order = np.lexsort((-s, ids))
        first = np.ones(len(order), bool)
        first[1:] = ids[order][1:] != ids[order][:-1]
        best = order[first]  # one position per distinct id, its best score
        top = best[np.lexsort((ids[best], -s[best]))][:k]
        out_s[q, : len(top)], out_i[q, : len(top)] = s[top], ids[top]
        if out_r is not None and R is not None:
            out_r[q, : len(top)] = R[q][valid[q]][top]
    return out_s, out_i, out_r
