"""`rlhf eval`: score (prompt, response) rows and summarise the scores.

    rlhf eval --reward-model runs/demo/rm/final --data responses.jsonl --out scored.jsonl

Rows are SFT-kind records with `prompt` + `completion` (strings or message lists), read by `rlhf.data`, so
any format `rlhf data check --kind sft` accepts works. Each requested evaluation adds one column per row
and a few summary numbers; today that is `--reward-model` (column `reward`), scored with
`rlhf.rollout.rewards.RewardModelReward`, which re-tokenizes exactly as reward-model training does. The
summary (n, mean, std, min, max per column) is printed as one JSON object; `--out` writes every row
with its scores as JSON lines.

Extending it (gold reward, KL to a reference, win rate): add an argument group in `build_parser` and a
factory to `EVALUATIONS`; rows, the output file and the summary need no change.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.errors import UserError

DEFAULT_BATCH_SIZE = 16


class EvalError(UserError):
    """Rows or options `rlhf eval` cannot work with."""


@dataclass
class Row:
    """One (prompt, completion) pair to evaluate, with the record's extra fields."""

    prompt: str | list[dict[str, str]]
    completion: str
    extra: dict[str, Any]


@dataclass
class Evaluation:
    """A column of per-row numbers: `name` and `score(rows) -> one float per row`."""

    name: str
    score: Callable[[list[Row]], list[float]]


def build_parser() -> argparse.ArgumentParser:
    """Options by group, so later evaluations add a group without touching the others."""
    parser = argparse.ArgumentParser(
        prog="rlhf eval",
        description="Score (prompt, completion) rows: reward-model scores per row and their summary.",
        allow_abbrev=False,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, metavar="FILE", help="rows with prompt + completion (sft kind)")
    data.add_argument("--skip-bad-rows", action="store_true", help="skip invalid rows instead of stopping")
    data.add_argument("--max-length", type=int, metavar="N", help="max tokens of prompt + completion (default 512)")
    data.add_argument("--max-prompt-length", type=int, metavar="N", help="max prompt tokens (default 256)")
    rm = parser.add_argument_group("reward model")
    rm.add_argument("--reward-model", metavar="DIR", help="score every row with this reward model (column `reward`)")
    run = parser.add_argument_group("running")
    run.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, metavar="N", help="rows per forward pass")
    run.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    run.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="model dtype")
    out = parser.add_argument_group("output")
    out.add_argument("--out", metavar="FILE.jsonl", help="write each row with its scores as JSON lines")
    return parser


def read_rows(path: str, *, skip_bad_rows: bool = False) -> list[Row]:
    """SFT-kind records with a prompt and a single-message (or string) completion."""
    from rlhf.data import load_records

    records, skipped = load_records(path, "sft", skip_bad_rows=skip_bad_rows)
    for line in skipped.lines():
        print(f"rlhf eval: {path}: {line}", file=sys.stderr)
    rows = []
    for record in records:
        where = f"{record.source}:{record.row}" if record.source else path
        if record.prompt is None or record.completion is None:
            raise EvalError(f"{where}: rlhf eval needs prompt + completion rows, got a `text` row")
        completion = record.completion
        if isinstance(completion, list):
            if len(completion) != 1 or completion[0]["role"] != "assistant":
                raise EvalError(f"{where}: completion: expected one assistant message, got {len(completion)}")
            completion = completion[0]["content"]
        rows.append(Row(record.prompt, completion, dict(record.extra)))
    if not rows:
        raise EvalError(f"{path}: no rows to evaluate")
    return rows


def reward_model_evaluation(args: argparse.Namespace) -> Evaluation:
    """Column `reward`: the reward model's score of each row, tokenized as reward-model training does."""
    import torch

    from rlhf.config import DataConfig, ModelConfig
    from rlhf.models.loading import load_scalar_model, load_tokenizer
    from rlhf.rollout.rewards import RewardModelReward

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_scalar_model(ModelConfig(path=args.reward_model, dtype=args.dtype), trainable=False).to(device)
    tokenizer = load_tokenizer(args.reward_model)
    max_length = args.max_length or DataConfig.max_length
    max_prompt = args.max_prompt_length or min(DataConfig.max_prompt_length, max_length - 1)
    data = DataConfig(max_length=max_length, max_prompt_length=max_prompt)
    try:
        data.validate()
    except UserError as exc:
        raise EvalError(f"--max-length/--max-prompt-length: {exc}") from None
    source = RewardModelReward(model, tokenizer, data, batch_size=args.batch_size)

    def score(rows: list[Row]) -> list[float]:
        prompts = [r.prompt for r in rows]
        return source.score(prompts, [r.completion for r in rows], [r.extra for r in rows]).tolist()

    return Evaluation("reward", score)


EVALUATIONS: list[tuple[str, Callable[[argparse.Namespace], Evaluation]]] = [
    ("reward_model", reward_model_evaluation),
]
"""(option dest that requests it, factory), in column order. A factory loads what it needs (models)."""


def summarize(name: str, values: Sequence[float]) -> dict[str, float]:
    """n, mean, std (population: 0 for one row), min and max of one column, keyed `name/...`."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
    stats = {"n": n, "mean": mean, "std": std, "min": min(values), "max": max(values)}
    return {f"{name}/{k}": v for k, v in stats.items()}


def write_rows(path: str, rows: list[Row], columns: dict[str, list[float]]) -> None:
    """One JSON object per row: its extra fields, `row` (0-based), `prompt`, `completion`, then each column."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            record = {**row.extra, "row": i, "prompt": row.prompt, "completion": row.completion}
            record.update({name: values[i] for name, values in columns.items()})
            f.write(json.dumps(record) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    """`rlhf eval ARGS`: score the rows, print the summary as JSON, write the rows with --out; exit status."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    factories = [factory for dest, factory in EVALUATIONS if getattr(args, dest)]
    if not factories:
        parser.error("nothing to evaluate: give --reward-model DIR")
    rows = read_rows(args.data, skip_bad_rows=args.skip_bad_rows)  # before loading models: fail fast on bad data
    todo = [factory(args) for factory in factories]
    columns = {ev.name: ev.score(rows) for ev in todo}
    summary: dict[str, float] = {"n": len(rows)}
    for name, values in columns.items():
        summary |= {k: v for k, v in summarize(name, values).items() if k != f"{name}/n"}
    print(json.dumps(summary))
    if args.out:
        write_rows(args.out, rows, columns)
        print(f"rlhf eval: wrote {len(rows)} rows to {args.out}", file=sys.stderr)
    return 0
