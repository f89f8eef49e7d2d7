"""(b) for both stages: `rlhf train sft|rm` killed with SIGKILL at a random step, then run again with the same
command (checkpoint.resume: auto), ends with bit-identical final weights and an identical metrics.jsonl."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml
from _resume import assert_same_run, finish, kill_at_step, train_cli

from rlhf.runtime import checkpoint as ckpt
from rlhf.tasks.sorting import write_task_files

STEPS = 60


def config(stage: str, model: str, data: dict[str, Path], out: Path) -> dict:
    """Micro-batches of 4 in batches of 8 (accumulation), a checkpoint every 4 steps, eval every 10 steps."""
    train, held_out = ("sft", "sft_eval") if stage == "sft" else ("preference", "preference_eval")
    cfg = {
        "output_dir": str(out),
        "seed": 3,
        "model": {"path": model},
        "data": {"train": str(data[train]), "eval": str(data[held_out]), "max_length": 48, "max_prompt_length": 24},
        "optim": {"lr": 3e-3, "weight_decay": 0.01},
        "schedule": {"name": "cosine", "warmup_steps": 5, "min_lr_ratio": 0.1},
        "train": {"batch_size": 8, "micro_batch_size": 4, "max_steps": STEPS, "eval_every": 10},
        "logging": {"every": 1, "progress": False},
        "checkpoint": {"every": 4, "keep_last": 2},
    }
    if stage == "rm":
        cfg |= {"use_margin": True, "center_coef": 0.01}
    return cfg


def write(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_task_files(tmp_path_factory.mktemp("task"), n_train=256, n_eval=32)


# slow: the default suite kills and resumes every algorithm with LoRA (test_contract.py), and the engine's
# full-weight kill at a random step (tests/runtime/test_resume.py)
@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_sigkill_at_a_random_step_then_resume_is_bit_identical(
    stage: str, tiny_dirs: dict[str, str], data: dict[str, Path], tmp_path: Path
) -> None:
    kill_at = random.Random(f"{stage}-20240611").randint(6, 30)
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "killed"
    reference = train_cli(stage, write(config(stage, tiny_dirs["llama"], data, ref_dir), tmp_path / "reference.yaml"))
    cfg_path = write(config(stage, tiny_dirs["llama"], data, run_dir), tmp_path / "run.yaml")
    kill_at_step(train_cli(stage, cfg_path), run_dir, kill_at)
    latest = ckpt.find_latest_complete(run_dir / "checkpoints")
    assert latest is not None
    resumed_at = int(latest.name.removeprefix("step-"))

    finish(train_cli(stage, cfg_path))
    finish(reference)

    perf = [json.loads(line) for line in (run_dir / "perf.jsonl").read_text().splitlines()]
    elapsed = {p["step"]: p["perf/elapsed_s"] for p in perf}
    assert elapsed[resumed_at + 1] < elapsed[resumed_at], "the rerun did not continue from the checkpoint"
    files = ("metrics.jsonl", "calibration.json") if stage == "rm" else ("metrics.jsonl",)
    assert_same_run(ref_dir, run_dir, files=files)
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
