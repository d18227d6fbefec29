"""Paired statistics of two models on the same items (``stages.metrics.all_pairs``): the bootstrap
interval and McNemar's test against independent computations, and their behaviour at the edges."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stages.metrics import all_pairs, bootstrap_interval, compare, mcnemar


def _exact_two_sided(k: int, n: int) -> float:
    """Two-sided binomial(n, 1/2) p-value by enumeration: the mass of outcomes no likelier than k."""
    pk = math.comb(n, k) / 2**n
    return min(1.0, sum(math.comb(n, i) / 2**n for i in range(n + 1) if math.comb(n, i) / 2**n <= pk * (1 + 1e-9)))


@pytest.mark.parametrize(("a_only", "b_only"), [(0, 0), (3, 0), (7, 2), (10, 10), (30, 12)])
def test_mcnemar_counts_discordant_items_and_matches_the_exact_binomial(a_only, b_only):
    both, neither = 25, 9
    a = np.array([1] * both + [1] * a_only + [0] * b_only + [0] * neither, float)
    b = np.array([1] * both + [0] * a_only + [1] * b_only + [0] * neither, float)
    got = mcnemar(a, b)
    assert (got["a_only"], got["b_only"]) == (a_only, b_only)
    n = a_only + b_only
    assert got["p_value"] == pytest.approx(1.0 if n == 0 else _exact_two_sided(a_only, n), rel=1e-9)


def test_mcnemar_counts_partial_credit_as_wrong():
    assert mcnemar(np.array([0.5, 1.0]), np.array([1.0, 0.9])) == {"a_only": 1, "b_only": 1, "p_value": 1.0}


def test_bootstrap_interval_matches_a_plain_resampling_loop():
    rng = np.random.default_rng(1)
    a, b = (rng.random(200) < 0.7).astype(float), (rng.random(200) < 0.6).astype(float)
    lo, hi = bootstrap_interval(a, b, resamples=2000, seed=3)
    draws = np.random.default_rng(3)
    means = []
    for _ in range(2):  # the same draws, in the same order, as two blocks of 1,000
        idx = draws.integers(0, 200, (1000, 200))
        means += list((a[idx] - b[idx]).mean(1))
    assert (lo, hi) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])))
    assert lo < (a - b).mean() < hi


def test_a_clear_gap_excludes_zero_and_a_coin_flip_does_not():
    rng = np.random.default_rng(0)
    strong, weak = (rng.random(400) < 0.9).astype(float), (rng.random(400) < 0.5).astype(float)
    clear = compare(strong, weak)
    assert clear["excludes_zero"] and clear["interval"][0] > 0.3 and clear["mcnemar"]["p_value"] < 1e-10
    same = compare(strong, strong[::-1].copy())  # the same accuracy, other items: a zero gap in expectation
    assert same["diff"] == 0 and not same["excludes_zero"] and same["mcnemar"]["p_value"] > 0.05


def test_identical_models_give_a_zero_width_interval_and_p_one():
    a = np.array([1, 0, 1, 1, 0], float)
    got = compare(a, a)
    assert got["interval"] == [0.0, 0.0] and not got["excludes_zero"] and got["mcnemar"]["p_value"] == 1.0


def test_unscored_items_are_left_out_of_the_pair_only():
    a, b = np.array([1, np.nan, 1, 0]), np.array([0, 1, np.nan, 0])
    got = compare(a, b)
    assert got["items"] == 2 and got["accuracy_a"] == 0.5 and got["accuracy_b"] == 0.0
    assert compare(np.array([np.nan]), np.array([1.0])) == {"items": 0}


def test_every_pair_once_in_the_given_order():
    s = {"teacher": np.ones(10), "kd": np.r_[np.ones(8), np.zeros(2)], "gold": np.zeros(10)}
    pairs = all_pairs(s)
    assert [(p["a"], p["b"]) for p in pairs] == [("teacher", "kd"), ("teacher", "gold"), ("kd", "gold")]
    assert [p["diff"] for p in pairs] == pytest.approx([0.2, 1.0, 0.8])
