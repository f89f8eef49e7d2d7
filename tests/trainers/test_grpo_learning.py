"""GRPO and RLOO learn: a tiny policy, briefly supervised on the built-in sorting task, raises its mean gold reward
(`rlhf.tasks.sorting:gold_reward`, a Python function; optimum 1.0) clearly within 4096 completions (64 iterations
of 16 prompts x 4), with the KL to the reference in the loss (GRPO) or in the reward (RLOO). Run with -s to see
the curve."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf import cli
from rlhf.config import load_config

from _ppo_helpers import read_jsonl, sft_warm_start, write_prompts  # isort: skip

ITERATIONS, QUARTER = 64, 16


@pytest.fixture(scope="module")
def start(tiny_dirs, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("grpo_learn")
    return sft_warm_start(tiny_dirs["llama"], root / "sft", steps=60), write_prompts(root / "prompts.jsonl", 512)


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_mean_gold_reward_rises(algo, start, tmp_path):
    policy, prompts = start
    module = cli.trainer_module(algo)
    preset = module.PRESETS.get(algo)
    cfg = load_config(
        module.Config,
        None,
        [
            f"--output_dir={tmp_path}",
            f"--model.path={policy}",
            f"--data.train={prompts}",
            "--data.max_length=40",
            "--data.max_prompt_length=24",
            "--reward.function=rlhf.tasks.sorting:gold_reward",
            "--rollout.batch_size=16",
            "--rollout.max_new_tokens=10",
            "--train.batch_size=32",
            "--train.micro_batch_size=32",
            f"--total_episodes={ITERATIONS * 64}",
            "--optim.lr=2e-3",
            "--schedule.name=constant",
            "--logging.progress=false",
            *(["--kl.coef=0.02"] if algo == "rloo" else []),
        ],
        preset=preset,
    )
    module.train(cfg)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert len(rows) == ITERATIONS and rows[-1]["grpo/episodes"] == ITERATIONS * 64
    curve = [sum(r["reward/score"] for r in rows[i : i + QUARTER]) / QUARTER for i in range(0, ITERATIONS, QUARTER)]
    print(f"{algo}: mean gold reward per 1024 completions", [round(c, 3) for c in curve])
    assert curve[-1] > curve[0] + 0.12, curve
    # The policy stays near the reference: the mean KL of the last 16 iterations was 2.47-2.75 (GRPO) and 2.20-2.65
    # (RLOO) over seeds 0-5, while single iterations reached 5.6 (one of 64, GRPO, seed 0). At this length of run
    # GRPO's KL term makes no difference to it (2.52-2.79 with kl.coef 1e-6, seeds 0-2): the loss's tests cover it.
    kl = [r["objective/kl"] for r in rows]
    assert sum(kl[-QUARTER:]) / QUARTER < 4.0, kl
    assert (tmp_path / "final" / "model.safetensors").is_file()
