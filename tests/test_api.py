"""The Python entry (`rlhf.train`, `rlhf.train_config`, the re-exported configs) and examples/pipeline.py."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import rlhf
from rlhf.config import ConfigError

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pipeline.py"


def test_configs_come_from_defaults_preset_source_and_values_in_that_order(tmp_path):
    yaml_file = tmp_path / "dpo.yaml"
    yaml_file.write_text("beta: 0.2\noptim:\n  lr: 0.001\n")
    cfg = rlhf.train_config("dpo", yaml_file, optim={"lr": 5e-4})
    assert isinstance(cfg, rlhf.DPOConfig) and (cfg.beta, cfg.optim.lr) == (0.2, 5e-4)
    assert rlhf.train_config("dpo", cfg).beta == 0.2  # a Config instance is a source too
    rloo = rlhf.train_config("rloo", {"group_size": 3})
    assert isinstance(rloo, rlhf.GRPOConfig) and (rloo.advantage, rloo.group_size) == ("rloo", 3)
    with pytest.raises(ConfigError, match=r"optim.lr: must be > 0"):
        rlhf.train_config("sft", optim={"lr": -1.0})
    with pytest.raises(
        ConfigError, match="unknown key 'learning_rate' \\(that is TRL's name; here it is 'optim.lr'\\)"
    ):
        rlhf.train_config("sft", learning_rate=1e-5)
    with pytest.raises(ConfigError, match="unknown algorithm 'sf'"):
        rlhf.train_config("sf")


def test_the_example_pipeline_runs_and_its_models_load(tmp_path, monkeypatch):
    """examples/pipeline.py --quick: SFT -> RM -> PPO on a Python reward function given by file path -> DPO, from
    Python; every final/ loads with plain transformers."""
    spec = importlib.util.spec_from_file_location("pipeline_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "pipeline_example", module)
    spec.loader.exec_module(module)
    runs = module.main(["--out", str(tmp_path), "--quick"])
    assert list(runs) == ["sft", "rm", "ppo", "dpo"]
    for name, run in runs.items():
        auto = AutoModelForSequenceClassification if name == "rm" else AutoModelForCausalLM
        auto.from_pretrained(run / "final")
    assert module.brevity_gold(["p"], ["abc"], ["cba"]) == [pytest.approx(1.0 - 0.03)]
