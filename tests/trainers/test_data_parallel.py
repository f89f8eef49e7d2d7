"""The trainers under data parallelism: `accelerate launch` on 2 CPU processes (gloo, DDP) trains what one process
trains on the same global batch (SFT, DPO with a shared prompt, GRPO, PPO), and a 2-process run killed with
SIGKILL resumes bit-identically.

Why one process and two agree: the engine scales each process's loss sum by the global count of units, so the
gradient is the global batch's however it is split. For the online trainers, a rollout row's sampling noise is
keyed by (seed, iteration, its place in the global batch), so both sample the same completions; the statistics
over the batch (score normalising, advantage whitening, REINFORCE++'s normalisation) are all-reduced; a group
stays on one process; with one minibatch per epoch every optimizer step sees the same rows either way.

What differs is the order of float sums (the gradient all-reduce, the statistics), ~1e-7 relative, which Adam's
normalised steps carry into the weights: measured at most 5e-7 (GRPO, 8 steps) and 3e-6 (PPO with its critic
and whitening, 8 steps), hence atol 1e-5. The weights move by ~1e-3 a step at lr 1e-3, and GRPO and PPO with
each process normalising on its own statistics (no all-reduce) miss by more than 1e-5.

The kill-and-resume run is marked slow (19 s here): `make test-slow` runs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rlhf import cli
from rlhf.tasks.sorting import write_task_files

from _resume import ENV, accelerate_launch, assert_same_run, wait_for_step  # isort: skip

ITERATIONS = 4


def config(algo: str, model: str, data: dict[str, Path], out: Path, iterations: int = ITERATIONS) -> dict[str, Any]:
    """A global batch of 8 rows in micro-batches of 2 (so 2 processes accumulate 2 each, 1 process 4); the online
    runs: `iterations` of 4 prompts, one minibatch of the whole rollout per epoch."""
    cfg: dict[str, Any] = {
        "output_dir": str(out),
        "seed": 3,
        "model": {"path": model},
        "data": {"max_length": 40, "max_prompt_length": 24},
        "optim": {"lr": 1e-3},
        "schedule": {"name": "constant"},
        "train": {"batch_size": 8, "micro_batch_size": 2, "max_steps": 2 * iterations},
        "logging": {"progress": False},
        "checkpoint": {"every": 1},
    }
    if algo in ("sft", "dpo"):  # DPO with its default shared prompt and the reference on the fly
        cfg["data"]["train"] = str(data["sft" if algo == "sft" else "preference"])
        return cfg
    del cfg["train"]["max_steps"]
    cfg["data"]["train"] = str(data["prompt"])
    cfg["samples_every"] = 0
    # the length penalty makes the shaped scores differ although the random model scores 0 on gold
    cfg["reward"] = {"function": "_ppo_helpers:slow_gold_reward", "normalize": True, "length_penalty": 0.1}
    cfg["rollout"] = {"batch_size": 4, "forward_batch_size": 2, "max_new_tokens": 6, "temperature": 1.0}
    if algo == "ppo":
        cfg |= {"ppo_epochs": 2, "total_episodes": 4 * iterations}
        cfg["train"]["batch_size"] = 4
    else:  # GRPO with REINFORCE++'s batch normalisation over the groups of both processes, KL in the loss
        cfg |= {"group_size": 2, "ppo_epochs": 2, "advantage": "reinforce_pp", "total_episodes": 8 * iterations}
    return cfg


def launch_two(algo: str, config_file: Path) -> subprocess.Popen:
    """`accelerate launch -m rlhf train ALGO` on 2 CPU processes (gloo)."""
    cmd = [*accelerate_launch(2), "-m", "rlhf", "train", algo, "--config", str(config_file)]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant (torchrun starts its workers in sessions of their own, so a
    process group does not reach them), children first found, then all killed at once."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    tree, frontier = [pid], [pid]
    while frontier:
        frontier = [child for child, parent in parents.items() if parent in frontier]
        tree += frontier
    for p in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def finish(p: subprocess.Popen) -> tuple[str, str]:
    """The launch's stdout and stderr, once it exited 0."""
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-16000:]  # torchrun's own failure summary alone takes ~3000 characters
    return out, err


def rows(run_dir: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_task_files(tmp_path_factory.mktemp("dp"), n_train=64, n_eval=8)


@pytest.mark.parametrize("algo", ["sft", "dpo", "grpo", "ppo"])
def test_two_processes_train_what_one_process_trains(algo, tiny_dirs, data, tmp_path, monkeypatch):
    two, one = tmp_path / "two", tmp_path / "one"
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(config(algo, tiny_dirs["llama"], data, two)))
    p = launch_two(algo, tmp_path / "two.yaml")
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(config(algo, tiny_dirs["llama"], data, one)))
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "support"))
    assert cli.main(["train", algo, "--config", str(tmp_path / "one.yaml")]) == 0  # meanwhile, in this process
    finish(p)

    a, b = load_file(one / "final" / "model.safetensors"), load_file(two / "final" / "model.safetensors")
    start = load_file(Path(tiny_dirs["llama"]) / "model.safetensors")
    assert a.keys() == b.keys()
    moved = max(float((a[k] - start[k]).abs().max()) for k in start)
    assert moved > 1e-3, "it trained"
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=0, msg=key)
    m1, m2 = rows(one), rows(two)
    assert len(m1) == len(m2) and len(m1) >= ITERATIONS
    online = ("reward/score", "response/length", "objective/kl", "hacking/length_drift")
    for key in ("train/loss", "train/units", *(online if algo in ("grpo", "ppo") else ())):
        assert [r[key] for r in m2] == pytest.approx([r[key] for r in m1], rel=1e-5, abs=1e-6), key


@pytest.mark.slow
def test_two_processes_killed_and_resumed_are_bit_identical(tiny_dirs, data, tmp_path):
    """GRPO on 2 processes (2 steps an iteration), SIGKILL to the whole launch once step 4 is logged (the checkpoint
    of step 2 is written by then), the same launch
    again: final weights and metrics.jsonl byte for byte those of an uninterrupted 2-process run."""
    runs = {}
    for name in ("killed", "uninterrupted"):
        runs[name] = tmp_path / name
        cfg = config("grpo", tiny_dirs["llama"], data, runs[name], iterations=12)
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    p = launch_two("grpo", tmp_path / "killed.yaml")
    wait_for_step(p, runs["killed"], 4, timeout=180)
    kill_tree(p.pid)
    p.communicate(timeout=60)
    assert not (runs["killed"] / "final").exists(), "the run finished before it was killed"
    assert "rlhf: resumed at step" in finish(launch_two("grpo", tmp_path / "killed.yaml"))[1]
    finish(launch_two("grpo", tmp_path / "uninterrupted.yaml"))
    assert_same_run(runs["uninterrupted"], runs["killed"])


@pytest.mark.parametrize("algo", ["dpo", "kto"])
def test_two_processes_share_the_reference_pass_and_the_evaluation(
    algo, tiny_dirs, data, tmp_path, monkeypatch, capsys
):
    """precompute_ref: on 2 processes each scores half of every split (the main one's progress bar counts 16 batches
    of 2 of the 64 training examples where one process alone counts 32) and the main one gathers the halves, so the
    cache holds what one process computes alone (every row: a share left out would stay 0). The evaluation deals its
    batches out too (2 of the 4 on the main process), and logs what one process logs; the runs train alike."""
    kind = "preference" if algo == "dpo" else "unpaired"
    runs = {}
    for name in ("one", "two"):
        runs[name] = tmp_path / name
        cfg = config("dpo", tiny_dirs["llama"], data, runs[name]) | {"precompute_ref": True, "score_batch_size": 2}
        cfg["data"] |= {"train": str(data[kind]), "eval": str(data[f"{kind}_eval"])}
        cfg["train"]["eval_every"] = 4
        cfg["logging"]["progress"] = True
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    p = launch_two(algo, tmp_path / "two.yaml")
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "support"))
    assert cli.main(["train", algo, "--config", str(tmp_path / "one.yaml")]) == 0
    out, err = finish(p)
    assert out.count("run directory") == 1, out  # printed by the main process alone
    bars = {"one": capsys.readouterr().err, "two": err}
    totals = {k: re.findall(r"(reference log-probs|\beval): +0%\|[^|]*\| 0/(\d+)", err) for k, err in bars.items()}
    ref, ev = "reference log-probs", "eval"  # the cache's train and eval splits, then the evaluations at steps 4, 8
    assert totals == {
        "one": [(ref, "32"), (ref, "4"), (ev, "4"), (ev, "4")],
        "two": [(ref, "16"), (ref, "2"), (ev, "2"), (ev, "2")],
    }

    (one,), (two,) = ((runs[n] / "ref_logps").iterdir() for n in ("one", "two"))
    a, b = load_file(one), load_file(two)
    rows_per_example = 2 if algo == "dpo" else 1
    assert a.keys() == b.keys() == {"train", "eval"}
    assert a["train"].shape == (64, rows_per_example) and a["eval"].shape == (8, rows_per_example)
    assert bool((a["train"] < 0).all() and (a["eval"] < 0).all())  # log-probs of every example
    for split in a:
        torch.testing.assert_close(b[split], a[split], atol=1e-5, rtol=0, msg=split)
    w1 = load_file(runs["one"] / "final" / "model.safetensors")
    w2 = load_file(runs["two"] / "final" / "model.safetensors")
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], atol=1e-5, rtol=0, msg=key)
    evals = {n: [r for r in rows(runs[n]) if "eval/loss" in r] for n in runs}
    assert [r["step"] for r in evals["one"]] == [r["step"] for r in evals["two"]] == [4, 8]
    for r1, r2 in zip(evals["one"], evals["two"], strict=True):
        keys = [k for k in r1 if k.startswith("eval/")]
        assert len(keys) > 5 and sorted(keys) == sorted(k for k in r2 if k.startswith("eval/"))
        assert [r2[k] for k in keys] == pytest.approx([r1[k] for k in keys], rel=1e-5, abs=1e-6)
