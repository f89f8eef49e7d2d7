"""The Python entry: every `rlhf train` stage as a function call, with the command line's validation and errors.

    import rlhf

    sft = rlhf.train("sft", model={"path": "base"}, data={"train": "sft.jsonl"}, output_dir="runs/sft")
    cfg = rlhf.train_config("dpo", "configs/dpo.yaml", beta=0.3, model={"path": str(sft / "final")})
    dpo = rlhf.train("dpo", cfg)

A stage's config comes from, in order: the dataclass defaults, the algorithm's preset (`rloo`), `source` (a YAML
path, a nested mapping, or a `Config` instance), then the keyword `values` (nested mappings per section). It is
validated as `rlhf train` validates it (a `ConfigError` names the key); `train` returns the run directory.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def train_config(algorithm: str, source: str | Path | Mapping[str, Any] | Any = None, /, **values: Any) -> Any:
    """The validated `Config` of `rlhf train <algorithm>` (see the module docstring)."""
    import dataclasses

    from rlhf.cli import ALGORITHMS, trainer_module
    from rlhf.config import ConfigError, load_config, to_dict

    if algorithm not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm {algorithm!r}; expected one of {', '.join(ALGORITHMS)}")
    module = trainer_module(algorithm)
    path, mappings = None, []
    if isinstance(source, str | Path):
        path = source
    elif dataclasses.is_dataclass(source) and not isinstance(source, type):
        mappings.append(to_dict(source))
    elif isinstance(source, Mapping):
        mappings.append(source)
    elif source is not None:
        raise TypeError(f"source: a YAML path, a mapping or a Config, got {type(source).__name__}")
    preset = getattr(module, "PRESETS", {}).get(algorithm)
    return load_config(module.Config, path, preset=preset, values=[*mappings, values])


def train(algorithm: str, source: str | Path | Mapping[str, Any] | Any = None, /, **values: Any) -> Path:
    """Run one stage (`rlhf train <algorithm>`) and return its run directory (`final/` holds the model)."""
    from rlhf.cli import trainer_module

    cfg = train_config(algorithm, source, **values)
    return Path(trainer_module(algorithm).train(cfg))
