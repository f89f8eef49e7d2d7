"""Kill-and-resume through the command line, shared by every stage's resume test: start `rlhf train ALGO`,
wait for a step in metrics.jsonl, kill it, rerun the same command, and compare with an uninterrupted run.

Subprocesses run on one intra-op thread, like the in-process tests (tests/conftest.py), so a run made in the
test process and one made by the command line are bit-identical.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

HERE = Path(__file__).parent
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "CUDA_VISIBLE_DEVICES": "",
    "TOKENIZERS_PARALLELISM": "false",
    # reward functions named `module:function` in test configs live beside this file
    "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
}


def last_logged_step(path: Path) -> int:
    """The step of the last complete line of a metrics.jsonl that is being written (0 if none yet)."""
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().split("\n")[:-1] if line]
    return json.loads(lines[-1])["step"] if lines else 0


def wait_for_step(p: subprocess.Popen, run_dir: Path, step: int, timeout: float = 120) -> None:
    """Poll the run's metrics.jsonl until it shows `step`; fail if the process ends first."""
    deadline = time.monotonic() + timeout
    while last_logged_step(run_dir / "metrics.jsonl") < step:
        assert p.poll() is None, f"the run ended before step {step}: {p.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(processes: int = 2) -> list[str]:
    """The start of an `accelerate launch` command line for `processes` CPU processes (gloo).

    `accelerate launch --cpu --num_processes 2` starts ONE process unless an MPI hostfile is given (its simple
    launcher just runs `python script`), so this takes the torchrun path (`--multi_gpu`); with CUDA hidden (as in
    ENV) the Engine builds a CPU Accelerator and accelerate initialises gloo.
    """
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1"]
    return cmd + ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]


def launch(cmd: Sequence[str], cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen(list(cmd), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)


def train_cli(algo: str, config: Path) -> subprocess.Popen:
    """`python -m rlhf train ALGO --config CONFIG` in the background."""
    return launch([sys.executable, "-m", "rlhf", "train", algo, "--config", str(config)])


def finish(p: subprocess.Popen, expected: int = 0) -> str:
    """Wait for the process; assert its exit status; return its stderr."""
    _, err = p.communicate(timeout=180)
    assert p.returncode == expected, f"exit {p.returncode}, expected {expected}: {err[-3000:]}"
    return err


def kill_at_step(p: subprocess.Popen, run_dir: Path, step: int) -> None:
    """SIGKILL the run once metrics.jsonl shows `step`, and check it really died mid-run."""
    wait_for_step(p, run_dir, step)
    p.kill()
    finish(p, -signal.SIGKILL)
    assert not (run_dir / "final").exists(), "the run finished before it was killed: make it longer"


def assert_same_run(
    want: Path, got: Path, *, weights: Sequence[str] = ("final",), files: Sequence[str] = ("metrics.jsonl",)
) -> None:
    """Bit-identical tensors in each `weights` subdirectory and identical bytes of each of `files`."""
    for sub in weights:
        a, b = load_file(want / sub / "model.safetensors"), load_file(got / sub / "model.safetensors")
        assert a.keys() == b.keys(), sub
        for key in a:
            assert torch.equal(a[key], b[key]), f"{sub}: {key}"
    for name in files:
        assert (want / name).read_bytes() == (got / name).read_bytes(), name
