"""95 % intervals of the evaluation's figures: Wilson for rates, bootstrap for µAP and mean R@k."""

from __future__ import annotations

import numpy as np
import pytest

from activeindex import metrics
from activeindex.evaluation.uncertainty import gain_interval, recall_intervals, uap_interval
from activeindex.intervals import wilson_interval


def test_wilson_interval_known_values_and_edges():
    lo, hi = wilson_interval(5, 10)  # textbook value: [0.2366, 0.7634]
    assert lo == pytest.approx(0.23659, abs=1e-4) and hi == pytest.approx(0.76341, abs=1e-4)
    assert wilson_interval(0, 100)[0] == 0.0 and wilson_interval(100, 100)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_recall_and_gain_intervals():
    rng = np.random.default_rng(0)
    ranks = rng.integers(0, 3, size=(14, 100))
    iv = recall_intervals(ranks, 1)
    mean = float((ranks < 1).mean())
    assert iv["mean"][0] <= mean <= iv["mean"][1] and len(iv) == 15
    assert gain_interval(ranks, ranks) == [0.0, 0.0]  # no gain, no uncertainty about it
    better = np.where(ranks > 0, ranks - 1, 0)
    lo, hi = gain_interval(better, ranks)
    assert 0 < lo <= float((better < 1).mean() - mean) <= hi


def test_uap_interval_brackets_the_pooled_uap():
    rng = np.random.default_rng(1)
    queries = [f"q{i}" for i in range(60)]
    gt = [(q, f"r{i}") for i, q in enumerate(queries[:30])]
    preds = [(q, f"r{i}", float(rng.normal(1.0 if i < 30 else 0.0))) for i, q in enumerate(queries)]
    uap = metrics.micro_average_precision(tuple(map(list, zip(*preds))), gt)
    lo, hi = uap_interval(preds, gt, queries)
    assert lo <= uap <= hi and hi - lo > 0.01
    perfect = [(q, r, 1.0) for q, r in gt]
    assert uap_interval(perfect, gt, queries) == [1.0, 1.0]
