"""`rlhf demo`: the whole pipeline on the built-in sorting task with a tiny model, in minutes on a CPU.

    data + tiny base model -> SFT -> reward model -> DPO (from SFT) -> PPO (from SFT, against the reward model)

Every stage is an ordinary `rlhf train` run (its own run directory under `--out`), configured here by the
same dotted overrides a user would type. At the end each policy answers held-out prompts greedily and the
gold score (position-wise accuracy of the sorted letters, in [0, 1]) says how good it is; the table goes
to stdout and `summary.json`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

GOLD_REWARD = "rlhf.tasks.sorting:gold_reward"


def _stage_overrides(out: Path, data: dict[str, Path], quick: bool) -> dict[str, list[str]]:
    """Per stage, the `--section.key value` overrides of an `rlhf train` command line."""
    base, sft, rm = out / "base", out / "sft" / "final", out / "rm" / "final"
    steps = (lambda n: str(max(4, n // 10))) if quick else str

    def common(stage: str, model: Path, lr: str, n_steps: int, batch: int) -> list[str]:
        return [
            f"--output_dir={out / stage}",
            f"--model.path={model}",
            f"--optim.lr={lr}",
            f"--train.max_steps={steps(n_steps)}",
            f"--train.batch_size={batch}",
            f"--train.micro_batch_size={batch}",
            "--schedule.name=constant",
            "--logging.progress=false",
        ]

    return {
        "sft": common("sft", base, "3e-3", 300, 32)
        + [f"--data.train={data['sft']}", f"--data.eval={data['sft_eval']}"],
        "rm": common("rm", base, "1e-3", 200, 32)
        + [f"--data.train={data['preference']}", f"--data.eval={data['preference_eval']}"],
        "dpo": common("dpo", sft, "1e-4", 100, 32)
        + [f"--data.train={data['preference']}", f"--data.eval={data['preference_eval']}"],
        "ppo": common("ppo", sft, "3e-5", 40, 32) + [f"--data.train={data['prompt']}", f"--reward.model={rm}"],
    }


def last_logged(run_dir: Path, key: str) -> float | None:
    """The last value of `key` in a run's metrics.jsonl (None if never logged)."""
    values = [row[key] for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if key in row]
    return values[-1] if values else None


def run_stage(algo: str, overrides: Sequence[str]) -> Path:
    """`rlhf train <algo>` with these overrides, in process; returns the run directory."""
    from rlhf.cli import ALGORITHMS
    from rlhf.config import load_config

    module = importlib.import_module(ALGORITHMS[algo])
    cfg = load_config(module.Config, None, list(overrides))
    return Path(module.train(cfg))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhf demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="directory for the data, the models and every run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the base model and every stage")
    parser.add_argument("--quick", action="store_true", help="a tenth of the steps (a smoke run, not a result)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from rlhf.evaluation.gold import gold_eval
    from rlhf.tasks.sorting import prompt_rows, write_task_files
    from rlhf.tasks.tiny import make_tiny_checkpoint

    out = Path(args.out)
    data = write_task_files(out / "data", n_train=2048, n_eval=128, seed=args.seed)
    make_tiny_checkpoint(out / "base", "llama", hidden_size=64, num_layers=2, seed=args.seed)
    held_out = prompt_rows(128, seed=args.seed + 20_000)
    policies: dict[str, Path] = {"base": out / "base"}
    timings: dict[str, float] = {}
    reward_model: dict[str, float | None] = {}
    for algo, overrides in _stage_overrides(out, data, args.quick).items():
        print(f"== {algo}: rlhf train {algo} {' '.join(overrides)}", flush=True)
        start = time.perf_counter()
        run = run_stage(algo, overrides)
        timings[algo] = round(time.perf_counter() - start, 1)
        if algo == "rm":
            reward_model = {key: last_logged(run, f"eval/{key}") for key in ("accuracy", "margin", "ece")}
        else:
            policies[algo] = run / "final"

    summary: dict[str, Any] = {"policies": {}, "reward_model": reward_model, "seconds": timings}
    print(
        f"\nreward model, held-out pairs: accuracy {reward_model['accuracy']:.3f}, margin {reward_model['margin']:.3f}"
    )
    print(f"\n{'policy':8} {'gold score':>10} {'exact':>6} {'length':>7}")
    for name, path in policies.items():
        scores = gold_eval(path, held_out, GOLD_REWARD)
        summary["policies"][name] = {"path": str(path), **scores}
        print(f"{name:8} {scores['gold/score']:10.3f} {scores['gold/exact']:6.2f} {scores['response/length']:7.1f}")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nsummary: {out / 'summary.json'}")
    return 0
