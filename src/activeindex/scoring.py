"""Scores and copy decisions: normalisation against a background set, calibrated thresholds.

Score normalisation (METHOD.md §3, as in SSCD and the ISC21 baselines). A raw similarity says how
close a query is to a reference, but not how *unusually* close: some queries (flat skies, text on
white) sit near many images. Subtracting the query's mean similarity to its ``n`` nearest
*background* images (training images, never references) makes scores comparable across queries::

    s'(q, r) = <q, r> − β · mean(top-n <q, b>  over background images b)      (β = 0.75, n = 5)

so one threshold fits all queries. The background is searched exactly (a flat index): it is small.

Calibration. A copy decision is ``s' >= threshold`` on a query's best match. The threshold is
chosen, from queries whose answer is known, for a *false-positive rate*: the share of non-matching
queries it flags. Unlike precision, that rate does not depend on how many of a user's queries are
copies, which nobody knows; the precision it implies is stated only for an explicit prior
(copies per non-copy). What is held is an upper confidence bound on the rate (Clopper–Pearson),
so a small calibration set cannot promise more than it shows. Several edits of one calibration
image are several queries, but not independent ones (an image that looks like many others is
flagged under most of its edits): the bound then counts them through the design effect measured
on the calibration queries themselves (:func:`design_effect`). :class:`CalibrationScores` keeps
the scores it was chosen from, so another target can be asked for later without images.
"""

from __future__ import annotations

import io
import logging
from dataclasses import asdict, dataclass, replace
from typing import Any

import faiss
import numpy as np

from activeindex import index as ix
from activeindex.errors import ActiveIndexError
from activeindex.settings import DEFAULT_FPR  # noqa: F401 re-exported (defined there: no torch/FAISS needed)
from activeindex.settings import QueryMode

logger = logging.getLogger(__name__)

DEFAULT_CONFIDENCE = 0.95  # of the upper bound on the false-positive rate that is held
SINGLE_VIEW = QueryMode.SINGLE.value  # the query mode: one descriptor per query image


class CalibrationError(ActiveIndexError):
    """No threshold can be calibrated from the scores given."""


@dataclass(frozen=True)
class Normalization:
    """``s' = s − beta · mean of the top-``n`` background similarities`` (SSCD: β=1, n=3; the ISC21
    docs: β=2, n=10). ``background`` counts the stored background descriptors.

    The default, β=0.75, n=5, was chosen on calibration data only (bench/copy_fpr.py's calibration
    queries, builtin descriptor, against the filled index, 4 edits per image): among β in {0.25,
    0.5, 0.75, 1} and n in {1, 3, 5, 10}, it kept the most calibration copies at a 1 % false-positive
    rate on those queries, averaged over IVF64,PQ8x8 and IVF64,PQ32x8 (43 % and 55 %; SSCD's β=1,
    n=3: 32 % and 51 %)."""

    beta: float = 0.75
    n: int = 5
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
    # (n,) int: the calibration image each query is an edit of (edits of one image are not
    # independent queries); None: each query is an edit of its own image.
    groups: np.ndarray | None = None

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        extra = {} if self.groups is None else {"groups": self.groups}
        np.savez(buf, scores=self.scores, correct=self.correct, matching=self.matching, **extra)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> CalibrationScores:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            groups = z["groups"].astype(np.int64) if "groups" in z.files else None
            return cls(z["scores"].astype(np.float32), z["correct"].astype(bool), z["matching"].astype(bool), groups)


@dataclass(frozen=True)
class CopyTarget:
    """What a copy threshold is calibrated for (built once at the edge, e.g. from CLI options).

    ``fpr``: the share of non-matching queries flagged as copies (the default, 1 %). It does not
    depend on how many of a user's queries are copies, so it means the same on every stream.
    ``precision`` (with ``fpr=None``): the share of flags that are right, which depends on that
    mix; it therefore needs ``prior``, the number of copies per non-copy among the queries
    (0.01: one query in 101 is a copy). ``prior`` alone, with ``fpr``, only states the precision
    the threshold implies. ``confidence``: the FPR that is held is an upper confidence bound
    (one-sided Clopper–Pearson) on the calibration queries, not their raw rate (see
    :func:`fpr_upper_bound`). ``query_mode`` names how queries are searched (``single`` or
    ``dihedral``, :class:`QueryMode`); the dihedral mode searches 8 views per query, flags more
    non-matching queries at a given score, and has its own calibration scores and threshold.
    """

    fpr: float | None = DEFAULT_FPR
    precision: float | None = None
    prior: float | None = None
    confidence: float = DEFAULT_CONFIDENCE
    query_mode: str = SINGLE_VIEW

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "query_mode", QueryMode(self.query_mode).value)
        except ValueError:
            raise CalibrationError(
                f"unknown query mode {self.query_mode!r}; one of {', '.join(m.value for m in QueryMode)}") from None
        if (self.fpr is None) == (self.precision is None):
            raise CalibrationError("calibrate for a false-positive rate or for a precision, not both")
        if self.fpr is not None and not 0.0 < self.fpr < 1.0:
            raise CalibrationError(f"the target false-positive rate must be in (0, 1), got {self.fpr}")
        if self.precision is not None:
            if not 0.0 < self.precision < 1.0:
                raise CalibrationError(f"the target precision must be in (0, 1), got {self.precision}")
            if self.prior is None:
                raise CalibrationError(
                    "a target precision needs --prior (copies per non-copy among your queries, e.g. 0.01): "
                    "precision depends on that mix; or calibrate for a false-positive rate (--target-fpr)"
                )
        if self.prior is not None and not self.prior > 0.0:
            raise CalibrationError(f"the prior (copies per non-copy) must be > 0, got {self.prior}")
        if not 0.5 <= self.confidence < 1.0:
            raise CalibrationError(f"confidence must be in [0.5, 1), got {self.confidence}")


@dataclass(frozen=True)
class Threshold:
    """A calibrated copy threshold and how it was obtained (stored in ``collection.json``).

    Rates are measured on the calibration queries, a decision being "the query's best score is
    ``>= threshold``": ``fpr`` is the share of non-matching queries flagged, ``fpr_upper`` its
    one-sided upper confidence bound, ``recall`` the share of matching queries flagged *with
    their true original as the best match*, ``wrong`` the share flagged with another image.
    ``precision`` is the precision implied for ``prior`` (copies per non-copy), computed with
    ``fpr_upper``; None without a prior.
    """

    threshold: float
    target: str  # "fpr" or "precision"
    target_fpr: float | None
    target_precision: float | None
    prior: float | None
    fpr: float
    fpr_upper: float
    confidence: float
    bound_met: bool  # fpr_upper <= target_fpr (False: too few non-matching queries to show it)
    recall: float
    wrong: float
    precision: float | None
    n_matching: int
    n_nonmatching: int
    query_mode: str
    method: str
    n_indexed: int | None = None  # images in the index when calibrated: the FPR grows with it
    # Distinct calibration images behind the non-matching queries (each went through several
    # edits when fewer than n_nonmatching), and the design effect the bound used at the threshold.
    n_nonmatching_images: int | None = None
    design_effect: float = 1.0
    meaning: str = ""  # the decision in words (filled from the rest, see describe_threshold)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fpr_upper_bound(flagged: np.ndarray | int, n: int, confidence: float = DEFAULT_CONFIDENCE,
                    deff: np.ndarray | float = 1.0) -> np.ndarray:
    """One-sided Clopper–Pearson upper bound on a rate seen as ``flagged`` of ``n`` (exact, so it
    holds for small counts, where the normal approximation does not). ``flagged = n`` gives 1.

    ``deff`` (>= 1, scalar or one per ``flagged``): the design effect of clustered queries; the
    bound is then Clopper–Pearson on the effective sample, ``flagged / deff`` of ``n / deff``
    (Korn & Graubard 1998, "Confidence intervals for proportions with small expected number of
    positive counts estimated from survey data"). ``deff = 1``: independent queries."""
    from scipy.stats import beta  # scipy comes with scikit-image; imported here, not at import time

    k = np.asarray(flagged, dtype=np.float64)
    d = np.asarray(deff, dtype=np.float64)
    if np.any(d < 1.0):
        raise ValueError(f"a design effect is at least 1, got {d.min()}")
    ke, ne = k / d, n / d
    upper = beta.ppf(confidence, ke + 1, np.maximum(ne - ke, 1e-12))
    return np.where(k >= n, 1.0, upper)


def design_effect(scores: np.ndarray, groups: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """(t,) float64: the design effect of the decision ``score >= threshold`` on queries that come
    in ``groups`` (n,) (several edits of one image), at each of ``thresholds`` (t,).

    It is the variance of the flagged share estimated between groups (the ratio estimator's,
    ``sum_g (f_g - p n_g)^2 / N^2`` with ``f_g`` of the group's ``n_g`` queries flagged, ``N`` in all,
    ``p = sum f_g / N``) over the binomial one, ``p (1 - p) / N``. It is 1 exactly when every group
    is one query, the group size when a group's queries are all flagged or none, and is never
    taken below 1 (the queries are never credited with more than independence). Where nothing is
    flagged no dependence can be measured, so none is assumed away: the design effect is then the
    mean group size (a group counts as one query); where everything is, 1 (the bound is 1 anyway)."""
    scores = np.asarray(scores, dtype=np.float64)
    _, g = np.unique(np.asarray(groups), return_inverse=True)
    sizes = np.bincount(g).astype(np.float64)
    n = len(scores)
    if sizes.max() == 1:  # independent queries, exactly (the formula gives it up to rounding)
        return np.ones(len(thresholds))

    def count_ge(x: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
        order = np.argsort(x)
        cw = np.concatenate([[0.0], np.cumsum(np.ones(len(x)) if w is None else w[order])])
        return cw[-1] - cw[np.searchsorted(x[order], thresholds, side="left")]

    # sum_g f_g^2 counts the ordered pairs of one group's queries (a query with itself included)
    # that are both flagged: those whose lower score is >= the threshold.
    by_group = np.split(scores[np.argsort(g, kind="stable")], np.cumsum(sizes)[:-1].astype(int))
    pair_min = np.concatenate([np.minimum.outer(x, x).ravel() for x in by_group])
    sum_f2 = count_ge(pair_min)
    sum_fn = count_ge(scores, sizes[g])
    f = count_ge(scores)
    p = f / n
    between = sum_f2 - 2 * p * sum_fn + p * p * float((sizes ** 2).sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        d = between / (n * p * (1 - p))
    return np.where(f == 0, n / len(sizes), np.where(f < n, np.maximum(d, 1.0), 1.0))


def implied_precision(recall: float, wrong: float, fpr: float, prior: float) -> float:
    """Share of flags that are right when there are ``prior`` copies per non-copy.

    Per non-matching query: ``prior`` matching ones, of which ``recall`` are flagged with their
    original and ``wrong`` with another image; ``fpr`` of the non-matching one is flagged."""
    tp = prior * recall
    flagged = prior * (recall + wrong) + fpr
    return float(tp / flagged) if flagged > 0 else 1.0


def _rates(cal: CalibrationScores, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts of (non-matching flagged, matching flagged right, matching flagged wrong) per threshold."""
    def count_ge(x: np.ndarray) -> np.ndarray:
        xs = np.sort(x)
        return len(xs) - np.searchsorted(xs, thresholds, side="left")

    s = cal.scores.astype(np.float64)
    return (count_ge(s[~cal.matching]), count_ge(s[cal.matching & cal.correct]),
            count_ge(s[cal.matching & ~cal.correct]))


def calibrate(cal: CalibrationScores, target: CopyTarget = CopyTarget(), method: str = "") -> Threshold:
    """The lowest threshold (the most recall) meeting ``target`` on the calibration queries.

    For a false-positive rate F: the lowest threshold whose upper confidence bound on the FPR is at
    most F, and every stricter one's too. With ``cal.groups``, the bound is on the effective sample
    of the non-matching queries (:func:`design_effect`). With few non-matching queries even
    flagging none cannot show F (e.g. fewer than 299 for F = 1 % at 95 %; with groups, fewer than
    299 groups): the threshold is then put above every non-matching score and ``bound_met`` is
    False (a warning is logged). For a precision P at a prior: the lowest threshold whose implied
    precision, with the FPR's upper bound, is at least P; :class:`CalibrationError` if none is.
    Ties count against us: a decision is ``score >= threshold``.
    """
    if not cal.matching.any():
        raise CalibrationError("no matching calibration queries: cannot measure recall")
    n_non, n_match = int((~cal.matching).sum()), int(cal.matching.sum())
    if n_non == 0:
        raise CalibrationError("no non-matching calibration queries: cannot measure the false-positive rate")
    s = cal.scores.astype(np.float32)
    # Candidates: just above each score (it and everything below stop being flagged), and the
    # lowest score itself (everything flagged). Sorted from high to low threshold. The step up is
    # a float32 one: scores are float32, and a threshold between two float32 values would round
    # back onto the score it should exclude when compared with float32 arrays.
    cands = np.unique(np.concatenate([np.nextafter(s, np.float32(np.inf)), [s.min()]])).astype(np.float64)[::-1]
    n_fp, n_tp, n_wrong = _rates(cal, cands)
    groups = None if cal.groups is None else np.asarray(cal.groups)[~cal.matching]
    deff = np.ones(len(cands)) if groups is None else design_effect(s[~cal.matching], groups, cands)
    # The design effect is re-measured at each threshold, so the bound is not monotone in it: a
    # threshold qualifies only if every stricter one does too (running maximum from the top).
    upper = np.maximum.accumulate(fpr_upper_bound(n_fp, n_non, target.confidence, deff))
    recall, wrong = n_tp / n_match, n_wrong / n_match
    if target.fpr is not None:
        ok = np.flatnonzero(upper <= target.fpr)
        bound_met = ok.size > 0
        if not bound_met:
            # Flag no non-matching calibration query: the best that can be shown with this few.
            ok = np.flatnonzero(n_fp == 0)
            logger.warning(
                "%d non-matching calibration queries cannot show a false-positive rate of %g at %g "
                "confidence (at best %.3g); the threshold flags none of them: calibrate with more images",
                n_non, target.fpr, target.confidence, float(upper[ok[-1]]))
        best = ok[-1]  # the lowest threshold that qualifies
    else:
        assert target.precision is not None and target.prior is not None
        prec = np.asarray([implied_precision(r, w, f, target.prior) for r, w, f in zip(recall, wrong, upper)])
        ok = np.flatnonzero((prec >= target.precision) & (n_tp > 0))
        if ok.size == 0:
            raise CalibrationError(
                f"no threshold reaches precision {target.precision} for {target.prior:g} copies per "
                f"non-copy on {n_match} matching and {n_non} non-matching calibration queries; ask for "
                "a lower precision, a larger prior, or calibrate with more images"
            )
        best = ok[np.argmax(recall[ok])]
        bound_met = True
    thr = Threshold(
        threshold=float(cands[best]),
        target="fpr" if target.fpr is not None else "precision",
        target_fpr=target.fpr,
        target_precision=target.precision,
        prior=target.prior,
        fpr=float(n_fp[best] / n_non),
        fpr_upper=float(upper[best]),
        confidence=target.confidence,
        bound_met=bool(bound_met),
        recall=float(recall[best]),
        wrong=float(wrong[best]),
        precision=None if target.prior is None else implied_precision(
            float(recall[best]), float(wrong[best]), float(upper[best]), target.prior),
        n_matching=n_match,
        n_nonmatching=n_non,
        query_mode=target.query_mode,
        method=method,
        n_nonmatching_images=n_non if groups is None else len(np.unique(groups)),
        design_effect=float(deff[best]),
    )
    return replace(thr, meaning=describe_threshold(thr.to_dict()))


def _one_in(rate: float) -> str:
    """0.01 → "1 in 100"; 0.0035 → "1 in 290" (two significant digits)."""
    if rate <= 0:
        return "none"
    n = 1.0 / rate
    return f"1 in {float(f'{n:.2g}'):g}"


# A threshold calibrated with n images indexed is stale once the index holds more than this many
# times as many (and at least STALE_MIN_INDEXED more): each non-matching query meets more codes.
STALE_FACTOR = 2
STALE_MIN_INDEXED = 50


def threshold_is_stale(info: dict[str, Any] | None, indexed_now: int) -> bool:
    """Whether the index has grown enough since calibration that the stated false-positive rate no
    longer holds (the rate of a fixed threshold grows with the number of stored codes)."""
    calibrated_at = (info or {}).get("n_indexed")
    return calibrated_at is not None and indexed_now > STALE_FACTOR * max(calibrated_at, STALE_MIN_INDEXED)


DIHEDRAL_FIX = "activeindex calibrate COLLECTION"


def no_dihedral_threshold(fix: str = DIHEDRAL_FIX) -> str:
    """What a dihedral query says on a collection without a dihedral threshold (``fix``: the
    command that calibrates one)."""
    return ("no dihedral copy threshold: this collection was calibrated without dihedral queries (8 "
            "rotations/flips per query), which flag more unrelated images than single ones at the same "
            "score, so the single-view threshold does not apply: matches are ranked, not flagged as "
            f"copies; calibrate one with: {fix}")


def describe_threshold(info: dict[str, Any] | None, mode: QueryMode | str = QueryMode.SINGLE,
                       fix: str = DIHEDRAL_FIX, *, indexed_now: int | None = None) -> str:
    """The copy decision in words, for ``info``, ``query --json``, the web page and the report.

    Takes :meth:`Threshold.to_dict` (or what ``collection.json`` stores, including the precision
    targets of collections calibrated before false-positive rates) of the query ``mode``'s
    threshold; ``fix`` is named when a dihedral threshold is missing. With ``indexed_now`` (the
    collection's size), a stale calibration is said first."""
    mode = QueryMode(mode)
    if mode is QueryMode.DIHEDRAL:
        if info is None:
            return no_dihedral_threshold(fix)
        return "dihedral queries (8 rotations/flips, each reference's best): " + describe_threshold(
            info, indexed_now=indexed_now)
    if indexed_now is not None and threshold_is_stale(info, indexed_now):
        assert info is not None
        return (f"STALE: calibrated with {info['n_indexed']} images indexed, now {indexed_now}, so it flags "
                f"more unrelated images than stated; recalibrate (activeindex calibrate COLLECTION). "
                f"As calibrated: {describe_threshold(info)}")
    if info is None:
        return "no calibrated copy threshold: matches are not flagged as copies"
    thr = info.get("threshold")
    if "fpr_upper" not in info:  # calibrated for a precision on a 1:1 mix (format of 0.1.0)
        return (f"score >= {thr:.4f}: calibrated for precision {info.get('precision_target')} on as many "
                "copies as non-copies, which does not hold for other mixes; recalibrate "
                "(activeindex calibrate COLLECTION) for a false-positive rate")
    n_non, n_fp = info["n_nonmatching"], round(info["fpr"] * info["n_nonmatching"])
    n_img = info.get("n_nonmatching_images") or n_non
    of_images = "" if n_img == n_non else f", edits of {n_img} images, counted as dependent"
    text = (f"score >= {thr:.4f} flags at most about {_one_in(info['fpr_upper'])} unrelated images "
            f"({info['confidence'] * 100:g} % upper bound: {n_fp} of {n_non} non-matching calibration queries "
            f"flagged{of_images}) and finds {info['recall'] * 100:.0f} % of edited copies (of {info['n_matching']})")
    if info.get("n_indexed") is not None:
        text += f", calibrated against {info['n_indexed']} indexed images"
    if info.get("prior") is not None and info.get("precision") is not None:
        text += (f"; with {info['prior']:g} copies per non-copy among the queries, at least "
                 f"{info['precision'] * 100:.0f} % of flags are copies")
    if info.get("target") == "fpr" and not info.get("bound_met", True):
        text += (f"; too few non-matching calibration queries to show the target "
                 f"{info['target_fpr'] * 100:g} %: calibrate with more images")
    return text
