"""The built-in task: sort a handful of letters, judged by a programmatic "gold" preference.

A prompt asks the model to sort letters (`sort: dbca`); the ideal response is `abcd`. The gold score is
the stand-in for human judgement, known exactly, so every stage of the pipeline can be checked against it:

    gold(letters, response) = #{i : response[i] == sorted(letters)[i]} / max(len(letters), len(response))

It lies in [0, 1], equals 1 only for the exact answer, gives partial credit position by position, and
penalises responses that are too long or too short (the length-hacking signal the evaluation watches).

Everything is deterministic for a seed. Rows are conversational (message lists) and carry the extra field
`letters`, which is passed through to reward functions (`gold_reward`).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ALPHABET = "abcdefgh"
MIN_LETTERS, MAX_LETTERS = 3, 6


def gold_score(letters: str, response: str) -> float:
    """Position-wise accuracy against the sorted letters, normalised by the longer of the two lengths."""
    target = "".join(sorted(letters))
    response = response.strip()
    denom = max(len(target), len(response))
    if denom == 0:
        return 0.0
    return sum(a == b for a, b in zip(target, response, strict=False)) / denom


def gold_reward(prompts: Sequence[Any], completions: Sequence[str], letters: Sequence[str], **_: Any) -> list[float]:
    """Python reward function (`rlhf.tasks.sorting:gold_reward`): the gold score of each completion."""
    return [gold_score(lt, c) for lt, c in zip(letters, completions, strict=True)]


def random_letters(rng: random.Random) -> str:
    n = rng.randint(MIN_LETTERS, MAX_LETTERS)
    return "".join(rng.choice(ALPHABET) for _ in range(n))


def prompt_messages(letters: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"sort: {letters}"}]


def answer_messages(content: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": content}]


def corrupt(text: str, rng: random.Random, n_edits: int) -> str:
    """Apply `n_edits` random swaps, substitutions, deletions or insertions."""
    chars = list(text)
    for _ in range(n_edits):
        op = rng.choice(("swap", "sub", "del", "ins"))
        if op == "swap" and len(chars) >= 2:
            i = rng.randrange(len(chars) - 1)
            chars[i], chars[i + 1] = chars[i + 1], chars[i]
        elif op == "sub" and chars:
            chars[rng.randrange(len(chars))] = rng.choice(ALPHABET)
        elif op == "del" and len(chars) > 1:
            del chars[rng.randrange(len(chars))]
        else:
            chars.insert(rng.randrange(len(chars) + 1), rng.choice(ALPHABET))
    return "".join(chars)


def sft_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Demonstrations: the correct answer to each prompt."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        letters = random_letters(rng)
        rows.append(
            {
                "prompt": prompt_messages(letters),
                "completion": answer_messages("".join(sorted(letters))),
                "letters": letters,
            }
        )
    return rows


def prompt_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Prompts for online RL and evaluation."""
    rng = random.Random(seed)
    return [{"prompt": prompt_messages(lt), "letters": lt} for lt in (random_letters(rng) for _ in range(n))]


def preference_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Pairs of imperfect answers, the one with the higher gold score chosen (ties are re-drawn)."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    while len(rows) < n:
        letters = random_letters(rng)
        target = "".join(sorted(letters))
        a = corrupt(target, rng, rng.randint(0, 2))
        b = corrupt(target, rng, rng.randint(1, 4))
        sa, sb = gold_score(letters, a), gold_score(letters, b)
        if sa == sb:
            continue
        chosen, rejected = (a, b) if sa > sb else (b, a)
        rows.append(
            {
                "prompt": prompt_messages(letters),
                "chosen": answer_messages(chosen),
                "rejected": answer_messages(rejected),
                "letters": letters,
                "margin": abs(sa - sb),
            }
        )
    return rows


def unpaired_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """KTO data: single answers labelled desirable when their gold score is at least 0.5."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        letters = random_letters(rng)
        answer = corrupt("".join(sorted(letters)), rng, rng.randint(0, 3))
        rows.append(
            {
                "prompt": prompt_messages(letters),
                "completion": answer_messages(answer),
                "label": gold_score(letters, answer) >= 0.5,
                "letters": letters,
            }
        )
    return rows


TASK_FILES = {"sft": sft_rows, "preference": preference_rows, "unpaired": unpaired_rows, "prompt": prompt_rows}
"""Data kind -> row generator; `write_task_files` writes one train and one eval file per kind."""


def write_task_files(out_dir: str | Path, *, n_train: int = 512, n_eval: int = 64, seed: int = 0) -> dict[str, Path]:
    """Write `{kind}.jsonl` and `{kind}_eval.jsonl` for every kind; return {"sft": path, "sft_eval": path, ...}.

    Train and eval rows come from different seeds, so held-out prompts are (almost always) unseen.
    """
    return write_files(TASK_FILES, out_dir, n_train=n_train, n_eval=n_eval, seed=seed)


def write_files(
    generators: dict[str, Callable[[int, int], list[dict[str, Any]]]],
    out_dir: str | Path,
    *,
    n_train: int,
    n_eval: int,
    seed: int,
) -> dict[str, Path]:
    """`{kind}.jsonl` (n_train rows of `generators[kind](n, seed)`) and `{kind}_eval.jsonl` (n_eval rows, seed +
    10000) for every kind, as JSON lines; returns {"sft": path, "sft_eval": path, ...}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for kind, make in generators.items():
        for name, n, s in ((kind, n_train, seed), (f"{kind}_eval", n_eval, seed + 10_000)):
            path = out / f"{name}.jsonl"
            path.write_text("".join(json.dumps(row) + "\n" for row in make(n, s)))
            paths[name] = path
    return paths
