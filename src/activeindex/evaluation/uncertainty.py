"""How uncertain an evaluation's figures are: 95 % intervals for R@k, µAP and gains over passive.

- R@k of one edit is a rate over ``n`` images: a Wilson interval (:func:`activeindex.intervals.wilson_interval`).
- Mean R@k over the 14 edits, and its gain over passive, average rates that share the same images
  (an image easy under one edit is easy under others), so they are bootstrapped over *images*:
  each round draws ``n`` images with replacement and recomputes the figure; the gain is *paired*
  (the same draw for both methods), which is what makes a small gain measurable at all.
- µAP pools every query's predictions; it is bootstrapped over *queries*, matching and
  non-matching ones drawn separately so that every round keeps the mix of the evaluation.

Rounds are seeded: the same run gives the same intervals.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from activeindex import metrics
from activeindex.intervals import bootstrap_interval, wilson_interval

ROUNDS = 200  # bootstrap rounds: the interval's ends move by ~0.005 between seeds at n = 100


def recall_intervals(ranks: np.ndarray, k: int, rounds: int = ROUNDS, seed: int = 0) -> dict[str, list[float]]:
    """``ranks`` (n_edits, n_images) of the true original (``k`` or more: not found in the top k).
    Returns per edit position (as str) a Wilson interval, and ``"mean"`` a bootstrap interval."""
    hit = ranks < k
    out = {str(e): list(wilson_interval(int(h.sum()), h.size)) for e, h in enumerate(hit)}
    out["mean"] = list(bootstrap_interval(lambda s: float(hit[:, s].mean()), hit.shape[1], rounds=rounds, seed=seed))
    return out


def gain_interval(ranks: np.ndarray, base: np.ndarray, k: int = 1, rounds: int = ROUNDS, seed: int = 0) -> list[float]:
    """Paired bootstrap interval of mean R@k(``ranks``) − mean R@k(``base``), same images."""
    diff = (ranks < k).mean(axis=0) - (base < k).mean(axis=0)  # (n_images,) per-image gain over edits
    return list(bootstrap_interval(lambda s: float(diff[s].mean()), len(diff), rounds=rounds, seed=seed))


def uap_interval(
    predictions: Sequence[tuple[str, str, float]],
    gt: Sequence[tuple[str, str]],
    queries: Sequence[str],
    rounds: int = ROUNDS,
    seed: int = 0,
) -> list[float]:
    """Bootstrap interval of µAP over ``queries`` (all of them, predicted or not), stratified by
    whether a query has a ground-truth pair."""
    qindex = {q: i for i, q in enumerate(queries)}
    refs = {r: i for i, r in enumerate(sorted({r for _, r, _ in predictions} | {r for _, r in gt}))}
    pq = np.asarray([qindex[q] for q, _, _ in predictions], dtype=np.int64)
    pr = np.asarray([refs[r] for _, r, _ in predictions], dtype=np.int64)
    ps = np.asarray([s for _, _, s in predictions], dtype=np.float64)
    truth = np.full(len(queries), -1, np.int64)
    for q, r in gt:
        truth[qindex[q]] = refs[r]
    pos, neg = np.flatnonzero(truth >= 0), np.flatnonzero(truth < 0)
    order = np.argsort(pq, kind="stable")
    starts = np.searchsorted(pq[order], np.arange(len(queries) + 1))
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(rounds):
        draw = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg)) if len(neg) else neg])
        # Each drawn query is a new query (j), its predictions copied under that id.
        rows = [order[starts[q] : starts[q + 1]] for q in draw]
        lengths = np.asarray([len(r) for r in rows])
        sel = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        qid = np.repeat(np.arange(len(draw)), lengths)
        gt_b = np.stack([np.arange(len(draw)), truth[draw]], axis=1)[truth[draw] >= 0]
        vals.append(metrics.micro_average_precision((qid, pr[sel], ps[sel]), gt_b))
    return [float(np.quantile(vals, 0.025)), float(np.quantile(vals, 0.975))]
