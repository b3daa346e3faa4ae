"""Copy-detection metrics against hand-worked cases and a brute-force reference on random data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from activeindex import metrics as M
from activeindex.errors import ActiveIndexError


def _preds(rows):
    """Predictions from (query, reference, score) rows."""
    q, r, s = zip(*rows) if rows else ((), (), ())
    return M.Predictions(list(q), list(r), list(s))


# ------------------------------------------------------------------------------------------------
# µAP and the curve


def test_perfect_ranking_has_uap_one():
    gt = [(0, 10), (1, 11), (2, 12)]
    preds = _preds([(0, 10, 0.9), (1, 11, 0.8), (2, 12, 0.7), (0, 99, 0.2), (3, 98, 0.1)])
    assert M.micro_average_precision(preds, gt) == 1.0


def test_uap_hand_case_with_an_unpredicted_pair():
    # Pooled order (score, label): 0.9 P, 0.8 N, 0.7 P, 0.6 N, 0.5 P; a 4th true pair (9, 9) is
    # never predicted, so N_pos = 4. Precision at each positive: 1/1, 2/3, 3/5.
    # µAP = (1 + 2/3 + 3/5) / 4 = (15 + 10 + 9) / 15 / 4 = 34/60 = 17/30.
    gt = [(0, 0), (1, 1), (2, 2), (9, 9)]
    preds = _preds([(1, 1, 0.7), (0, 0, 0.9), (0, 5, 0.8), (2, 2, 0.5), (3, 3, 0.6)])
    assert M.micro_average_precision(preds, gt) == pytest.approx(17 / 30)
    precision, recall, thresholds = M.precision_recall_curve(preds, gt)
    np.testing.assert_allclose(precision, [1, 1 / 2, 2 / 3, 2 / 4, 3 / 5])
    np.testing.assert_allclose(recall, [1 / 4, 1 / 4, 2 / 4, 2 / 4, 3 / 4])
    np.testing.assert_allclose(thresholds, [0.9, 0.8, 0.7, 0.6, 0.5])
    # The curve is the one µAP integrates.
    assert np.sum(np.diff(recall, prepend=0) * precision) == pytest.approx(17 / 30)


def test_never_predicted_pairs_reduce_recall():
    preds = _preds([(0, 0, 0.9)])
    assert M.micro_average_precision(preds, [(0, 0)]) == 1.0
    assert M.micro_average_precision(preds, [(0, 0), (1, 1), (2, 2), (3, 3)]) == 0.25
    assert M.micro_average_precision(_preds([]), [(0, 0)]) == 0.0


@pytest.mark.parametrize("negative_first_in_input", [True, False])
def test_tie_between_positive_and_negative_is_pessimistic(negative_first_in_input):
    # Equal scores: the negative is ranked first whatever the input order, so the positive sits at
    # position 2 with precision 1/2: µAP = 1/2 (the optimistic order would give 1).
    rows = [(1, 7, 0.5), (0, 3, 0.5)]
    preds = _preds(rows if negative_first_in_input else rows[::-1])
    gt = [(0, 3)]
    assert M.micro_average_precision(preds, gt) == 0.5
    precision, recall, _ = M.precision_recall_curve(preds, gt)
    np.testing.assert_array_equal(precision, [0.0, 0.5])
    np.testing.assert_array_equal(recall, [0.0, 1.0])


def test_tie_group_in_the_middle():
    # 0.9 P | tie at 0.5: P, N, P | 0.1 N.  N_pos = 3.
    # Pessimistic order inside the tie: N, P, P -> positions 3 and 4 -> precision 2/3 and 3/4.
    # µAP = (1 + 2/3 + 3/4) / 3 = (12 + 8 + 9) / 12 / 3 = 29/36.
    gt = [(0, 0), (1, 1), (2, 2)]
    preds = _preds([(0, 0, 0.9), (1, 1, 0.5), (5, 5, 0.5), (2, 2, 0.5), (6, 6, 0.1)])
    assert M.micro_average_precision(preds, gt) == pytest.approx(29 / 36)


def test_non_matching_queries_only_add_negatives():
    gt = [(0, 0), (1, 1)]
    base = [(0, 0, 0.9), (1, 1, 0.6)]
    assert M.micro_average_precision(_preds(base), gt) == 1.0
    # Query 7 has no true match: its predictions, even of references that are true for another
    # query, are negatives. Ranked 2nd, it drops the 2nd positive's precision to 2/3.
    with_nonmatching = base + [(7, 0, 0.8), (7, 1, 0.1)]
    assert M.micro_average_precision(_preds(with_nonmatching), gt) == pytest.approx((1 + 2 / 3) / 2)


def test_duplicate_predictions_count_once_with_best_score():
    gt = [(0, 0)]
    # (0, 0) at 0.2 and 0.9: kept once at 0.9, above the negative at 0.5.
    assert M.micro_average_precision(_preds([(0, 0, 0.2), (0, 1, 0.5), (0, 0, 0.9)]), gt) == 1.0
    # A negative predicted twice counts once: precision at the positive is 1/2, not 1/3.
    rows = [(0, 1, 0.8), (0, 1, 0.8), (0, 0, 0.7)]
    assert M.micro_average_precision(_preds(rows), gt) == 0.5
    assert len(M.precision_recall_curve(_preds(rows), gt)[0]) == 2


def test_string_ids_and_parallel_arrays_give_the_same_result():
    gt_int = [(0, 0), (1, 1), (2, 2), (9, 9)]
    q = np.array([1, 0, 0, 2, 3])
    r = np.array([1, 0, 5, 2, 3])
    s = np.array([0.7, 0.9, 0.8, 0.5, 0.6])
    gt_str = [(f"Q{a}", f"R{b}") for a, b in gt_int]
    as_str = (np.array([f"Q{v}" for v in q]), np.array([f"R{v}" for v in r]), s)
    assert M.micro_average_precision((q, r, s), gt_int) == pytest.approx(17 / 30)
    assert M.micro_average_precision(as_str, gt_str) == pytest.approx(17 / 30)
    assert M.micro_average_precision(as_str, np.array(gt_str)) == pytest.approx(17 / 30)


# ------------------------------------------------------------------------------------------------
# Recall at precision


def test_recall_at_p90_hand_case():
    # Pooled labels by decreasing score 1.00, 0.99, ...: P×9, N, P, N, N; N_pos = 12 (two true
    # pairs never predicted). Prefix precisions: 9/9, 9/10 = 0.9 (recall 9/12), 10/11 ≈ 0.909
    # (recall 10/12), 10/12, 10/13. Best: recall 10/12 at the 11th score, 0.90.
    labels = [1] * 9 + [0, 1, 0, 0]
    rows = [(i, i if lab else 100 + i, 1.0 - 0.01 * i) for i, lab in enumerate(labels)]
    gt = [(i, i) for i, lab in enumerate(labels) if lab] + [(50, 50), (51, 51)]
    recall, threshold = M.recall_at_precision(_preds(rows), gt, 0.9)
    assert recall == pytest.approx(10 / 12)
    assert threshold == pytest.approx(0.90)
    # A stricter target stops before the first negative.
    assert M.recall_at_precision(_preds(rows), gt, 1.0) == (pytest.approx(9 / 12), pytest.approx(0.92))


def test_recall_at_p90_not_reached():
    # N, P, P: precisions 0, 1/2, 2/3 -> no prefix reaches 0.9.
    rows = [(0, 5, 0.9), (0, 0, 0.8), (1, 1, 0.7)]
    assert M.recall_at_precision(_preds(rows), [(0, 0), (1, 1)], 0.9) == (0.0, None)
    assert M.recall_at_precision(_preds([]), [(0, 0)], 0.9) == (0.0, None)


def test_recall_at_precision_threshold_ends_a_tie_group():
    # P at 0.9, then a tie at 0.5 of P, P, N: pessimistic order N, P, P gives precisions 1, 1/2,
    # 2/3, 3/4: the target 0.75 is met at the end of the tie, with threshold 0.5.
    rows = [(0, 0, 0.9), (1, 1, 0.5), (2, 2, 0.5), (3, 9, 0.5)]
    gt = [(0, 0), (1, 1), (2, 2)]
    assert M.recall_at_precision(_preds(rows), gt, 0.75) == (1.0, 0.5)
    assert M.recall_at_precision(_preds(rows), gt, 0.8) == (pytest.approx(1 / 3), 0.9)


# ------------------------------------------------------------------------------------------------
# Ranks and R@k


def test_ranks_and_recall_at_k_with_ties_and_a_missing_match():
    rows = [
        (1, 1, 0.9), (1, 2, 0.8), (1, 3, 0.8),  # true ref 3 ties with ref 2: rank 1 + 2 = 3
        (2, 5, 0.7), (2, 6, 0.3),  # true ref 5 first: rank 1
        (3, 7, 0.9),  # true ref 8 never predicted: rank inf
        (4, 1, 0.99), (4, 2, 0.98),  # non-matching query: not in R@k
    ]  # fmt: skip
    gt = [(1, 3), (2, 5), (3, 8)]
    np.testing.assert_array_equal(M.ranks(_preds(rows), gt), [3, 1, math.inf])
    assert M.recall_at_k(_preds(rows), gt, ks=(1, 2, 3, 10)) == {
        1: pytest.approx(1 / 3), 2: pytest.approx(1 / 3), 3: pytest.approx(2 / 3), 10: pytest.approx(2 / 3)
    }  # fmt: skip


def test_a_tie_at_the_top_costs_rank_one():
    rows = [(0, 1, 0.5), (0, 0, 0.5)]
    assert M.ranks(_preds(rows), [(0, 0)]).tolist() == [2.0]
    assert M.recall_at_k(_preds(rows), [(0, 0)], ks=(1, 2)) == {1: 0.0, 2: 1.0}


def test_recall_at_k_from_ranked_lists():
    ranked = {"a": ["x", "y", "z"], "b": ["z", "y"], "c": ["x"]}
    gt = [("a", "y"), ("b", "z"), ("c", "w")]
    np.testing.assert_array_equal(M.ranks(ranked, gt), [2, 1, math.inf])
    assert M.recall_at_k(ranked, gt, ks=[1, 2]) == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3)}


def test_recall_at_k_from_knn():
    I = np.array([[5, 3, 8], [2, 7, 9], [1, 6, -1], [7, 8, 9]])
    S = np.array([[0.9, 0.8, 0.1], [0.9, 0.8, 0.7], [0.5, 0.5, -np.inf], [0.9, 0.8, 0.7]])
    # q0: true 3 second -> rank 2. q1: no true match, excluded. q2: true 1 ties with 6 -> rank 2
    # (the -1 slot is padding and ignored). q3: true 2 not retrieved -> rank inf.
    true_ids = [3, None, 1, 2]
    got = M.recall_at_k_from_knn(I, S, true_ids, ks=(1, 2, 10))
    assert got == {1: 0.0, 2: pytest.approx(2 / 3), 10: pytest.approx(2 / 3)}
    # -1 works as "no match" too, and NaN in a padded slot is ignored.
    S_nan = S.copy()
    S_nan[2, 2] = np.nan
    assert M.recall_at_k_from_knn(I, S_nan, np.array([3, -1, 1, 2]), ks=(1, 2, 10)) == got


def test_knn_helper_equals_the_general_path():
    rng = np.random.default_rng(3)
    nq, k = 30, 6
    I = rng.integers(0, 12, size=(nq, k))
    S = rng.integers(0, 4, size=(nq, k)) / 4.0
    true_ids = rng.integers(-1, 12, size=nq)
    has = true_ids >= 0
    preds = (np.repeat(np.arange(nq), k), I.ravel(), S.ravel())
    gt = [(q, int(t)) for q, t in enumerate(true_ids) if t >= 0]
    assert has.any()
    assert M.recall_at_k_from_knn(I, S, true_ids, ks=(1, 3)) == M.recall_at_k(preds, gt, ks=(1, 3))


# ------------------------------------------------------------------------------------------------
# AP per query and the summary


def test_average_precision_per_query():
    rows = [
        ("q1", "a", 0.9), ("q1", "x", 0.8), ("q1", "b", 0.7),  # P N P, 3 true (c unpredicted)
        ("q2", "y", 0.6), ("q2", "d", 0.6),  # tie: N before P -> precision 1/2
        ("q3", "z", 0.9),  # non-matching: absent from the result
    ]  # fmt: skip
    gt = [("q2", "d"), ("q1", "a"), ("q1", "b"), ("q1", "c"), ("q4", "e")]
    ap = M.average_precision_per_query(_preds(rows), gt)
    assert list(ap) == ["q2", "q1", "q4"]
    assert ap["q1"] == pytest.approx((1 + 2 / 3) / 3)  # = 5/9
    assert ap["q2"] == 0.5
    assert ap["q4"] == 0.0  # true match, no prediction


def test_evaluate_summary():
    # Same data as the R@P90 hand case.
    labels = [1] * 9 + [0, 1, 0, 0]
    rows = [(i, i if lab else 100 + i, 1.0 - 0.01 * i) for i, lab in enumerate(labels)]
    gt = [(i, i) for i, lab in enumerate(labels) if lab] + [(50, 50), (51, 51)]
    m = M.evaluate(_preds(rows), gt)
    assert m.uap == pytest.approx(M.micro_average_precision(_preds(rows), gt))
    assert m.uap == pytest.approx((9 + 10 / 11) / 12)
    assert m.recall_at_p90 == pytest.approx(10 / 12) and m.threshold_at_p90 == pytest.approx(0.90)
    assert m.recall_at_1 == pytest.approx(10 / 12) and m.recall_at_10 == pytest.approx(10 / 12)
    assert (m.n_queries, m.n_positives) == (15, 12)
    d = m.to_dict()
    assert set(d) == {
        "uap", "recall_at_p90", "threshold_at_p90", "recall_at_1", "recall_at_10", "n_queries", "n_positives"
    }  # fmt: skip
    with pytest.raises(AttributeError):
        m.uap = 0.0  # type: ignore[misc]
    assert M.evaluate(_preds([(0, 1, 0.5)]), [(0, 0)]).threshold_at_p90 is None


# ------------------------------------------------------------------------------------------------
# Invalid inputs


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: M.Predictions([0, 1], [0], [0.1, 0.2]), "parallel"),
        (lambda: M.Predictions([0], [0], [float("nan")]), "NaN"),
        (lambda: M.Predictions([0], [0], ["high"]), "numbers"),
        (lambda: M.Predictions(np.zeros((2, 2), int), [0, 1], [0.1, 0.2]), "1-D"),
        (lambda: M.Predictions([0, "a"], [0, 1], [0.1, 0.2]), "all integers or all strings"),
        (lambda: M.Predictions([None], [0], [0.1]), "None"),
        (lambda: M.Predictions(np.array([0.0, 1.0]), [0, 1], [0.1, 0.2]), "float64"),
        (lambda: M.micro_average_precision(([0], [0], [0.1]), []), "empty"),
        (lambda: M.micro_average_precision(([0], [0], [0.1]), [(0, 0), (0, 0)]), "more than once"),
        (lambda: M.micro_average_precision(([0], [0], [0.1]), [("0", "0")]), "integers in the predictions"),
        (lambda: M.micro_average_precision(([0], [0], [0.1]), [(0, 0, 0)]), "pairs"),
        (lambda: M.micro_average_precision(([0], [0], [0.1]), np.zeros((2, 3), int)), r"\(n, 2\)"),
        (lambda: M.recall_at_precision(([0], [0], [0.1]), [(0, 0)], 1.5), "target precision"),
        (lambda: M.recall_at_k(([0], [0], [0.1]), [(0, 0)], ks=(0,)), "positive integers"),
        (lambda: M.recall_at_k(([0], [0], [0.1]), [(0, 0)], ks=()), "positive integers"),
        (lambda: M.recall_at_k_from_knn(np.zeros((2, 3), int), np.zeros((2, 2)), [0, 1]), "one shape"),
        (lambda: M.recall_at_k_from_knn(np.zeros((2, 3), int), np.zeros((2, 3)), [0]), r"shape \(2,\)"),
        (lambda: M.recall_at_k_from_knn(np.zeros((1, 1), int), [[np.nan]], [0]), "NaN"),
        (lambda: M.recall_at_k_from_knn(np.zeros((1, 1), int), [[0.5]], [None]), "no query"),
        (lambda: M.recall_at_k_from_knn(np.zeros((1, 1)), [[0.5]], [0]), "integer ids"),
        (lambda: M.recall_at_k_from_knn(np.zeros((1, 1), int), [[0.5]], [-3]), "-1 for no match"),
    ],
)
def test_invalid_inputs_raise(make, match):
    with pytest.raises(M.MetricsInputError, match=match) as info:
        make()
    assert isinstance(info.value, ValueError) and isinstance(info.value, ActiveIndexError)


def test_wrong_prediction_types_raise_type_error():
    with pytest.raises(TypeError, match="Predictions"):
        M.micro_average_precision([1, 2], [(0, 0)])
    with pytest.raises(TypeError, match="ranked lists"):
        M.micro_average_precision({"a": ["x"]}, [("a", "x")])


# ------------------------------------------------------------------------------------------------
# Randomised comparison with a brute-force reference written with plain Python loops


def _brute_force(rows, gt, target=0.9, ks=(1, 2, 5)):
    truth = set(gt)
    best: dict = {}
    for q, r, s in rows:  # duplicates: highest score
        best[(q, r)] = max(s, best.get((q, r), -math.inf))
    items = [(s, (q, r) in truth, q, r) for (q, r), s in best.items()]
    n_pos = len(truth)

    # µAP: walk the pooled list in the worst-case order, one item at a time.
    ordered = sorted(items, key=lambda it: (-it[0], it[1]))
    tp, uap = 0, 0.0
    for i, (_, pos, _, _) in enumerate(ordered, start=1):
        if pos:
            tp += 1
            uap += (tp / i) / n_pos

    # Recall at precision by scanning thresholds (declare a copy when score >= t).
    best_recall, best_t = 0.0, None
    for t in sorted({it[0] for it in items}, reverse=True):
        kept = [it for it in items if it[0] >= t]
        n_tp = sum(it[1] for it in kept)
        if n_tp / len(kept) >= target and n_tp / n_pos > best_recall:
            best_recall, best_t = n_tp / n_pos, t

    # Ranks: count the query's other predictions scoring at least as high.
    rk = []
    for q, r in gt:
        if (q, r) not in best:
            rk.append(math.inf)
            continue
        s = best[(q, r)]
        rk.append(1 + sum(1 for (q2, r2), s2 in best.items() if q2 == q and r2 != r and s2 >= s))
    recall_k = {k: sum(x <= k for x in rk) / len(rk) for k in ks}

    # AP per query, same worst-case order restricted to the query.
    ap = {}
    for q in dict.fromkeys(q for q, _ in gt):
        mine = sorted((it for it in items if it[2] == q), key=lambda it: (-it[0], it[1]))
        n_true = sum(1 for q2, _ in gt if q2 == q)
        tp, total = 0, 0.0
        for i, it in enumerate(mine, start=1):
            if it[1]:
                tp += 1
                total += tp / i
        ap[q] = total / n_true
    return uap, (best_recall, best_t), rk, recall_k, ap


@pytest.mark.parametrize("seed", range(40))
def test_random_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    nq, nr = int(rng.integers(3, 12)), int(rng.integers(3, 10))
    n = int(rng.integers(0, 60))
    q = rng.integers(0, nq, size=n)
    r = rng.integers(0, nr, size=n)
    s = rng.integers(0, 6, size=n) / 5.0  # few distinct scores: many ties, some duplicates
    # Ground truth: a random subset of all pairs, non-empty, some possibly never predicted.
    all_pairs = [(a, b) for a in range(nq) for b in range(nr)]
    n_gt = int(rng.integers(1, min(15, len(all_pairs))))
    gt = [all_pairs[i] for i in rng.choice(len(all_pairs), size=n_gt, replace=False)]
    rows = list(zip(q.tolist(), r.tolist(), s.tolist()))
    target = float(rng.choice([0.5, 0.75, 0.9, 1.0]))

    uap, (rp, tp), rk, recall_k, ap = _brute_force(rows, gt, target)
    preds = M.Predictions(q, r, s)
    assert M.micro_average_precision(preds, gt) == pytest.approx(uap)
    got_rp, got_t = M.recall_at_precision(preds, gt, target)
    assert got_rp == pytest.approx(rp)
    assert got_t == tp  # both None, or the same score
    np.testing.assert_array_equal(M.ranks(preds, gt), rk)
    assert M.recall_at_k(preds, gt, ks=(1, 2, 5)) == pytest.approx(recall_k)
    assert M.average_precision_per_query(preds, gt) == pytest.approx(ap)

    # Invariants: the curve integrates to µAP, and the worst case is never above the best case.
    precision, recall, thresholds = M.precision_recall_curve(preds, gt)
    assert np.sum(np.diff(recall, prepend=0) * precision) == pytest.approx(uap)
    assert (np.diff(thresholds) <= 0).all()
    optimistic = _optimistic_uap(rows, gt)
    assert uap <= optimistic + 1e-12


def _optimistic_uap(rows, gt):
    truth = set(gt)
    best: dict = {}
    for q, r, s in rows:
        best[(q, r)] = max(s, best.get((q, r), -math.inf))
    ordered = sorted(((s, (k in truth)) for k, s in best.items()), key=lambda it: (-it[0], not it[1]))
    tp, total = 0, 0.0
    for i, (_, pos) in enumerate(ordered, start=1):
        if pos:
            tp += 1
            total += tp / i
    return total / len(truth)
