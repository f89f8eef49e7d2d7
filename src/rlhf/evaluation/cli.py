"""`rlhf eval`: score policies on held-out prompts, or score (prompt, completion) rows with a reward model.

Policies (`--policy`, repeatable):

    rlhf eval --policy sft=runs/demo/sft/final --policy dpo=runs/demo/dpo/final --prompts prompts.jsonl \\
        --baseline sft --gold rlhf.tasks.lazy_sorting:gold_reward --reward-model runs/demo/rm/final \\
        --reference runs/demo/sft/final --out eval.json

Each policy answers every prompt greedily; the answers get the gold reward (a Python function) and the proxy
reward (a reward model) side by side; its KL to `--reference` is estimated from its own samples; with
`--baseline`, its win rate against that policy's answers, judged by `--judge` (gold, proxy, or a pairwise
`module:function`; ties half, with a 95% interval); length, EOS rate, distinct-2 and repetition of the answers.
A table goes to stdout and everything, with a sample table, to `--out` as JSON (`rlhf.evaluation.policies`).

Rows (`--data`): `prompt` + `completion` rows (any format `rlhf data check --kind sft` accepts) each get the
`--reward-model` score (column `reward`, tokenized exactly as reward-model training tokenizes), summarised as
one JSON object (n, mean, std, min, max); `--out` writes every row with its score as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.errors import UserError
from rlhf.evaluation.stats import fixed

DEFAULT_BATCH_SIZE = 16


class EvalError(UserError):
    """Rows or options `rlhf eval` cannot work with."""


@dataclass
class Row:
    """One (prompt, completion) pair to evaluate, with the record's extra fields."""

    prompt: str | list[dict[str, str]]
    completion: str
    extra: dict[str, Any]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf eval",
        description="Score policies on held-out prompts (--policy), or (prompt, completion) rows (--data).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
        allow_abbrev=False,
    )
    pol = parser.add_argument_group("policies")
    pol.add_argument("--policy", action="append", default=[], metavar="NAME=DIR", help="a policy to evaluate")
    pol.add_argument("--prompts", metavar="FILE", help="held-out prompt rows (kind prompt; extra fields go to rewards)")
    pol.add_argument("--num-prompts", type=int, metavar="N", help="only the first N prompts")
    pol.add_argument("--baseline", metavar="NAME", help="win rates against this policy")
    pol.add_argument(
        "--judge", default=None, help="gold, proxy, or a pairwise module:function (default: gold if given)"
    )
    pol.add_argument("--gold", metavar="FN", help="the gold reward, a Python module:function or file.py:function")
    pol.add_argument("--reference", metavar="DIR", help="KL of each policy to this one, from its own samples")
    pol.add_argument("--kl-samples", type=int, default=4, metavar="N", help="samples per prompt for the KL")
    pol.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="tokens per answer at most")
    pol.add_argument("--seed", type=int, default=0, help="seed of the KL samples")
    rows = parser.add_argument_group("rows")
    rows.add_argument("--data", metavar="FILE", help="rows with prompt + completion (sft kind) to score")
    rows.add_argument("--skip-bad-rows", action="store_true", help="skip invalid rows instead of stopping")
    both = parser.add_argument_group("both")
    both.add_argument("--reward-model", metavar="DIR", help="the proxy reward (policies) / the score (rows)")
    both.add_argument("--max-length", type=int, metavar="N", help="max tokens of prompt + completion (default 512)")
    both.add_argument("--max-prompt-length", type=int, metavar="N", help="max prompt tokens (default 256)")
    both.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, metavar="N", help="rows per forward")
    both.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    both.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="model dtype")
    both.add_argument("--out", metavar="FILE", help="policies: the evaluation as JSON; rows: scored JSON lines")
    return parser


def data_config(args: argparse.Namespace) -> Any:
    from rlhf.config import DataConfig

    max_length = args.max_length or DataConfig.max_length
    max_prompt = args.max_prompt_length or min(DataConfig.max_prompt_length, max_length - 1)
    data = DataConfig(max_length=max_length, max_prompt_length=max_prompt)
    try:
        data.validate()
    except UserError as exc:
        raise EvalError(f"--max-length/--max-prompt-length: {exc}") from None
    return data


def reward_model_source(args: argparse.Namespace) -> Any:
    """The `--reward-model` as a reward source, on `--device`."""
    import torch

    from rlhf.config import ModelConfig
    from rlhf.models.loading import load_scalar_model, load_tokenizer
    from rlhf.rollout.rewards import RewardModelReward

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_scalar_model(ModelConfig(path=args.reward_model, dtype=args.dtype), trainable=False).to(device)
    tokenizer = load_tokenizer(args.reward_model)
    return RewardModelReward(model, tokenizer, data_config(args), batch_size=args.batch_size, name=args.reward_model)


# ---------------------------------------------------------------------------------------------- rows


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


def summarize(name: str, values: Sequence[float]) -> dict[str, float]:
    """n, mean, std (population: 0 for one row), min and max of one column, keyed `name/...`."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
    stats = {"n": n, "mean": mean, "std": std, "min": min(values), "max": max(values)}
    return {f"{name}/{k}": v for k, v in stats.items()}


def score_rows(args: argparse.Namespace) -> int:
    rows = read_rows(args.data, skip_bad_rows=args.skip_bad_rows)  # before loading models: fail fast on bad data
    source = reward_model_source(args)
    scores = source.score([r.prompt for r in rows], [r.completion for r in rows], [r.extra for r in rows]).tolist()
    summary: dict[str, float] = {"n": len(rows)}
    summary |= {k: v for k, v in summarize("reward", scores).items() if k != "reward/n"}
    print(json.dumps(summary))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", encoding="utf-8") as f:
            for i, (row, score) in enumerate(zip(rows, scores, strict=True)):
                f.write(json.dumps({**row.extra, "row": i, "prompt": row.prompt, "completion": row.completion,
                                    "reward": score}) + "\n")  # fmt: skip
        print(f"rlhf eval: wrote {len(rows)} rows to {args.out}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------- policies


def parse_policies(specs: Sequence[str]) -> dict[str, str]:
    policies: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise EvalError(f"--policy {spec!r}: expected NAME=DIR")
        if name in policies:
            raise EvalError(f"--policy {name}: given twice")
        policies[name] = path
    return policies


def format_table(result: dict[str, Any]) -> str:
    """The evaluation as a text table: one row per policy."""
    columns = [("gold", "gold"), ("proxy", "proxy"), ("kl", "KL"), ("win_rate", "win rate"), ("length", "length"),
               ("eos_rate", "EOS"), ("repetition", "rep-2")]  # fmt: skip
    rows = result["policies"]
    shown = [(key, title) for key, title in columns if any(key in r for r in rows.values())]
    width = max(len(n) for n in rows) + 2
    header = "policy".ljust(width) + "".join(title.rjust(20 if key == "win_rate" else 9) for key, title in shown)
    lines = [header]
    for name, r in rows.items():
        cells = []
        for key, _ in shown:
            if key == "win_rate":
                w = r.get(key)
                cells.append((f"{w['rate']:.3f} [{w['low']:.2f}, {w['high']:.2f}]" if w else "-").rjust(20))
            else:
                cells.append((fixed(r[key]) if key in r else "-").rjust(9))
        lines.append(name.ljust(width) + "".join(cells))
    judge = f", judged by {result['judge']}" if result.get("baseline") else ""
    base = f"; win rate against {result['baseline']}{judge} (ties half, 95% interval)" if result.get("baseline") else ""
    return "\n".join(lines) + f"\n({result['prompts']} prompts, greedy answers{base})"


def evaluate_policies(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    from rlhf.data import load_records
    from rlhf.evaluation.policies import evaluate_checkpoints
    from rlhf.rollout.rewards import FunctionReward, load_reward_function

    if not args.prompts:
        parser.error("--policy needs --prompts FILE")
    policies = parse_policies(args.policy)
    records, _ = load_records(args.prompts, "prompt")
    rows = [{"prompt": r.prompt, **r.extra} for r in records][: args.num_prompts]
    if not rows:
        raise EvalError(f"{args.prompts}: no prompts")
    gold = FunctionReward(load_reward_function(args.gold), name=args.gold) if args.gold else None
    proxy = reward_model_source(args) if args.reward_model else None
    judge: Any = args.judge or ("gold" if gold is not None else "proxy")
    if judge not in ("gold", "proxy"):
        judge = load_reward_function(judge)
    if args.baseline and isinstance(judge, str) and {"gold": gold, "proxy": proxy}[judge] is None:
        parser.error(f"--judge {judge} needs --{'gold' if judge == 'gold' else 'reward-model'}")
    torch.manual_seed(args.seed)
    evaluation = evaluate_checkpoints(
        policies,
        rows,
        gold=gold,
        proxy=proxy,
        reference=args.reference,
        baseline=args.baseline,
        judge=judge,
        kl_samples=args.kl_samples,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        data=data_config(args),
    )
    result = evaluation.to_json()
    print(format_table(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"rlhf eval: wrote {args.out}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`rlhf eval ARGS`; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.policy and args.data:
        parser.error("give --policy (score policies) or --data (score rows), not both")
    if args.policy:
        return evaluate_policies(args, parser)
    if not args.data or not args.reward_model:
        parser.error("nothing to evaluate: give --policy NAME=DIR --prompts FILE, or --data FILE --reward-model DIR")
    return score_rows(args)
