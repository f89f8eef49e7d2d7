"""`rlhf train ppo` killed with SIGKILL at a seeded random iteration, then rerun with the same command
(`checkpoint.resume: auto`), ends bit-identical to an uninterrupted run: final/ and final_value/ tensors,
metrics.jsonl and samples.jsonl bytes. So does a run stopped by SIGTERM (checkpoint between iterations, exit 75).

The run covers every piece of state a resume needs: the prompt order, generation from torch's global RNG, the
adaptive KL coefficient, the iteration count, optimizer and schedule. Its reward is an ensemble of a gpt2-family
reward model (another tokenizer than the llama-family policy) and the gold reward, slowed down by 50 ms per
iteration (`_ppo_helpers:slow_gold_reward`) so the kill lands mid-run.
"""

from __future__ import annotations

import random
import signal
from pathlib import Path

import pytest
import yaml

from rlhf.runtime import checkpoint as ckpt
from rlhf.runtime.engine import EXIT_INTERRUPTED

from _ppo_helpers import write_prompts  # isort: skip
from _resume import assert_same_run, finish, kill_at_step, last_logged_step, train_cli, wait_for_step  # isort: skip

STEPS_PER_ITERATION, ITERATIONS = 4, 12  # 2 ppo_epochs x (8 responses / minibatches of 4)


def write_config(path: Path, run_dir: Path, tiny_dirs: dict[str, str], prompts: Path) -> Path:
    cfg = {
        "output_dir": str(run_dir),
        "seed": 3,
        "total_episodes": 8 * ITERATIONS,
        "ppo_epochs": 2,
        "samples_every": 2,
        "num_samples": 2,
        "model": {"path": tiny_dirs["llama"]},
        "data": {"train": str(prompts), "max_length": 40, "max_prompt_length": 24},
        "rollout": {"batch_size": 8, "forward_batch_size": 8, "max_new_tokens": 6},
        "reward": {
            "models": [tiny_dirs["gpt2"]],
            "functions": ["_ppo_helpers:slow_gold_reward"],
            "weights": [0.5, 1.0],
            "uncertainty_penalty": 0.1,
            "missing_eos_penalty": 0.05,
        },
        "kl": {"coef": 0.05, "target": 0.5, "horizon": 100},
        "optim": {"lr": 3e-3},
        "train": {"batch_size": 4, "micro_batch_size": 2},
        "logging": {"progress": False},
        "checkpoint": {"every": STEPS_PER_ITERATION, "keep_last": 2},
    }
    path.write_text("# rlhf train ppo\n" + yaml.safe_dump(cfg))
    return path


def assert_identical(want_dir: Path, got_dir: Path) -> None:
    assert last_logged_step(got_dir / "metrics.jsonl") == STEPS_PER_ITERATION * ITERATIONS
    assert_same_run(want_dir, got_dir, weights=("final", "final_value"), files=("metrics.jsonl", "samples.jsonl"))


@pytest.fixture(scope="module")
def inputs(tiny_dirs, tmp_path_factory) -> tuple[dict[str, str], Path]:
    return tiny_dirs, write_prompts(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", 48, seed=5)


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory) -> Path:
    """The uninterrupted run."""
    root = tmp_path_factory.mktemp("reference")
    finish(train_cli("ppo", write_config(root / "ppo.yaml", root / "run", *inputs)))
    return root / "run"


# slow: the default suite kills and resumes every algorithm with LoRA (test_contract.py); the SIGTERM test
# below stays in it
@pytest.mark.slow
def test_sigkill_then_resume_auto_is_bit_identical(inputs, reference: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "ppo.yaml", run_dir, *inputs)
    kill_at = STEPS_PER_ITERATION * random.Random(20240611).randint(2, 7)
    kill_at_step(train_cli("ppo", config), run_dir, kill_at)
    latest = ckpt.find_latest_complete(run_dir / "checkpoints")
    assert latest is not None and int(latest.name.removeprefix("step-")) >= STEPS_PER_ITERATION
    err = finish(train_cli("ppo", config))
    assert f"resumed at step {latest.name.removeprefix('step-')}" in err
    assert_identical(reference, run_dir)


def test_sigterm_stops_between_iterations_and_resumes_identically(inputs, reference: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "ppo.yaml", run_dir, *inputs)
    p = train_cli("ppo", config)
    wait_for_step(p, run_dir, 2 * STEPS_PER_ITERATION)
    p.send_signal(signal.SIGTERM)
    err = finish(p, EXIT_INTERRUPTED)
    stopped_at = last_logged_step(run_dir / "metrics.jsonl")
    assert stopped_at % STEPS_PER_ITERATION == 0 and f"interrupted at step {stopped_at}" in err
    ckpt.verify_checkpoint(run_dir / "checkpoints" / f"step-{stopped_at}")
    err = finish(train_cli("ppo", config))
    assert f"resumed at step {stopped_at}" in err
    assert_identical(reference, run_dir)
