"""Confidence intervals of the rates and metrics an evaluation reports.

- :func:`wilson_interval`: a binomial rate (R@1, a false-positive rate, recall at a threshold)
  seen as ``k`` of ``n``. Wilson's score interval keeps its coverage near the nominal level for
  small ``n`` and for rates near 0 or 1, where the normal ("± 1.96·SE") interval does not.
- :func:`bootstrap_interval`: any statistic of ``n`` independent items (µAP over queries),
  percentile bootstrap over the items with a seeded generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

Z_95 = 1.959963984540054  # two-sided 95 %: the normal's 0.975 quantile


def wilson_interval(k: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a rate ``k / n`` (two-sided 95 % by default); (0, 1) when n = 0."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # The exact ends at k = 0 and k = n are 0 and 1; rounding would put them a hair inside.
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return min(lo, p), max(hi, p)


def bootstrap_interval(
    statistic: Callable[[np.ndarray], float],
    n: int,
    *,
    rounds: int = 200,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(sample)``, where ``sample`` is an index array
    of ``n`` items drawn with replacement (the statistic maps it to a number)."""
    if n <= 0:
        raise ValueError("a bootstrap needs at least one item")
    rng = np.random.default_rng(seed)
    vals = np.asarray([statistic(rng.integers(0, n, n)) for _ in range(rounds)], dtype=np.float64)
    a = (1 - level) / 2
    return float(np.quantile(vals, a)), float(np.quantile(vals, 1 - a))
