"""The `transformers` model inside the wrappers that training puts around it."""

from __future__ import annotations

from torch import nn


def base_model(model: nn.Module) -> nn.Module:
    """`model` without its DistributedDataParallel and peft (LoRA) wrappers."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # type: ignore[operator,no-any-return]
