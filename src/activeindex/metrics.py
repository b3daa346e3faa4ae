"""Copy-detection metrics of ISC21 / DISC21: µAP, recall at precision 90, R@k, AP per query.

Inputs
------
*Predictions* are ``(query_id, reference_id, score)`` triples, higher score = more similar; a query
may have zero, one or many. Pass a :class:`Predictions` or the three parallel arrays as a tuple.
*Ground truth* is the set of true ``(query_id, reference_id)`` pairs, as an iterable of pairs or an
``(n, 2)`` array. Queries without a true match ("non-matching" queries, half of DISC21's) are simply
absent from it, so every prediction they make is a negative.

Ids are integers or strings, consistently: the query ids of the predictions and of the ground truth
must be of the same kind (likewise the reference ids), because silently matching ``1`` with ``"1"``
would be a guess. Internally ids are mapped to dense int64 codes.

Conventions shared by every metric here
---------------------------------------
* A ``(query, reference)`` pair predicted several times counts once, with its highest score (a
  system that emits one pair per local descriptor must not be rewarded or punished per copy).
* Ties are broken against the system: among equal scores, negatives come first (µAP, the curve,
  AP per query), and an equal-scoring other reference ranks ahead of the true one (R@k).
* ``N_pos`` is the number of ground-truth pairs, including those never predicted, so a missed
  pair lowers recall. Duplicate ground-truth pairs are rejected rather than double counted.

Bad inputs raise :class:`MetricsInputError` (a ``ValueError``) carrying the offending values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from activeindex.errors import ActiveIndexError

__all__ = [
    "CopyDetectionMetrics",
    "MetricsInputError",
    "Predictions",
    "average_precision_per_query",
    "evaluate",
    "micro_average_precision",
    "precision_recall_curve",
    "ranks",
    "recall_at_k",
    "recall_at_k_from_knn",
    "recall_at_precision",
]

Id = int | str


class MetricsInputError(ActiveIndexError, ValueError):
    """Predictions, ground truth or k-NN results that cannot be evaluated as given."""


# --------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True, eq=False)
class Predictions:
    """Scored ``(query, reference)`` pairs; zero, one or many per query.

    Attributes (normalised on construction, any array-like accepted):
        query_ids: (n,) int64 or str array.
        reference_ids: (n,) int64 or str array.
        scores: (n,) float64, higher = more similar; ``±inf`` allowed, NaN rejected.

    Raises:
        MetricsInputError: arrays not 1-D or of different lengths, ids neither all integers nor all
            strings (e.g. ``None``, floats, a mix), NaN or non-numeric scores.
    """

    query_ids: np.ndarray
    reference_ids: np.ndarray
    scores: np.ndarray

    def __post_init__(self) -> None:
        q = _as_ids(self.query_ids, "prediction query ids")
        r = _as_ids(self.reference_ids, "prediction reference ids")
        s = _as_scores(self.scores, "prediction scores")
        if not len(q) == len(r) == len(s):
            raise MetricsInputError(
                f"predictions have {len(q)} query ids, {len(r)} reference ids and {len(s)} scores;"
                " the three arrays must be parallel"
            )
        object.__setattr__(self, "query_ids", q)
        object.__setattr__(self, "reference_ids", r)
        object.__setattr__(self, "scores", s)

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def from_ranked_lists(cls, ranked: Mapping[Id, Sequence[Id]]) -> Predictions:
        """Predictions from ``{query_id: [reference ids, best first]}``.

        Scores are ``-position`` (0, -1, -2, ...), so the order is kept without ties; use these
        for R@k only, as the scores mean nothing across queries (µAP would be meaningless).
        """
        q: list[Any] = []
        r: list[Any] = []
        s: list[float] = []
        for qid, refs in ranked.items():
            refs = list(refs)
            q.extend([qid] * len(refs))
            r.extend(refs)
            s.extend(-np.arange(len(refs), dtype=np.float64))
        return cls(np.array(q, dtype=object), np.array(r, dtype=object), np.array(s))


PredictionsLike = Predictions | tuple[Any, Any, Any]
GroundTruthLike = Iterable[tuple[Id, Id]] | np.ndarray


def _as_predictions(
    preds: PredictionsLike | Mapping[Id, Sequence[Id]], ranked_ok: bool
) -> Predictions:
    if isinstance(preds, Predictions):
        return preds
    if isinstance(preds, Mapping):
        if not ranked_ok:
            raise TypeError(
                "ranked lists carry no comparable scores across queries; µAP and the precision-"
                "recall curve need Predictions(query_ids, reference_ids, scores)"
            )
        return Predictions.from_ranked_lists(preds)
    if isinstance(preds, (tuple, list)) and len(preds) == 3:
        return Predictions(*preds)
    raise TypeError(
        "predictions must be a Predictions, a (query_ids, reference_ids, scores) tuple"
        + (" or a {query_id: [reference ids]} mapping" if ranked_ok else "")
        + f"; got {type(preds).__name__}"
    )


def _as_ids(x: Any, what: str) -> np.ndarray:
    """A 1-D int64 or str array of ids; lists are inspected element by element."""
    # A list mixing ints and strings would be silently stringified by np.asarray; go through object.
    a = x if isinstance(x, np.ndarray) else np.array(list(x), dtype=object)
    if a.ndim != 1:
        raise MetricsInputError(f"{what} must be 1-D, got shape {a.shape}")
    if a.size == 0:
        return np.empty(0, dtype=np.int64)
    kind = a.dtype.kind
    if kind in "iu":
        return a.astype(np.int64, copy=False)
    if kind == "U":
        return a
    if kind == "S":
        return a.astype(str)
    if kind == "O":
        types = {type(v) for v in a}
        if all(issubclass(t, (int, np.integer)) and not issubclass(t, (bool, np.bool_)) for t in types):
            return a.astype(np.int64)
        if all(issubclass(t, str) for t in types):
            return a.astype(str)
        # Name one offending value: a non-id (None, float, bool) if any, else one of the other kind.
        odd = [v for v in a if isinstance(v, bool) or not isinstance(v, (int, np.integer, str))]
        bad = odd[0] if odd else next(v for v in a if isinstance(v, str) != isinstance(a[0], str))
        raise MetricsInputError(
            f"{what} must be all integers or all strings; found {bad!r} "
            f"(types present: {sorted(t.__name__ for t in types)})"
        )
    raise MetricsInputError(
        f"{what} must be integers or strings, got dtype {a.dtype} (e.g. {a[0]!r}); "
        "convert float ids (as pandas makes them) with .astype(int)"
    )


def _as_scores(x: Any, what: str) -> np.ndarray:
    try:
        s = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise MetricsInputError(f"{what} must be numbers: {exc}") from exc
    if s.ndim != 1:
        raise MetricsInputError(f"{what} must be 1-D, got shape {s.shape}")
    nan = np.flatnonzero(np.isnan(s))
    if nan.size:
        raise MetricsInputError(
            f"{what} contain {nan.size} NaN value(s), first at index {nan[0]}; a NaN cannot be ranked"
        )
    return s


def _as_ground_truth(gt: GroundTruthLike) -> tuple[np.ndarray, np.ndarray]:
    """Query and reference id columns, (n_gt,) each."""
    if isinstance(gt, np.ndarray):
        if gt.size == 0:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        if gt.ndim != 2 or gt.shape[1] != 2:
            raise MetricsInputError(f"ground truth array must have shape (n, 2), got {gt.shape}")
        q, r = gt[:, 0], gt[:, 1]
        return _as_ids(q, "ground-truth query ids"), _as_ids(r, "ground-truth reference ids")
    pairs = list(gt)
    for p in pairs:
        if isinstance(p, (str, bytes)) or not hasattr(p, "__len__") or len(p) != 2:
            raise MetricsInputError(f"ground truth must be (query_id, reference_id) pairs; got {p!r}")
    q = np.array([p[0] for p in pairs], dtype=object)
    r = np.array([p[1] for p in pairs], dtype=object)
    return _as_ids(q, "ground-truth query ids"), _as_ids(r, "ground-truth reference ids")


def _joint_codes(
    a: np.ndarray, b: np.ndarray, what: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dense int64 codes of ``a`` and ``b`` in one shared vocabulary (sorted unique ids)."""
    if a.size and b.size and (a.dtype.kind == "U") != (b.dtype.kind == "U"):
        raise MetricsInputError(
            f"{what} ids are {'strings' if a.dtype.kind == 'U' else 'integers'} in the predictions "
            f"but {'strings' if b.dtype.kind == 'U' else 'integers'} in the ground truth "
            f"(e.g. {a[0]!r} vs {b[0]!r}); use one kind"
        )
    # An empty side takes the other's dtype, so decoded ids keep their type.
    if not a.size:
        a = a.astype(b.dtype)
    if not b.size:
        b = b.astype(a.dtype)
    vocab, inv = np.unique(np.concatenate([a, b]), return_inverse=True)
    inv = inv.reshape(-1).astype(np.int64)
    return vocab, inv[: len(a)], inv[len(a) :]


@dataclass(frozen=True)
class _Encoded:
    """Deduplicated predictions and ground truth as int64 codes (internal)."""

    q: np.ndarray  # (n,) query codes of the deduplicated predictions
    r: np.ndarray  # (n,) reference codes
    scores: np.ndarray  # (n,) float64, the highest score of each pair
    is_pos: np.ndarray  # (n,) bool, the pair is in the ground truth
    gt_q: np.ndarray  # (n_gt,) query codes, in ground-truth order
    gt_r: np.ndarray  # (n_gt,) reference codes
    query_vocab: np.ndarray  # code -> original query id
    n_refs: int

    @property
    def n_pos(self) -> int:
        return len(self.gt_q)

    def keys(self) -> tuple[np.ndarray, np.ndarray]:
        return self.q * self.n_refs + self.r, self.gt_q * self.n_refs + self.gt_r


def _encode(preds: Predictions, gt: GroundTruthLike) -> _Encoded:
    gq, gr = _as_ground_truth(gt)
    qv, pq, gq_c = _joint_codes(preds.query_ids, gq, "query")
    rv, pr, gr_c = _joint_codes(preds.reference_ids, gr, "reference")
    n_refs = max(len(rv), 1)
    gkey = gq_c * n_refs + gr_c
    uniq, counts = np.unique(gkey, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1][0]
        raise MetricsInputError(
            f"ground truth lists {int((counts > 1).sum())} pair(s) more than once, e.g. "
            f"({qv[dup // n_refs]!r}, {rv[dup % n_refs]!r}); each true pair must appear once"
        )
    pkey = pq * n_refs + pr
    # Duplicate (query, reference) predictions: keep the highest score, once.
    order = np.lexsort((-preds.scores, pkey))
    first = np.ones(len(order), dtype=bool)
    first[1:] = pkey[order][1:] != pkey[order][:-1]
    keep = np.sort(order[first])
    return _Encoded(
        q=pq[keep],
        r=pr[keep],
        scores=preds.scores[keep],
        is_pos=np.isin(pkey[keep], gkey),
        gt_q=gq_c,
        gt_r=gr_c,
        query_vocab=qv,
        n_refs=n_refs,
    )


def _prepare(
    preds: PredictionsLike | Mapping[Id, Sequence[Id]], gt: GroundTruthLike, ranked_ok: bool
) -> _Encoded:
    return _encode(_as_predictions(preds, ranked_ok), gt)


def _require_positives(enc: _Encoded, metric: str) -> None:
    if enc.n_pos == 0:
        raise MetricsInputError(f"ground truth is empty: {metric} is undefined without true pairs")


# --------------------------------------------------------------------------------------------
# Pooled metrics: precision-recall curve, µAP, recall at precision


def _pessimistic_order(scores: np.ndarray, is_pos: np.ndarray) -> np.ndarray:
    # Worst-case tie rule (ISC21): sort by decreasing score and, among equal scores, put the
    # negatives first (False < True). Any order within a tie is equally "true", so we take the one
    # least favourable to the system; otherwise a descriptor that outputs few distinct scores (or
    # a constant) would be credited with the optimistic order it never actually produced.
    return np.lexsort((is_pos, -scores))


def _curve(enc: _Encoded) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    order = _pessimistic_order(enc.scores, enc.is_pos)
    pos = enc.is_pos[order]
    tp = np.cumsum(pos)
    precision = tp / np.arange(1, len(tp) + 1)
    recall = tp / enc.n_pos
    return precision, recall, enc.scores[order], pos


def precision_recall_curve(
    preds: PredictionsLike, gt: GroundTruthLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision and recall of every prefix of the pooled, pessimistically ordered predictions.

    Args:
        preds: all queries' predictions (duplicate pairs count once, with their highest score).
        gt: the true ``(query_id, reference_id)`` pairs, N_pos of them.

    Returns:
        ``(precision, recall, thresholds)``, each (n,) float64 with n the number of distinct
        predicted pairs, in order of decreasing score with negatives first among ties. Entry i
        describes the first i+1 predictions; ``thresholds[i]`` is the score of the (i+1)-th.
        ``recall`` counts never-predicted pairs in its denominator, so it may stop below 1.
        Consistent with :func:`micro_average_precision`:
        ``µAP == sum(diff(recall, prepend=0) * precision)``. Only prefixes that end a tie group
        are reachable with the rule "score >= threshold"; the others are the worst case inside it.
        Empty predictions give three empty arrays.

    Raises:
        MetricsInputError: empty ground truth, or any invalid input (see :class:`Predictions`).
    """
    enc = _prepare(preds, gt, ranked_ok=False)
    _require_positives(enc, "the precision-recall curve")
    precision, recall, thresholds, _ = _curve(enc)
    return precision, recall, thresholds


def micro_average_precision(preds: PredictionsLike, gt: GroundTruthLike) -> float:
    """µAP: ``Σ_i (recall_i − recall_{i−1}) · precision_i`` over the pooled predictions.

    All queries' predictions are pooled and sorted by decreasing score, negatives first among equal
    scores (worst case). ``recall_i = TP_i / N_pos`` with N_pos the number of ground-truth pairs,
    predicted or not, so each true pair contributes ``precision at its position / N_pos`` and a
    never-predicted pair contributes 0. Duplicate pairs count once, with their highest score.
    Predictions of non-matching queries are all negatives.

    Returns:
        µAP in [0, 1]; 0 when there are no predictions.

    Raises:
        MetricsInputError: empty ground truth, or any invalid input.
    """
    enc = _prepare(preds, gt, ranked_ok=False)
    _require_positives(enc, "µAP")
    return _uap(enc)


def _uap(enc: _Encoded) -> float:
    precision, _, _, pos = _curve(enc)
    # Recall steps by 1/N_pos at each positive and stays flat at each negative.
    return float(precision[pos].sum() / enc.n_pos)


def recall_at_precision(
    preds: PredictionsLike, gt: GroundTruthLike, precision: float = 0.9
) -> tuple[float, float | None]:
    """The largest recall among prefixes whose precision is at least ``precision``, and its threshold.

    Args:
        preds, gt: as for :func:`micro_average_precision`.
        precision: the target precision, in (0, 1].

    Returns:
        ``(recall, threshold)``: declaring "copy" for every pair with ``score >= threshold`` achieves
        that recall at a precision >= the target. When no prefix reaches the target (including when
        there are no predictions) the result is ``(0.0, None)``: no threshold qualifies.

    The best prefix always ends a tie group (a later positive of its group would add recall and
    precision), so the prefix-based answer equals the one found by scanning thresholds.

    Raises:
        MetricsInputError: target outside (0, 1], empty ground truth, or any invalid input.
    """
    enc = _prepare(preds, gt, ranked_ok=False)
    _check_target(precision)
    _require_positives(enc, "recall at precision")
    return _recall_at_precision(enc, precision)


def _check_target(precision: float) -> None:
    if not 0.0 < precision <= 1.0:
        raise MetricsInputError(f"target precision must be in (0, 1], got {precision!r}")


def _recall_at_precision(enc: _Encoded, target: float) -> tuple[float, float | None]:
    precision, recall, thresholds, _ = _curve(enc)
    ok = np.flatnonzero(precision >= target)
    if ok.size == 0:
        return 0.0, None
    # argmax takes the first prefix reaching the best recall: the one with the highest precision.
    best = ok[np.argmax(recall[ok])]
    return float(recall[best]), float(thresholds[best])


# --------------------------------------------------------------------------------------------
# Per-query metrics: ranks, R@k, AP per query


def _ranks(enc: _Encoded) -> np.ndarray:
    """(n_gt,) float64 rank of each true pair among its query's predictions; inf if unpredicted."""
    out = np.full(enc.n_pos, np.inf)
    if enc.n_pos == 0 or len(enc.scores) == 0:
        return out
    pkey, gkey = enc.keys()
    by_key = np.argsort(pkey)
    at = np.minimum(np.searchsorted(pkey[by_key], gkey), len(pkey) - 1)
    found = pkey[by_key][at] == gkey
    true_score = enc.scores[by_key[at[found]]]
    # Count, for each found pair, its query's predictions with score >= the true one's (itself
    # included, so the count is the rank with ties against). One sorted int64 key per prediction,
    # query code * M + dense score rank, turns "same query and score >= s" into a key range.
    uniq_scores, srank = np.unique(enc.scores, return_inverse=True)
    m = len(uniq_scores) + 1
    composite = np.sort(enc.q * m + srank.reshape(-1))
    gq = enc.gt_q[found]
    lo = np.searchsorted(composite, gq * m + np.searchsorted(uniq_scores, true_score), side="left")
    hi = np.searchsorted(composite, (gq + 1) * m, side="left")
    out[found] = hi - lo
    return out


def ranks(preds: PredictionsLike | Mapping[Id, Sequence[Id]], gt: GroundTruthLike) -> np.ndarray:
    """Rank of each ground-truth pair's reference among its query's predictions, ties against.

    ``rank = 1 + number of the query's other predicted references with score >= the true one's``
    (other true references of the same query included; DISC21 has at most one per query).

    Args:
        preds: a :class:`Predictions`, a ``(query_ids, reference_ids, scores)`` tuple, or ranked
            lists ``{query_id: [reference ids, best first]}``. Duplicate pairs count once, with
            their highest score (for ranked lists: their first position).
        gt: the true pairs.

    Returns:
        (n_gt,) float64 in ground-truth order: ranks 1, 2, ..., or ``inf`` for a pair never
        predicted.
    """
    return _ranks(_prepare(preds, gt, ranked_ok=True))


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    bad = [k for k in ks if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1]
    if not ks or bad:
        raise MetricsInputError(f"ks must be positive integers, got {ks!r}")
    return tuple(int(k) for k in ks)


def _recall_from_ranks(r: np.ndarray, ks: tuple[int, ...]) -> dict[int, float]:
    return {k: float(np.mean(r <= k)) for k in ks}


def recall_at_k(
    preds: PredictionsLike | Mapping[Id, Sequence[Id]],
    gt: GroundTruthLike,
    ks: Iterable[int] = (1, 10, 100),
) -> dict[int, float]:
    """R@k: the fraction of ground-truth pairs whose rank (see :func:`ranks`) is at most k.

    The denominator is the number of ground-truth pairs; non-matching queries have none, so their
    predictions never enter R@k. A pair never predicted counts as missed for every k.

    Returns:
        ``{k: R@k}`` for each k in ``ks``.

    Raises:
        MetricsInputError: empty ground truth, a k that is not a positive integer, invalid inputs.
    """
    ks = _check_ks(ks)
    enc = _prepare(preds, gt, ranked_ok=True)
    _require_positives(enc, "R@k")
    return _recall_from_ranks(_ranks(enc), ks)


def recall_at_k_from_knn(
    I: np.ndarray,
    S: np.ndarray,
    true_ids: Sequence[int | None] | np.ndarray,
    ks: Iterable[int] = (1, 10, 100),
) -> dict[int, float]:
    """R@k from k-NN search results, e.g. a FAISS search's ``(S, I)``.

    Args:
        I: (nq, k) integer reference ids per query; ``-1`` marks an empty slot (FAISS pads with it
            when fewer than k results exist) and is ignored along with its score.
        S: (nq, k) similarity scores, higher = more similar (negate L2 distances first). NaN is
            rejected in non-empty slots.
        true_ids: (nq,) the true reference id of each query, ``-1`` or ``None`` when it has none.
        ks: the cut-offs.

    Returns:
        ``{k: R@k}``. Queries without a true match are excluded: the denominator is the number of
        queries with one. Ranks follow :func:`ranks` (ties count against the true id; an id found
        twice in a row counts once with its best score). A k beyond the search's k gives the
        fraction of true ids found at all.

    Raises:
        MetricsInputError: shapes that disagree, non-integer ids, NaN scores, no query with a true
            match, or a bad ``ks``.
    """
    ks = _check_ks(ks)
    I = np.asarray(I)
    S = np.asarray(S)
    if I.ndim != 2 or S.shape != I.shape:
        raise MetricsInputError(f"I and S must be (nq, k) arrays of one shape, got {I.shape} and {S.shape}")
    if I.size and I.dtype.kind not in "iu":
        raise MetricsInputError(f"I must hold integer ids, got dtype {I.dtype}")
    true = _as_knn_true_ids(true_ids, I.shape[0])
    has = true >= 0
    if not has.any():
        raise MetricsInputError("no query has a true match (all true_ids are -1/None): R@k is undefined")
    valid = I >= 0
    nq, k = I.shape
    preds = Predictions(np.repeat(np.arange(nq), k)[valid.ravel()], I[valid], S[valid])
    q = np.flatnonzero(has)
    gt = np.stack([q, true[has]], axis=1)
    return _recall_from_ranks(_ranks(_encode(preds, gt)), ks)


def _as_knn_true_ids(true_ids: Sequence[int | None] | np.ndarray, nq: int) -> np.ndarray:
    a = true_ids if isinstance(true_ids, np.ndarray) else np.array(list(true_ids), dtype=object)
    if a.ndim != 1 or len(a) != nq:
        raise MetricsInputError(f"true_ids must have shape ({nq},) to match I, got {a.shape}")
    if a.dtype.kind == "O":
        a = np.array([-1 if v is None else v for v in a], dtype=object)
    out = _as_ids(a, "true_ids")
    if out.dtype.kind != "i" and out.size:
        raise MetricsInputError(f"true_ids must be integer reference ids (-1/None for none), got {a[:3]!r}")
    out = out.astype(np.int64)
    if (out < -1).any():
        raise MetricsInputError(f"true_ids must be >= 0, or -1 for no match; got {out[out < -1][0]}")
    return out


def average_precision_per_query(preds: PredictionsLike, gt: GroundTruthLike) -> dict[Id, float]:
    """Average precision of each query with at least one true match.

    For query q with ``n_q`` true references, its predictions are sorted by decreasing score with
    negatives first among ties (as µAP) and ``AP_q = Σ precision at each true reference / n_q``;
    true references never predicted contribute 0, so a query without predictions has AP 0.

    Returns:
        ``{query_id: AP}`` for the queries of the ground truth, in order of first appearance there.
        Non-matching queries are absent (their AP is undefined).
    """
    enc = _prepare(preds, gt, ranked_ok=False)
    n_codes = len(enc.query_vocab)
    order = np.lexsort((enc.is_pos, -enc.scores, enc.q))  # per query, pessimistic order
    qs, pos = enc.q[order], enc.is_pos[order]
    n = len(qs)
    idx = np.arange(n)
    starts = np.ones(n, dtype=bool)
    starts[1:] = qs[1:] != qs[:-1]
    block_start = np.maximum.accumulate(np.where(starts, idx, 0)) if n else idx
    tp = np.cumsum(pos)
    tp_in_block = tp - (tp - pos)[block_start]
    precision = tp_in_block / (idx - block_start + 1)
    sum_prec = np.bincount(qs[pos], weights=precision[pos], minlength=n_codes)
    n_true = np.bincount(enc.gt_q, minlength=n_codes)
    _, first = np.unique(enc.gt_q, return_index=True)
    codes = enc.gt_q[np.sort(first)]
    return {enc.query_vocab[c].item(): float(sum_prec[c] / n_true[c]) for c in codes}


# --------------------------------------------------------------------------------------------
# Summary


@dataclass(frozen=True)
class CopyDetectionMetrics:
    """The DISC21 descriptor-track summary.

    Attributes:
        uap: micro average precision.
        recall_at_p90: the largest recall at precision >= 0.9 (0 if never reached).
        threshold_at_p90: its score threshold (``score >= threshold`` ⇒ copy), None if never reached.
        recall_at_1, recall_at_10: R@1 and R@10 over ground-truth pairs, ties against.
        n_queries: distinct query ids seen in the predictions or the ground truth.
        n_positives: ground-truth pairs (N_pos), predicted or not.
    """

    uap: float
    recall_at_p90: float
    threshold_at_p90: float | None
    recall_at_1: float
    recall_at_10: float
    n_queries: int
    n_positives: int

    def to_dict(self) -> dict[str, float | int | None]:
        return dataclasses.asdict(self)


def evaluate(preds: PredictionsLike, gt: GroundTruthLike) -> CopyDetectionMetrics:
    """All summary metrics at once (inputs validated and encoded once).

    Raises:
        MetricsInputError: empty ground truth, or any invalid input.
    """
    enc = _prepare(preds, gt, ranked_ok=False)
    _require_positives(enc, "µAP")
    r90, t90 = _recall_at_precision(enc, 0.9)
    rk = _recall_from_ranks(_ranks(enc), (1, 10))
    return CopyDetectionMetrics(
        uap=_uap(enc),
        recall_at_p90=r90,
        threshold_at_p90=t90,
        recall_at_1=rk[1],
        recall_at_10=rk[10],
        n_queries=len(enc.query_vocab),
        n_positives=enc.n_pos,
    )
