"""The statistics of policy evaluation, by hand: win rate and its interval, mean and standard error, distinct-n,
repetition."""

from __future__ import annotations

import math

import pytest

from rlhf.evaluation.stats import credits_from_scores, distinct_n, mean_and_se, repetition, win_rate


def test_win_rate_by_hand():
    """Credits (1, 1/2, 0, 1): rate 2.5 / 4 = 0.625; deviations (0.375, -0.125, -0.625, 0.375), squares summing to
    0.6875, unbiased variance 0.6875 / 3, se = sqrt(0.6875 / 3 / 4) = 0.23936; interval 0.625 -+ 1.96 se, the top
    clipped at 1."""
    w = win_rate([1.0, 0.5, 0.0, 1.0])
    se = math.sqrt(0.6875 / 3 / 4)
    assert w.rate == 0.625 and (w.wins, w.ties, w.losses, w.n) == (2, 1, 1, 4)
    assert w.low == pytest.approx(0.625 - 1.959963984540054 * se) and w.high == 1.0
    assert win_rate([0.5] * 10) == win_rate([0.5] * 10)  # all ties: 0.5 exactly, no spread
    assert (win_rate([0.5] * 10).rate, win_rate([0.5] * 10).low, win_rate([0.5] * 10).high) == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError):
        win_rate([1.5])


def test_credits_count_ties_half():
    assert credits_from_scores([1.0, 0.5, 0.2], [0.5, 0.5, 0.9]) == [1.0, 0.5, 0.0]
    with pytest.raises(ValueError):
        credits_from_scores([1.0], [1.0, 2.0])


def test_mean_and_standard_error_by_hand():
    """(1, 2, 3, 6): mean 3, unbiased variance (4 + 1 + 0 + 9) / 3 = 14 / 3, se sqrt(14 / 12)."""
    mean, se = mean_and_se([1.0, 2.0, 3.0, 6.0])
    assert mean == 3.0 and se == pytest.approx(math.sqrt(14 / 12))
    assert mean_and_se([4.0]) == (4.0, 0.0)


def test_distinct_n_and_repetition_by_hand():
    """Bigrams of "abab" and "abc": ab ba ab | ab bc -> 5 bigrams, 3 distinct (ab, ba, bc): distinct-2 = 3/5.
    seq-rep-2 of "abab": 3 bigrams, 2 distinct: 1 - 2/3; of "aaaa": 1 - 1/3; of "a": no bigram, 0."""
    assert distinct_n(["abab", "abc"], 2) == pytest.approx(3 / 5)
    assert distinct_n(["ab", "cd"], 1) == 1.0 and distinct_n(["a"], 2) == 0.0
    assert repetition("abab", 2) == pytest.approx(1 / 3)
    assert repetition("aaaa", 2) == pytest.approx(2 / 3)
    assert repetition("a", 2) == 0.0
