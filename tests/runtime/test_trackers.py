"""Trackers: TensorBoard really receives our namespaced metrics; a tracker that cannot start is an error."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf.cli import main
from rlhf.tasks.sorting import write_task_files


def sft(tiny_dirs: dict[str, str], tmp_path: Path, tracker: str) -> int:
    files = write_task_files(tmp_path / "data", n_train=16, n_eval=4)
    return main(["train", "sft", f"--output_dir={tmp_path / 'run'}", f"--model.path={tiny_dirs['llama']}",
                 f"--data.train={files['sft']}", "--train.max_steps=3", "--train.batch_size=4",
                 "--train.micro_batch_size=4", f"--logging.trackers={tracker}",
                 "--logging.progress=false"])  # fmt: skip


def test_tensorboard_gets_event_files_with_our_metric_names(tiny_dirs, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert sft(tiny_dirs, tmp_path, "tensorboard") == 0
    events = list((tmp_path / "run").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file was written"
    scalars = set()
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        scalars |= set(acc.Tags()["scalars"])
    assert {"train/loss", "train/grad_norm", "train/lr", "data/train_rows"} <= scalars
    losses = []
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        losses += acc.Scalars("train/loss") if "train/loss" in acc.Tags()["scalars"] else []
    assert [e.step for e in losses] == [1, 2, 3]


def test_a_tracker_that_is_not_installed_is_an_error(tiny_dirs, tmp_path, capsys, monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    assert sft(tiny_dirs, tmp_path, "wandb") == 1
    err = capsys.readouterr().err.strip()
    assert err == ("rlhf: error: logging.trackers: wandb is not installed, so nothing would be logged there: "
                   "pip install 'rlhf[wandb]' (or wandb), or leave it out")  # fmt: skip
