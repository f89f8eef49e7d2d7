"""The half precision a model runs in under the training engine's autocast, for code outside its forward.

`accelerate` runs a prepared model's forward under autocast (`train.mixed_precision`), entered inside that forward.
Two things happen before it and need to know: a padding-free layout fills its row to a multiple of 16 tokens for
half-precision matmuls on the CPU (`padding_free.row_multiple`), and generation runs its whole decode loop under
one autocast of its own (`generation_autocast`), so that the weights are cast to half precision once per call
instead of once per token (autocast keeps its cast weights until the outermost autocast exits). The engine notes
the precision on the model it trains (`mark_autocast`).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from rlhf.models.unwrap import base_model

MARK = "rlhf_autocast"
"""Attribute of a model, and of each `transformers` model inside it, holding "bf16" or "fp16"."""

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
HALF = tuple(DTYPES.values())
"""The half-precision dtypes."""


def mark_autocast(model: nn.Module, mixed_precision: str) -> None:
    """Note on `model` and the `transformers` models inside it (an actor-critic's policy and critic) that their
    forward runs under autocast in `mixed_precision` ("bf16" or "fp16"; anything else notes nothing)."""
    if mixed_precision not in DTYPES:
        return
    base = base_model(model)
    for module in base.modules():
        if module is base or hasattr(module, "config"):
            setattr(module, MARK, mixed_precision)


def autocast_dtype(model: nn.Module) -> torch.dtype | None:
    """The half precision the engine's autocast runs `model` in (`mark_autocast`), or None."""
    return DTYPES.get(getattr(base_model(model), MARK, None))  # type: ignore[arg-type]


def generation_autocast(model: nn.Module, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """One autocast around a whole generate call of `model`, in the precision its training forward runs in (the
    same numbers as autocast entered at every forward, the weights cast once); nothing for an unmarked model."""
    dtype = autocast_dtype(model)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
