"""rlhf: align language models with human preferences (SFT, reward models, PPO, GRPO/RLOO, the DPO family).

    import rlhf
    run_dir = rlhf.train("sft", model={"path": "base"}, data={"train": "sft.jsonl"})

`rlhf.train` and `rlhf.train_config` (`rlhf.api`) run any stage from Python; the typed configs are here too
(`rlhf.SFTConfig`, `rlhf.RMConfig`, `rlhf.DPOConfig`, `rlhf.KTOConfig`, `rlhf.PPOConfig`, `rlhf.GRPOConfig`).
Importing the package stays cheap: torch and transformers load on first use.
"""

from __future__ import annotations

from typing import Any

from rlhf.api import train, train_config

__version__ = "0.1.0"

CONFIGS = {"SFTConfig": "sft", "RMConfig": "reward", "DPOConfig": "dpo", "KTOConfig": "kto", "PPOConfig": "ppo",
           "GRPOConfig": "grpo"}  # fmt: skip
"""Re-exported name -> trainer module (rlhf.trainers.<module>.Config)."""


def __getattr__(name: str) -> Any:
    if name in CONFIGS:
        import importlib

        return importlib.import_module(f"rlhf.trainers.{CONFIGS[name]}").Config
    raise AttributeError(f"module 'rlhf' has no attribute {name!r}")


__all__ = ["__version__", "train", "train_config", *CONFIGS]
