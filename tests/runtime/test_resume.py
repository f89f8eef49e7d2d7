"""Resume == uninterrupted: the data order, log truncation, and real processes killed with SIGKILL / SIGTERM."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _resume import ENV, last_logged_step, wait_for_step
from _toy import TokenModel, make_engine, split, token_batches, token_loss
from safetensors.torch import load_file

from rlhf.runtime import checkpoint as ckpt
from rlhf.runtime.data_order import DataOrder
from rlhf.runtime.engine import EXIT_INTERRUPTED

TOY = Path(__file__).parents[1] / "support" / "_toy.py"
TOY_ARGS = ["--steps", "12", "--ckpt-every", "2", "--dropout", "0.1"]


# ---------------------------------------------------------------- DataOrder


def test_data_order_is_the_seeded_permutation_with_the_remainder_dropped() -> None:
    order = DataOrder(10, 3, seed=5)
    assert order.steps_per_epoch == 3
    batches = [order.next_batch() for _ in range(6)]
    for epoch in (0, 1):
        perm = torch.randperm(10, generator=torch.Generator().manual_seed(5 * 1_000_003 + epoch)).tolist()
        assert batches[3 * epoch : 3 * epoch + 3] == [perm[0:3], perm[3:6], perm[6:9]]  # perm[9] dropped
    assert batches[:3] != batches[3:]
    state = {"epoch": 1, "position": 3, "seed": 5, "num_samples": 10, "batch_size": 3, "group_by_length": False}
    assert order.state_dict() == state
    assert DataOrder(10, 3, seed=6).next_batch() != batches[0]
    assert DataOrder(7, 3, seed=0, shuffle=False).next_batch() == [0, 1, 2]


def test_data_order_resumes_mid_epoch() -> None:
    a = DataOrder(50, 4, seed=1)
    for _ in range(17):  # into epoch 1 (12 batches per epoch)
        a.next_batch()
    b = DataOrder(50, 4, seed=1)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert [b.next_batch() for _ in range(20)] == [a.next_batch() for _ in range(20)]


def test_data_order_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="fewer than one batch"):
        DataOrder(3, 4, seed=0)
    state = DataOrder(50, 4, seed=1).state_dict()
    with pytest.raises(ValueError, match="num_samples=50"):
        DataOrder(60, 4, seed=1).load_state_dict(state)


def test_data_order_grouped_by_length_draws_batches_of_like_length() -> None:
    """`lengths` (data.group_by_length): each epoch's kept permutation in groups of 50 batches, each group sorted
    longest first and cut into batches, the batches in a shuffled order; a padded batch then pads little."""
    rng = random.Random(0)
    lengths = [min(2048, int(rng.lognormvariate(5.5, 0.8)) + 1) for _ in range(1003)]  # long-tailed, like real data
    grouped, plain = DataOrder(1003, 8, seed=2, lengths=lengths, group_by_length=True), DataOrder(1003, 8, seed=2)
    epoch = [grouped.next_batch() for _ in range(grouped.steps_per_epoch)]  # 125 batches, 3 examples dropped
    kept = torch.randperm(1003, generator=torch.Generator().manual_seed(2 * 1_000_003)).tolist()[:1000]
    expected = []
    for start in range(0, 1000, 400):
        group = sorted(kept[start : start + 400], key=lambda i: -lengths[i])
        expected += [group[b : b + 8] for b in range(0, len(group), 8)]
    assert sorted(epoch) == sorted(expected)
    assert epoch[:50] != expected[:50]  # shuffled, not the groups' longest-first order

    def padded(batches: list[list[int]]) -> float:
        return sum(len(b) * max(lengths[i] for i in b) for b in batches) / sum(lengths[i] for b in batches for i in b)

    assert padded(epoch) < 1.1 < 2.0 < padded([plain.next_batch() for _ in range(plain.steps_per_epoch)])
    assert grouped.next_batch() not in epoch  # the next epoch's batches are others

    resumed = DataOrder(1003, 8, seed=2, lengths=lengths, group_by_length=True)
    resumed.load_state_dict(json.loads(json.dumps(grouped.state_dict())))
    assert [resumed.next_batch() for _ in range(130)] == [grouped.next_batch() for _ in range(130)]
    with pytest.raises(ValueError, match="group_by_length=True"):
        DataOrder(1003, 8, seed=2).load_state_dict(grouped.state_dict())


# ---------------------------------------------------------------- log truncation


def _log_steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_resume_truncates_step_logs_to_the_checkpoint(tmp_path: Path) -> None:
    batches = token_batches(5)
    with make_engine(TokenModel(), tmp_path, ckpt_every=2) as engine:
        engine.resume()
        for b in batches:  # steps 1..5; the last checkpoint is step 4
            engine.log(engine.train_step(split(b, 8), token_loss))
            engine.maybe_save_checkpoint()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "train/lo')  # a line torn by a crash
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps({"step": s, "text": "x"}) + "\n" for s in (2, 5)))
    with make_engine(TokenModel(), tmp_path) as engine:
        assert engine.resume() and engine.step == 4
    assert _log_steps(tmp_path / "metrics.jsonl") == [1, 2, 3, 4]
    assert _log_steps(tmp_path / "perf.jsonl") == [1, 2, 3, 4]
    assert _log_steps(tmp_path / "samples.jsonl") == [2]
    with make_engine(TokenModel(), tmp_path, resume="never") as engine:
        assert not engine.resume()
    assert (tmp_path / "metrics.jsonl").read_text() == ""


# ---------------------------------------------------------------- real processes


def _toy(run_dir: Path, *extra: str, **popen) -> subprocess.Popen:
    cmd = [sys.executable, str(TOY), "--run-dir", str(run_dir), *TOY_ARGS, *extra]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _finish(p: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def assert_identical_runs(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert (a / "metrics.jsonl").read_bytes() == (b / "metrics.jsonl").read_bytes()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run."""
    run_dir = tmp_path_factory.mktemp("reference")
    rc, _, err = _finish(_toy(run_dir))
    assert rc == 0, err[-3000:]
    assert _log_steps(run_dir / "metrics.jsonl") == list(range(1, 13))
    return run_dir


def test_sigkill_at_a_random_step_then_resume_is_bit_identical(tmp_path: Path, reference: Path) -> None:
    """(b) SIGKILL (no handler runs) at a seeded random step in [3, 9], then `resume: auto`."""
    kill_at = random.Random(20240611).randint(3, 9)
    p = _toy(tmp_path, "--step-sleep", "0.15")
    wait_for_step(p, tmp_path, kill_at)
    p.kill()
    assert _finish(p)[0] == -signal.SIGKILL
    assert not (tmp_path / "final").exists()
    latest = ckpt.find_latest_complete(tmp_path / "checkpoints")
    assert latest is not None
    rc, out, err = _finish(_toy(tmp_path))
    assert rc == 0, err[-3000:]
    assert f"resumed at step {latest.name.removeprefix('step-')}" in out
    assert_identical_runs(reference, tmp_path)


def test_sigterm_checkpoints_exits_75_and_resumes_identically(tmp_path: Path, reference: Path) -> None:
    p = _toy(tmp_path, "--step-sleep", "0.3")
    wait_for_step(p, tmp_path, 3)
    p.send_signal(signal.SIGTERM)
    rc, _, err = _finish(p)
    assert rc == EXIT_INTERRUPTED, err[-3000:]
    stopped_at = last_logged_step(tmp_path / "metrics.jsonl")
    assert f"interrupted at step {stopped_at}" in err
    ckpt.verify_checkpoint(tmp_path / "checkpoints" / f"step-{stopped_at}")
    rc, out, err = _finish(_toy(tmp_path))
    assert rc == 0, err[-3000:]
    assert f"resumed at step {stopped_at}" in out
    assert_identical_runs(reference, tmp_path)
