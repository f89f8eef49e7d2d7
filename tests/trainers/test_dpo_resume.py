"""SIGKILL at a random step, then the same `rlhf train dpo` command again (`checkpoint.resume: auto`), gives the
bit-identical final weights and metrics.jsonl of an uninterrupted run.

The run uses gradient accumulation (8 micro-batches of 2 pairs per step), held-out evaluation lines and the
reference cache, which the resumed process must find and reuse rather than recompute.
"""

from __future__ import annotations

import random
from pathlib import Path

from _dpo_helpers import (
    kill_and_resume,
    make_config,
    metrics,
    task_files,
)
from _resume import assert_same_run

from rlhf.trainers import dpo

STEPS = 40


def test_sigkill_then_resume_is_bit_identical(tiny_dirs: dict[str, str], tmp_path: Path) -> None:
    files = task_files(tmp_path / "data", n_train=160, n_eval=16)

    def cfg(run_dir: Path) -> dpo.Config:
        return make_config(
            dpo,
            output_dir=run_dir,
            precompute_ref=True,
            **{
                "model.path": tiny_dirs["llama"],
                "data.train": files["preference"],
                "data.eval": files["preference_eval"],
                "train.batch_size": 16,
                "train.micro_batch_size": 2,
                "train.max_steps": STEPS,
                "train.eval_every": 10,
                "checkpoint.every": 5,
                "checkpoint.resume": "auto",
                "schedule.name": "cosine",
                "schedule.warmup_steps": 3,
                "optim.lr": 1e-3,
            },
        )

    reference = dpo.train(cfg(tmp_path / "uninterrupted"))
    assert [m["step"] for m in metrics(reference)] == list(range(1, STEPS + 1))

    run_dir = tmp_path / "killed"
    kill_at = random.Random(611).randint(10, 30)
    cache = kill_and_resume("dpo", cfg(run_dir), run_dir, kill_at)
    # the killed run wrote the cache; the resumed one read it (same file, untouched), under the same key as here
    assert cache == {f.name: f.stat().st_mtime_ns for f in (run_dir / "ref_logps").iterdir()}
    assert list(cache) == [f.name for f in (reference / "ref_logps").iterdir()]
    assert_same_run(reference, run_dir)
