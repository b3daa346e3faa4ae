"""Scores and copy decisions: normalisation against a background set, calibrated thresholds.

Score normalisation (METHOD.md §3, as in SSCD and the ISC21 baselines). A raw similarity says how
close a query is to a reference, but not how *unusually* close: some queries (flat skies, text on
white) sit near many images. Subtracting the query's mean similarity to its ``n`` nearest
*background* images (training images, never references) makes scores comparable across queries::

    s'(q, r) = <q, r> − β · mean(top-n <q, b>  over background images b)

so one threshold fits all queries. The background is searched exactly (a flat index): it is small.

Calibration. A copy decision is ``s' >= threshold``. The threshold is chosen, from queries whose
answer is known, as the one with the largest recall among those reaching a target precision
(:func:`activeindex.metrics.recall_at_precision`, ties against us). :class:`CalibrationScores`
keeps the scores it was chosen from, so another precision can be asked for later without images.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from typing import Any

import faiss
import numpy as np

from activeindex import index as ix
from activeindex.errors import ActiveIndexError
from activeindex.metrics import recall_at_precision
from activeindex.settings import DEFAULT_PRECISION  # re-exported (defined there: no torch/FAISS needed)


class CalibrationError(ActiveIndexError):
    """No threshold can be calibrated from the scores given."""


@dataclass(frozen=True)
class Normalization:
    """``s' = s − beta · mean of the top-``n`` background similarities`` (SSCD: β=1, n=3; the ISC21
    docs: β=2, n=10). ``background`` counts the stored background descriptors."""

    beta: float = 1.0
    n: int = 3
    background: int = 0

    def __post_init__(self) -> None:
        if self.n < 1 or self.beta < 0:
            raise ValueError(f"normalisation needs n >= 1 and beta >= 0, got n={self.n}, beta={self.beta}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Background:
    """The background descriptors (nb, d), searched exactly in the collection's score space."""

    def __init__(self, xb: np.ndarray, metric: ix.Metric | str, norm: Normalization) -> None:
        self.metric = ix.Metric(metric)
        xb = np.ascontiguousarray(xb, dtype=np.float32)
        if xb.ndim != 2:
            raise ValueError(f"background descriptors have shape {xb.shape}; expected (n, d)")
        if len(xb) < norm.n:
            raise ValueError(f"{len(xb)} background descriptors, fewer than n={norm.n}")
        self.norm = norm
        self.xb = xb
        self.index = faiss.IndexFlatL2(xb.shape[1]) if self.metric is ix.Metric.L2 else faiss.IndexFlatIP(xb.shape[1])
        self.index.add(xb)

    def offsets(self, xq: np.ndarray) -> np.ndarray:
        """(nq,) float32: β · mean of each query's top-n background similarities."""
        S, _ = ix.search(self.index, xq, self.norm.n, self.metric)
        return (self.norm.beta * S.mean(axis=1)).astype(np.float32)

    def normalize(self, S: np.ndarray, xq: np.ndarray) -> np.ndarray:
        """Normalise similarities (nq, k) of the queries ``xq`` (nq, d)."""
        return (S - self.offsets(xq)[:, None]).astype(np.float32)


@dataclass(frozen=True)
class CalibrationScores:
    """Top-1 scores of calibration queries whose answer is known.

    ``scores`` (n,) is each query's best score; ``correct`` (n,) bool says whether that best match
    is the query's true original. Queries of non-matching images are never correct.
    """

    scores: np.ndarray
    correct: np.ndarray
    matching: np.ndarray  # (n,) bool: the query has an original in the calibration index

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, scores=self.scores, correct=self.correct, matching=self.matching)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> CalibrationScores:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return cls(z["scores"].astype(np.float32), z["correct"].astype(bool), z["matching"].astype(bool))


@dataclass(frozen=True)
class Threshold:
    """A calibrated copy threshold and how it was obtained (stored in ``collection.json``)."""

    threshold: float
    precision_target: float
    recall: float  # recall of matching queries at this threshold, on the calibration queries
    precision: float  # precision reached on the calibration queries
    n_matching: int
    n_nonmatching: int
    method: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def calibrate(cal: CalibrationScores, precision: float = DEFAULT_PRECISION, method: str = "") -> Threshold:
    """The threshold with the largest recall at ``precision`` or more on the calibration queries.

    Each query contributes one prediction, its top-1 (query, match, score); it is a true positive
    when the match is its original. Raises :class:`CalibrationError` when no threshold reaches the
    precision (the descriptor cannot separate copies from non-copies that well).
    """
    n = len(cal.scores)
    if not 0.0 < precision <= 1.0:
        raise CalibrationError(f"precision must be in (0, 1], got {precision}")
    if not cal.matching.any():
        raise CalibrationError("no matching calibration queries: cannot measure recall")
    q = np.arange(n)
    # Reference "id" of a prediction: the query itself when correct (a true pair), else -1 - q (a
    # pair that is not in the ground truth).
    refs = np.where(cal.correct, q, -1 - q)
    gt = np.stack([q[cal.matching], q[cal.matching]], axis=1)
    recall, thr = recall_at_precision((q, refs, cal.scores.astype(np.float64)), gt, precision)
    if thr is None:
        raise CalibrationError(
            f"no threshold reaches precision {precision} on {int(cal.matching.sum())} matching and "
            f"{int((~cal.matching).sum())} non-matching calibration queries; ask for a lower precision"
        )
    chosen = cal.scores >= thr
    reached = float(cal.correct[chosen].sum() / max(1, chosen.sum()))
    return Threshold(
        threshold=float(thr),
        precision_target=float(precision),
        recall=float(recall),
        precision=reached,
        n_matching=int(cal.matching.sum()),
        n_nonmatching=int((~cal.matching).sum()),
        method=method,
    )
