"""`rlhf demo`: the whole pipeline on the built-in task with a tiny model, in a few minutes on a CPU.

    task data -> tiny base model -> SFT -> reward model (from SFT) -> DPO, PPO, GRPO (each from SFT)
              -> a GRPO run pushed too far (the over-optimisation picture) -> evaluation against SFT -> report

The task (`rlhf.tasks.lazy_sorting`): sort a few letters. The demonstrations come from lazy demonstrators, who
usually stop one letter short, so the SFT policy does too; noisy simulated labellers compare answers and prefer
complete ones. Every alignment stage must learn from the preferences what the demonstrations lack. The judge is
the task's gold reward (a Python function the training never sees, except as the labellers' noisy opinion):
each policy's greedy answers to held-out prompts are scored by gold and by the reward model (the proxy), its KL
to SFT is estimated from its own samples, and its gold win rate against SFT is counted (ties half).

Every stage is an ordinary `rlhf train` run (its own run directory under `--out`), configured by the same dotted
overrides a user would type; the evaluation is `rlhf eval`'s, the report `rlhf report`'s. Written: summary.json,
eval.json, report.html and one run directory per stage.
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

TASK = "rlhf.tasks.lazy_sorting"
GOLD_REWARD = f"{TASK}:gold_reward"
POLICIES = ("sft", "dpo", "ppo", "grpo", "grpo_overopt")
STORY = (
    'The task: sort a few letters ("sort: dbca" -> "abcd"). The demonstrators are lazy: 70% of their answers '
    "stop one letter short, so supervised fine-tuning learns to stop short too. Simulated labellers (noisy, one "
    "of them partial to long answers) compare pairs of answers; a reward model learns their preferences, and DPO, "
    "PPO and GRPO learn from them what the demonstrations lack. The gold reward (position-wise accuracy against "
    "the sorted letters) is the judge; no stage trains on it. The last run, GRPO with a tiny KL penalty and a "
    "large learning rate, shows what happens when the proxy is optimised too hard."
)


def stage_overrides(out: Path, data: dict[str, Path], quick: bool) -> dict[str, tuple[str, list[str]]]:
    """Per stage: the `rlhf train` algorithm and its `--section.key=value` overrides."""
    base, sft, rm = out / "base", out / "sft" / "final", out / "rm" / "final"
    steps = (lambda n: str(max(4, n // 10))) if quick else str

    def common(stage: str, model: Path, lr: str, n_steps: int, batch: int, micro: int | None = None) -> list[str]:
        return [
            f"--output_dir={out / stage}",
            f"--model.path={model}",
            f"--optim.lr={lr}",
            f"--train.max_steps={steps(n_steps)}",
            f"--train.batch_size={batch}",
            f"--train.micro_batch_size={micro or batch}",
            "--schedule.name=constant",
            "--logging.progress=false",
        ]

    prefs = [f"--data.train={data['preference']}", f"--data.eval={data['preference_eval']}"]
    online = [
        f"--data.train={data['prompt']}",
        f"--data.eval={data['prompt_eval']}",
        f"--reward.model={rm}",
        "--rollout.max_new_tokens=12",
        "--data.max_length=48",
        "--data.max_prompt_length=32",
    ]
    group = ["--rollout.batch_size=16", "--group_size=8"]
    watch = ["--eval.every=5", f"--eval.gold={GOLD_REWARD}", "--eval.prompts=64"]
    return {
        "sft": (
            "sft",
            common("sft", base, "3e-3", 400, 32) + [f"--data.train={data['sft']}", f"--data.eval={data['sft_eval']}"],
        ),  # fmt: skip
        "rm": ("rm", common("rm", sft, "1e-3", 300, 32) + prefs),
        "dpo": ("dpo", common("dpo", sft, "1e-4", 150, 32) + prefs + ["--beta=0.3"]),
        # 120 steps: gold win rate 0.77, 0.77, 0.76 over seeds 0-2 against SFT; 80 gave 0.71-0.83 (noisier)
        "ppo": ("ppo", common("ppo", sft, "1e-4", 120, 32) + online + ["--rollout.batch_size=64"]),
        "grpo": ("grpo", common("grpo", sft, "1e-4", 60, 128, 64) + online + group),
        "grpo_overopt": (
            "grpo",
            common("grpo_overopt", sft, "3e-4", 120, 128, 64) + online + group + watch + ["--kl.coef=0.005"],
        ),
    }


def run_stage(algo: str, overrides: Sequence[str]) -> Path:
    """`rlhf train <algo>` with these overrides, in process; returns the run directory."""
    from rlhf.cli import ALGORITHMS
    from rlhf.config import load_config

    module = importlib.import_module(ALGORITHMS[algo])
    cfg = load_config(module.Config, None, list(overrides), preset=getattr(module, "PRESETS", {}).get(algo))
    return Path(module.train(cfg))


def last_logged(run_dir: Path, key: str) -> float | None:
    """The last value of `key` in a run's metrics.jsonl (None if never logged)."""
    from rlhf.runtime.run_dir import METRICS_FILE, read_jsonl

    values = [row[key] for row in read_jsonl(run_dir / METRICS_FILE) if key in row]
    return values[-1] if values else None


def reward_model_quality(out: Path, pairs: Path) -> dict[str, Any]:
    """The reward model on the held-out pairs: agreement with the labels and with gold; the labellers' own."""
    from rlhf.config import ModelConfig
    from rlhf.evaluation.calibration import preference_agreement
    from rlhf.models.loading import load_scalar_model, load_tokenizer
    from rlhf.rollout.rewards import RewardModelReward
    from rlhf.runtime.run_dir import read_jsonl
    from rlhf.tasks.lazy_sorting import gold_score, labeller_agreement

    rows = read_jsonl(pairs)
    rm_dir = str(out / "rm" / "final")
    source = RewardModelReward(load_scalar_model(ModelConfig(path=rm_dir), trainable=False), load_tokenizer(rm_dir))
    agreement = preference_agreement(source, rows, gold=lambda row, text: gold_score(row["letters"], text))
    return {"accuracy": agreement["accuracy"], "gold_accuracy": agreement["gold_accuracy"],
            "ece": last_logged(out / "rm", "eval/ece"), "labeller_agreement": labeller_agreement(rows)}  # fmt: skip


def evaluate(out: Path, prompts: Path) -> dict[str, Any]:
    """Every policy on the held-out prompts against SFT (`rlhf eval --policy ...`), written to eval.json."""
    import torch

    from rlhf.config import DataConfig, ModelConfig
    from rlhf.evaluation.policies import evaluate_checkpoints
    from rlhf.models.loading import load_scalar_model, load_tokenizer
    from rlhf.rollout.rewards import FunctionReward, RewardModelReward, load_reward_function
    from rlhf.runtime.run_dir import EVAL_FILE, read_jsonl

    rm_dir = str(out / "rm" / "final")
    proxy = RewardModelReward(load_scalar_model(ModelConfig(path=rm_dir), trainable=False), load_tokenizer(rm_dir))
    torch.manual_seed(0)
    evaluation = evaluate_checkpoints(
        {name: out / name / "final" for name in POLICIES},
        read_jsonl(prompts),
        gold=FunctionReward(load_reward_function(GOLD_REWARD), name=GOLD_REWARD),
        proxy=proxy,
        reference=out / "sft" / "final",
        baseline="sft",
        judge="gold",
        kl_samples=4,
        max_new_tokens=12,
        data=DataConfig(max_length=48, max_prompt_length=32),
        progress=False,
    )
    result = evaluation.to_json(samples=None)
    (out / EVAL_FILE).write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhf demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="directory for the data, the models and every run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the base model")
    parser.add_argument("--quick", action="store_true", help="a tenth of the steps (a smoke run, not a result)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from rlhf.evaluation.cli import format_table
    from rlhf.report.cli import write_report
    from rlhf.tasks.lazy_sorting import write_task_files
    from rlhf.tasks.tiny import make_tiny_checkpoint

    out = Path(args.out)
    start = time.perf_counter()
    data = write_task_files(out / "data", n_train=4096, n_eval=256, seed=args.seed)
    make_tiny_checkpoint(out / "base", "llama", hidden_size=64, num_layers=2, seed=args.seed)
    seconds: dict[str, float] = {"data and base model": time.perf_counter() - start}
    for stage, (algo, overrides) in stage_overrides(out, data, args.quick).items():
        print(f"== {stage}: rlhf train {algo} {' '.join(overrides)}", flush=True)
        t0 = time.perf_counter()
        run_stage(algo, overrides)
        seconds[stage] = time.perf_counter() - t0
    t0 = time.perf_counter()
    print("== evaluation: every policy's greedy answers to 256 held-out prompts, against SFT", flush=True)
    reward_model = reward_model_quality(out, data["preference_eval"])
    result = evaluate(out, data["prompt_eval"])
    seconds["evaluation"] = time.perf_counter() - t0
    summary = {
        "task": TASK,
        "story": STORY,
        "labeller_agreement": reward_model.pop("labeller_agreement"),
        "reward_model": reward_model,
        "baseline": "sft",
        "policies": result["policies"],
        "seconds": seconds,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    t0 = time.perf_counter()
    report = write_report([out], title="rlhf demo: alignment beyond imitation")
    summary["seconds"]["report"] = time.perf_counter() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")

    print(f"\n{format_table(result)}")
    print(
        f"\nreward model on held-out pairs: accuracy {reward_model['accuracy']:.3f} against the labels, "
        f"{reward_model['gold_accuracy']:.3f} against gold; the labellers agree with gold on "
        f"{summary['labeller_agreement']:.3f} of them"
    )
    print(f"\ntotal {sum(seconds.values()):.0f} s; summary {out / 'summary.json'}; report {report}")
    return 0
