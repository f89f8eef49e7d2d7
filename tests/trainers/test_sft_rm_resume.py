"""(b) for both stages: `rlhf train sft|rm` killed with SIGKILL at a random step, then run again with the same
command (checkpoint.resume: auto), ends with bit-identical final weights and an identical metrics.jsonl."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from _toy import wait_for_step
from safetensors.torch import load_file

from rlhf.tasks.sorting import write_task_files
from rlhf.trainers import checkpoint as ckpt

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
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


def launch(stage: str, cfg: dict, path: Path) -> subprocess.Popen:
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "rlhf", "train", stage, "--config", str(path)]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(p: subprocess.Popen) -> int:
    _, err = p.communicate(timeout=180)
    assert p.returncode in (0, -signal.SIGKILL), err[-3000:]
    return p.returncode


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_task_files(tmp_path_factory.mktemp("task"), n_train=256, n_eval=32)


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_sigkill_at_a_random_step_then_resume_is_bit_identical(
    stage: str, tiny_dirs: dict[str, str], data: dict[str, Path], tmp_path: Path
) -> None:
    kill_at = random.Random(f"{stage}-20240611").randint(6, 30)
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "killed"
    reference = launch(stage, config(stage, tiny_dirs["llama"], data, ref_dir), tmp_path / "reference.yaml")
    cfg_path = tmp_path / "run.yaml"
    victim = launch(stage, config(stage, tiny_dirs["llama"], data, run_dir), cfg_path)
    wait_for_step(victim, run_dir, kill_at, timeout=120)
    victim.kill()
    assert finish(victim) == -signal.SIGKILL
    assert not (run_dir / "final").exists(), "the run finished before it was killed"
    latest = ckpt.find_latest_complete(run_dir / "checkpoints")
    assert latest is not None
    resumed_at = int(latest.name.removeprefix("step-"))

    rerun = subprocess.run(
        [sys.executable, "-m", "rlhf", "train", stage, "--config", str(cfg_path)],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert finish(reference) == 0

    perf = [json.loads(line) for line in (run_dir / "perf.jsonl").read_text().splitlines()]
    elapsed = {p["step"]: p["perf/elapsed_s"] for p in perf}
    assert elapsed[resumed_at + 1] < elapsed[resumed_at], "the rerun did not continue from the checkpoint"
    a, b = load_file(ref_dir / "final" / "model.safetensors"), load_file(run_dir / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (ref_dir / "metrics.jsonl").read_bytes() == (run_dir / "metrics.jsonl").read_bytes()
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
    if stage == "rm":
        assert (ref_dir / "calibration.json").read_bytes() == (run_dir / "calibration.json").read_bytes()
