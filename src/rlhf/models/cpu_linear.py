"""fp32 linear layers on the CPU through oneDNN, where the BLAS that `torch.mm` calls runs at half the CPU's speed.

PyTorch's x86 wheels multiply fp32 matrices with MKL's `sgemm`, and MKL runs its AVX2 code on CPUs not made by
Intel: on a 2-core AMD EPYC (Zen 5, AVX-512) a (2048 x 2048) product ran at 203 GFLOP/s through `torch.mm` and at
455 through oneDNN (bundled with torch, `torch.ops.mkldnn._linear_pointwise`), and a forward + backward of an SFT
model at hidden 256 x 4 took 62 ms against 83. No environment variable of MKL's changes its choice (tried:
`MKL_CBWR`, `MKL_ENABLE_INSTRUCTIONS`, `MKL_DEBUG_CPU_TYPE`).

`enable(model)` gives the model's `nn.Linear` layers of at least `MIN_WEIGHT` weights the class `Linear`, whose
forward sends a product through oneDNN when `use_onednn()` says so and it is large enough to gain (`MIN_MACS`),
and through `F.linear` otherwise (on a GPU, under autocast, in half precision, for small products). The
gradients are the same products in oneDNN, for y = x W^T + b:

    dL/dx = dL/dy W,    dL/dW = (dL/dy)^T x,    dL/db = sum over rows of dL/dy

The weights, their names and the checkpoints are unchanged; the results equal `F.linear`'s to fp32 rounding (a
different summation order: ~1e-6 relative). Like half precision on the CPU, oneDNN builds a kernel for every new
row count and keeps it, so flat rows are filled to a multiple of 16 tokens (`padding_free.row_multiple`): over
150 SFT steps at 256 x 4 with a new row count at every step, 60 ms a step and a resident set grown to 1144 MiB
unfilled, 54 ms and 631 MiB filled (84 ms and 528 MiB through MKL).

`RLHF_CPU_MATMUL` chooses (`ENV`): `auto` (the default) uses oneDNN on AMD CPUs only, where it was measured faster;
`onednn` wherever torch has oneDNN; `blas` never.

Every oneDNN product (these layers', and half-precision ones under autocast) is a primitive built for its shape and
kept in two caches of 1024 entries each by default, ~1 MiB an entry: with the row counts of varying lengths a
training process grew by a gigabyte (`bound_primitive_caches`).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rlhf.errors import ConfigError
from rlhf.models.unwrap import base_model

logger = logging.getLogger(__name__)

ENV = "RLHF_CPU_MATMUL"
MARK = "rlhf_onednn_linear"
"""Attribute `enable` sets on a model whose linear layers it switched."""
CHOICES = ("auto", "onednn", "blas")

MIN_MACS = 1 << 22
"""Rows x in x out below which `F.linear` stays: a Python autograd function costs ~40 us a call, and oneDNN's small
products gain less. Forward + backward of (rows, d) @ (d, d), oneDNN against MKL on the Zen 5 (1 and 2 threads):
0.4-0.5x at 2^18 multiply-adds, 0.7-0.9x at 2^20, 1.0-1.4x at 2^22, 1.5-1.9x at 2^24; forward alone 1.0-1.1x at
2^20 and 1.4-1.8x at 2^22."""

PRIMITIVE_CACHES = ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")
"""The environment variables that size ideep's and oneDNN's caches of primitives (torch's oneDNN products pass
through both), read at the process's first oneDNN product."""

PRIMITIVE_CACHE_CAPACITY = 64
"""Entries of each cache (`bound_primitive_caches`). A (256 -> 1024) layer's forward and backward at 140 row counts
grew the process by 460 MiB with 1024 entries (MKL: 75), by 270 MiB with 64. Padded SFT at hidden 256 x 4 on rows of
20-280 tokens: 776 against 1436 MiB and 78.4 against 73.6 samples/s; padding-free at 512 x 6: 1419-1458 against
1789-1810 MiB, 21.4-21.9 against 19.9-20.3 samples/s; bf16 at 256 x 4: 735 against 906 MiB, 122 against 103
(2-core AMD EPYC Zen 5, benchmarks/README.md). Fewer entries did not cost speed where the same shapes recur (the
SFT benchmark's short rows: 482-603 against 553-566 samples/s); at 1024 x 8, where a new kernel costs more, they
cost ~1.5% (4.67-4.70 against 4.72-4.80 samples/s) for 2723-2748 against 3046-3093 MiB."""

MIN_WEIGHT = 1 << 16
"""in x out below which a layer keeps `nn.Linear` (`enable`). oneDNN builds a kernel for every new shape, and that
costs about as much as the product of a small layer: a (T, d) @ (d, d) forward at a row count T seen for the first
time took 461 us against 56 once built and 83 through MKL at d = 64 (T ~1000-1600, 2 threads), 753 / 482 / 816 at
d = 256, 7503 / 6147 / 12465 at d = 1024. The online trainers' passes meet new row counts at every iteration:
`bench_grpo.py`'s 64 x 2 model lost ~15% of its loop with its layers switched."""


@functools.cache
def use_onednn() -> bool:
    """Whether fp32 products on the CPU go through oneDNN in this process (`ENV`; read once)."""
    choice = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ConfigError(f"environment variable {ENV}={choice!r}: expected one of {', '.join(CHOICES)}")
    if choice == "blas" or not _onednn_available():
        return False
    return choice == "onednn" or (torch.backends.mkl.is_available() and _cpu_vendor() == "AuthenticAMD")


@functools.cache
def _onednn_available() -> bool:
    """Whether this torch has oneDNN and its private product op answers as expected (checked once on a (2, 3) @
    (3, 4) product, so a torch whose op changed falls back to `F.linear` with a warning instead of failing)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    x, w = torch.arange(6.0).view(2, 3), torch.arange(12.0).view(4, 3)
    try:
        works = torch.equal(_product(x, w), x @ w.t())
    except RuntimeError as exc:
        works, why = False, str(exc).splitlines()[0]
    else:
        why = "a wrong product"
    if not works:
        logger.warning("oneDNN's linear product is not usable in this torch (%s); fp32 stays with torch.mm", why)
    return works


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _product(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight^T (+ bias) in oneDNN: x (N, in) (copied if not contiguous), weight (out, in), strided or not."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDnnLinear(torch.autograd.Function):
    """y = x W^T + b over (N, in) rows, forward and backward in oneDNN (the formulas are in the module's docstring)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        return _product(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        grad = grad.contiguous()
        grad_x = _product(grad, weight.t()) if need_x else None  # (N, out) @ (out, in)
        grad_w = _product(grad.t(), x.t()) if need_w else None  # (out, N) @ (N, in)
        grad_b = grad.sum(0) if need_b else None
        return grad_x, grad_w, grad_b


class Linear(nn.Linear):
    """`nn.Linear` whose fp32 CPU products of at least `MIN_MACS` multiply-adds run through oneDNN."""

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.weight, self.bias
        if (
            x.numel() * self.out_features < MIN_MACS
            or not x.is_cpu
            or x.dtype != torch.float32
            or weight.dtype != torch.float32
            or torch.is_autocast_enabled("cpu")
        ):
            return F.linear(x, weight, bias)
        rows = x.reshape(-1, self.in_features)
        if torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
        ):
            y = _OneDnnLinear.apply(rows, weight, bias)
        else:
            y = _product(rows, weight, bias)
        return y.view(*x.shape[:-1], self.out_features)


def bound_primitive_caches() -> None:
    """Size both caches of oneDNN primitives (`PRIMITIVE_CACHES`) to `PRIMITIVE_CACHE_CAPACITY` entries, unless the
    environment sizes them. It takes effect when called before the process's first oneDNN product: the model loading
    of `rlhf.models.loading` calls it first."""
    for name in PRIMITIVE_CACHES:
        os.environ.setdefault(name, str(PRIMITIVE_CACHE_CAPACITY))


def enable(model: nn.Module) -> int:
    """Give every plain `nn.Linear` of `model` with at least `MIN_WEIGHT` weights the class `Linear` when
    `use_onednn()`, and note it on the model when any was (`enabled`); the number of layers switched."""
    if not use_onednn():
        return 0
    layers = [m for m in model.modules() if type(m) is nn.Linear and m.weight.numel() >= MIN_WEIGHT]
    for layer in layers:
        layer.__class__ = Linear
    setattr(model, MARK, bool(layers))
    return len(layers)


def enabled(model: nn.Module) -> bool:
    """Whether `enable` switched `model`'s linear layers (looked up on the model inside DDP and peft wrappers)."""
    return bool(getattr(base_model(model), MARK, False))
