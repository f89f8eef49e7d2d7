"""The statistics of policy evaluation, as plain functions of numbers (no models): win rate with its confidence
interval, a mean with its standard error, the sequence KL from samples, and the diversity of answers.

    win_rate(credits)            credits c_i in [0, 1] per prompt: 1 a win, 0 a loss, 1/2 a tie
    mean_and_se(values)          the mean and its standard error sd / sqrt(n)
    distinct_n(sequences, n)     corpus-level distinct n-grams / all n-grams (Li et al. 2016)
    repetition(sequence, n)      1 - distinct n-grams / n-grams of one sequence (seq-rep-n, Welleck et al. 2019)
    fixed(value, digits)         a number as the tables print it (never "-0.000")
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Z_95 = 1.959963984540054
"""The two-sided 95% quantile of the standard normal."""


@dataclass(frozen=True)
class WinRate:
    """How often a policy beats a baseline on the same prompts, ties counted half."""

    rate: float  # mean credit: (wins + ties / 2) / n
    low: float  # 95% confidence interval of the rate (normal approximation, clipped to [0, 1])
    high: float
    wins: int
    ties: int
    losses: int

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses


def mean_and_se(values: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error) = (sum x / n, s / sqrt(n)) with s the unbiased standard deviation; se 0 for n < 2."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def win_rate(credits: Sequence[float]) -> WinRate:
    """Win rate of per-prompt credits c_i in [0, 1] (1 win, 1/2 tie, 0 loss; a judge's probability also works).

        rate = mean(c),   95% CI = rate -+ 1.96 s / sqrt(n)   (s the unbiased sd of c; clipped to [0, 1])

    The interval is the normal approximation to the mean of n independent per-prompt outcomes (the central limit
    theorem), which is what a paired comparison on held-out prompts gives; wins / ties / losses count credits
    above, at and below 1/2.
    """
    if any(not 0.0 <= c <= 1.0 for c in credits):
        raise ValueError("credits must lie in [0, 1]")
    rate, se = mean_and_se(credits)
    half = Z_95 * se
    wins = sum(c > 0.5 for c in credits)
    ties = sum(c == 0.5 for c in credits)
    return WinRate(rate, max(0.0, rate - half), min(1.0, rate + half), wins, ties, len(credits) - wins - ties)


def credits_from_scores(policy: Sequence[float], baseline: Sequence[float]) -> list[float]:
    """Per-prompt credits of comparing two score lists: 1 where the policy's is higher, 1/2 where equal, else 0."""
    if len(policy) != len(baseline):
        raise ValueError(f"{len(policy)} policy scores against {len(baseline)} baseline scores")
    return [1.0 if p > b else 0.5 if p == b else 0.0 for p, b in zip(policy, baseline, strict=True)]


def _ngrams(sequence: Sequence[object], n: int) -> list[tuple[object, ...]]:
    return [tuple(sequence[i : i + n]) for i in range(len(sequence) - n + 1)]


def distinct_n(sequences: Sequence[Sequence[object]], n: int = 2) -> float:
    """Distinct-n over a corpus: the number of different n-grams over all sequences / the number of n-grams
    (Li et al. 2016, "A Diversity-Promoting Objective Function for Neural Conversation Models", Sec. 4.1). 1 when
    no n-gram repeats anywhere; 0 when there is no n-gram at all."""
    grams = [g for s in sequences for g in _ngrams(s, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition(sequence: Sequence[object], n: int = 2) -> float:
    """seq-rep-n of one sequence: 1 - distinct n-grams / n-grams (Welleck et al. 2019, "Neural Text Generation
    with Unlikelihood Training", Sec. 5): 0 without a repeated n-gram, near 1 for a loop."""
    grams = _ngrams(sequence, n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def fixed(value: float, digits: int = 3) -> str:
    """`value` with `digits` decimals, "0.000" and never "-0.000" for a tiny negative (a policy's sampled KL to an equal
    reference is about -1e-7): the tables of `rlhf eval` and of the report."""
    return f"{round(value, digits) + 0.0:.{digits}f}"
