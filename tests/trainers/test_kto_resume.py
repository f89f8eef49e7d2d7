"""SIGKILL at a random step, then the same `rlhf train kto` command again (`checkpoint.resume: auto`), gives the
bit-identical final weights and metrics.jsonl of an uninterrupted run (accumulation, eval lines, reference cache).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from _dpo_helpers import (
    kill_and_resume,
    make_config,
    metrics,
    task_files,
)
from _resume import assert_same_run

from rlhf.trainers import kto

STEPS = 36


# slow: the default suite kills and resumes every algorithm with LoRA (test_contract.py), and DPO's resume test
# covers the reference cache KTO shares
@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tiny_dirs: dict[str, str], tmp_path: Path) -> None:
    files = task_files(tmp_path / "data", n_train=160, n_eval=16)

    def cfg(run_dir: Path) -> kto.Config:
        return make_config(
            kto,
            output_dir=run_dir,
            precompute_ref=True,
            **{
                "model.path": tiny_dirs["llama"],
                "data.train": files["unpaired"],
                "data.eval": files["unpaired_eval"],
                "train.batch_size": 16,
                "train.micro_batch_size": 2,
                "train.max_steps": STEPS,
                "train.eval_every": 10,
                "checkpoint.every": 5,
                "checkpoint.resume": "auto",
                "schedule.name": "cosine",
                "optim.lr": 1e-3,
            },
        )

    reference = kto.train(cfg(tmp_path / "uninterrupted"))
    assert [m["step"] for m in metrics(reference)] == list(range(1, STEPS + 1))
    run_dir = tmp_path / "killed"
    cache = kill_and_resume("kto", cfg(run_dir), run_dir, random.Random(612).randint(10, 25))
    assert cache == {f.name: f.stat().st_mtime_ns for f in (run_dir / "ref_logps").iterdir()}
    assert_same_run(reference, run_dir)
