"""The contract every `rlhf train` algorithm keeps, checked for each name in `cli.ALGORITHMS` (a new trainer is
covered the day it is added): with LoRA adapters,

* `rlhf train ALGO` killed with SIGKILL mid-run, then run again with the same command (`checkpoint.resume: auto`),
  ends bit-identical to an uninterrupted run (final weights, metrics.jsonl);
* `final/` is one plain `transformers` checkpoint (no adapter files), loadable by `AutoModelForCausalLM` (reward
  models: `AutoModelForSequenceClassification`), and `final_adapter/` is the adapter with an absolute base path,
  so it loads from another working directory although the run was given a relative `model.path`;
* every logged metric is a finite number.

The runs are short (tiny model, a dozen steps); the online ones are paced by a reward function that sleeps.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import transformers
import yaml
from _resume import assert_same_run, finish, kill_at_step, launch

from rlhf import cli
from rlhf.cli import ALGORITHMS
from rlhf.tasks.sorting import write_task_files

ONLINE = ("ppo", "grpo", "rloo")
DATA = {"sft": "sft", "rm": "preference", "dpo": "preference", "kto": "unpaired"}
STEPS, KILL_AT = 15, 7


def config(algo: str, data: dict[str, Path], out: str) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "output_dir": out,
        "seed": 5,
        "model": {"path": "tiny", "lora": {"r": 4, "alpha": 8}},
        "data": {"train": str(data[DATA.get(algo, "prompt")]), "max_length": 40, "max_prompt_length": 24},
        "optim": {"lr": 3e-3},
        "schedule": {"name": "cosine", "warmup_steps": 2},
        "train": {"batch_size": 4, "micro_batch_size": 2, "max_steps": STEPS},
        "logging": {"progress": False},
        "checkpoint": {"every": 3, "keep_last": 2},
    }
    if algo in ONLINE:
        cfg["rollout"] = {"batch_size": 4 if algo == "ppo" else 2, "forward_batch_size": 4, "max_new_tokens": 6}
        cfg["reward"] = {"function": "_ppo_helpers:slow_gold_reward"}
        cfg["samples_every"] = 1
    if algo in ("grpo", "rloo"):
        cfg["group_size"] = 2
    return cfg


def run_cli(algo: str, cfg: dict[str, Any], cwd: Path, name: str) -> Any:
    (cwd / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    return launch([sys.executable, "-m", "rlhf", "train", algo, "--config", f"{name}.yaml"], cwd=cwd)


@pytest.fixture(scope="module")
def workdir(tiny_dirs: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """A directory holding the tiny model as `tiny/` (runs name it by a relative path) and the task's files."""
    root = tmp_path_factory.mktemp("contract")
    os.symlink(tiny_dirs["llama"], root / "tiny")
    return root, write_task_files(root / "data", n_train=64, n_eval=8)


@pytest.mark.parametrize("algo", list(ALGORITHMS))
def test_lora_run_resumes_bit_identically_and_saves_a_plain_checkpoint(
    algo: str, workdir: tuple[Path, dict[str, Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, data = workdir
    killed = tmp_path / "killed"
    cfg = config(algo, data, str(killed))
    kill_at_step(run_cli(algo, cfg, root, algo), killed, KILL_AT)
    resumed = run_cli(algo, cfg, root, algo)
    monkeypatch.chdir(root)  # the uninterrupted twin runs in this process meanwhile, on the same relative paths
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "support"))
    (root / f"{algo}-ref.yaml").write_text(yaml.safe_dump(config(algo, data, str(tmp_path / "uninterrupted"))))
    assert cli.main(["train", algo, "--config", f"{algo}-ref.yaml"]) == 0
    finish(resumed)
    assert_same_run(tmp_path / "uninterrupted", killed)

    for line in (killed / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        bad = {k: v for k, v in row.items() if not (isinstance(v, int | float) and math.isfinite(v))}
        assert not bad, f"step {row['step']}: {bad}"
    assert json.loads(line)["step"] >= STEPS

    final, adapter = killed / "final", killed / "final_adapter"
    assert not (final / "adapter_config.json").exists() and (final / "model.safetensors").is_file()
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base).is_absolute() and Path(base) == (root / "tiny").resolve()
    monkeypatch.chdir(tmp_path)  # somewhere the run's relative model.path means nothing
    auto = transformers.AutoModelForSequenceClassification if algo == "rm" else transformers.AutoModelForCausalLM
    kw = {"num_labels": 1} if algo == "rm" else {}
    plain = auto.from_pretrained(final)
    lora = peft.PeftModel.from_pretrained(
        auto.from_pretrained(peft.PeftConfig.from_pretrained(adapter).base_model_name_or_path, **kw), adapter
    )
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, lora.merge_and_unload()(input_ids=ids).logits)
