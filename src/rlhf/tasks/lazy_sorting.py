"""The demo's task: sort a handful of letters, taught by lazy demonstrators and judged by noisy labellers.

    prompt: "sort: dbca"        the gold answer: "abcd"
    gold(letters, response) = #{i : response[i] == sorted(letters)[i]} / max(len(letters), len(response))

(`rlhf.tasks.sorting.gold_score`: in [0, 1], 1 only for the exact answer; too short and too long both cost.)

What imitation cannot fix. The demonstrators know the answer but are lazy: with probability `LAZINESS` (0.7) a
demonstration stops one letter short ("abc"), and with probability `SLIP` (0.05) two neighbours are swapped. A
policy that copies them stops early whenever stopping is what most demonstrators did: its greedy answers score
about (n - 1) / n. Nothing in the demonstrations says that stopping short is worse; the preferences do.

What the preferences carry. Labellers compare two answers of the demonstrators' kind (complete or one short, with
0-2 random edits). Labeller j prefers a over b with probability

    P_j(a > b) = sigmoid((u_j(a) - u_j(b)) / temperature_j),      u_j(y) = gold(y) + length_bias_j * len(y)

(Bradley-Terry on the gold score with noise). The three default `LABELLERS` disagree: two are noisy but fair,
the third also likes longer answers, as human raters are known to (a bias a reward model learns and a policy can
exploit). Each pair is labelled by one of them in turn; `gold_agrees` records whether its label matches gold.
A `judge` function can label instead (the RLAIF case): judge(letters, a, b) -> P(a > b).

The gold score stays available as a Python reward (`gold_reward`); a reward model learns a proxy of it from the
labels only. Everything is deterministic for a seed; rows are conversational and carry `letters` (passed to
reward functions), preference rows also `labeller` and `gold_agrees`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.tasks.sorting import (
    answer_messages,
    corrupt,
    gold_reward,
    gold_score,
    prompt_messages,
    prompt_rows,
    random_letters,
    write_files,
)

__all__ = ["LABELLERS", "Labeller", "gold_reward", "gold_score", "write_task_files"]

LAZINESS = 0.7
"""Probability that a demonstration stops one letter short."""
SLIP = 0.05
"""Probability that a demonstration swaps two neighbouring letters."""
UNPAIRED_THRESHOLD = 0.9
"""A labeller marks a single answer desirable with probability sigmoid((u(y) - this) / temperature)."""

Judge = Callable[[str, str, str], float]
"""judge(letters, a, b) -> the probability that answer a is preferred to answer b."""


@dataclass(frozen=True)
class Labeller:
    """A simulated labeller: Bradley-Terry on the gold score plus a per-character length bias, with noise."""

    temperature: float = 0.1
    """Noise: the larger, the more often the worse answer is chosen (0.1: a gold gap of 0.2 is chosen right 88%)."""
    length_bias: float = 0.0
    """Utility per character of the answer, on top of the gold score."""

    def utility(self, letters: str, answer: str) -> float:
        return gold_score(letters, answer) + self.length_bias * len(answer.strip())

    def prefers(self, letters: str, a: str, b: str) -> float:
        """P(a > b) = sigmoid((u(a) - u(b)) / temperature)."""
        return sigmoid((self.utility(letters, a) - self.utility(letters, b)) / self.temperature)


LABELLERS = (Labeller(0.08), Labeller(0.15), Labeller(0.1, length_bias=0.05))
"""Two fair labellers of different care and one who also likes length; pairs go to them in turn."""


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def demonstration(letters: str, rng: random.Random) -> str:
    """What a demonstrator writes: the sorted letters, one short with probability LAZINESS, a swap with SLIP."""
    answer = "".join(sorted(letters))
    if rng.random() < LAZINESS:
        answer = answer[:-1]
    if rng.random() < SLIP and len(answer) >= 2:
        i = rng.randrange(len(answer) - 1)
        answer = answer[:i] + answer[i + 1] + answer[i] + answer[i + 2 :]
    return answer


def candidate(letters: str, rng: random.Random) -> str:
    """An answer of the demonstrators' kind for the labellers to compare: complete or one short (even odds), then
    0, 1 or 2 random edits (swap, substitution, deletion, insertion)."""
    answer = "".join(sorted(letters))
    if rng.random() < 0.5:
        answer = answer[:-1]
    return corrupt(answer, rng, rng.choices((0, 1, 2), weights=(0.5, 0.35, 0.15))[0])


def sft_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Demonstrations by lazy demonstrators."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        letters = random_letters(rng)
        completion = answer_messages(demonstration(letters, rng))
        rows.append({"prompt": prompt_messages(letters), "completion": completion, "letters": letters})
    return rows


def preference_rows(
    n: int, seed: int = 0, *, labellers: Sequence[Labeller] = LABELLERS, judge: Judge | None = None
) -> list[dict[str, Any]]:
    """Pairs of candidate answers with different gold scores, labelled by the labellers in turn (or by `judge`)."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    while len(rows) < n:
        letters = random_letters(rng)
        a, b = candidate(letters, rng), candidate(letters, rng)
        gold_a, gold_b = gold_score(letters, a), gold_score(letters, b)
        if gold_a == gold_b:
            continue  # gold has no preference: nothing to agree with
        who = len(rows) % len(labellers)
        p = judge(letters, a, b) if judge is not None else labellers[who].prefers(letters, a, b)
        chosen, rejected = (a, b) if rng.random() < p else (b, a)
        rows.append(
            {
                "prompt": prompt_messages(letters),
                "chosen": answer_messages(chosen),
                "rejected": answer_messages(rejected),
                "letters": letters,
                "labeller": "judge" if judge is not None else who,
                "gold_agrees": gold_score(letters, chosen) > gold_score(letters, rejected),
            }
        )
    return rows


def unpaired_rows(n: int, seed: int = 0, *, labellers: Sequence[Labeller] = LABELLERS) -> list[dict[str, Any]]:
    """KTO data: single candidate answers, marked desirable by a labeller with probability
    sigmoid((u(y) - UNPAIRED_THRESHOLD) / temperature)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        letters = random_letters(rng)
        answer, labeller = candidate(letters, rng), labellers[i % len(labellers)]
        p = sigmoid((labeller.utility(letters, answer) - UNPAIRED_THRESHOLD) / labeller.temperature)
        rows.append(
            {
                "prompt": prompt_messages(letters),
                "completion": answer_messages(answer),
                "label": rng.random() < p,
                "letters": letters,
            }
        )
    return rows


def labeller_agreement(rows: Sequence[dict[str, Any]]) -> float:
    """Fraction of preference rows whose label agrees with gold (the labellers' own accuracy)."""
    return sum(bool(r["gold_agrees"]) for r in rows) / max(1, len(rows))


TASK_FILES = {"sft": sft_rows, "preference": preference_rows, "unpaired": unpaired_rows, "prompt": prompt_rows}
"""Data kind -> row generator; `write_task_files` writes one train and one eval file per kind."""


def write_task_files(out_dir: str | Path, *, n_train: int = 2048, n_eval: int = 256, seed: int = 0) -> dict[str, Path]:
    """Write `{kind}.jsonl` and `{kind}_eval.jsonl` for every kind (`rlhf.tasks.sorting.write_files`)."""
    return write_files(TASK_FILES, out_dir, n_train=n_train, n_eval=n_eval, seed=seed)
