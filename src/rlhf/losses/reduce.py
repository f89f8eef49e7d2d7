"""Masked reductions: mean, variance, whitening, and the loss aggregation modes.

The per-token objective (policy.py, value.py, sft.py) is kept apart from how it is reduced to a scalar. The
three aggregation modes below are the ones compared in DAPO (Yu et al. 2025) and Dr. GRPO (Liu et al. 2025);
GRPO, Dr. GRPO and DAPO differ in this setting, not in the per-token loss.

Conventions:
    * `mask` is 1 on positions that count and 0 elsewhere (float, int or bool). Masked-out positions are
      replaced by 0 with `torch.where` before any arithmetic, so padding may hold anything, inf or NaN
      included, without reaching the result or its gradient.
    * Half-precision inputs (float16, bfloat16) are reduced in float32 and the result is float32; sums of
      thousands of bf16 numbers would otherwise keep about three significant digits.
    * A denominator that counts tokens or rows is clamped to at least 1, so a row or a batch with no valid
      token gives 0, never NaN.
    * `sum_over` (variance, whitening): a function that sums a tensor over the processes of a data-parallel
      run (`Engine.sum_over_processes`), so the statistics are those of the global batch; None: this process's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

SumOver = Callable[[torch.Tensor], torch.Tensor]
"""Sums a tensor elementwise over the processes of a data-parallel run (the identity in one process)."""

AGGREGATE_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Return `x` as float32 if it is float16 or bfloat16, else unchanged (float32 and float64 pass through).

    The loss modules compute in this dtype so that bf16 model outputs do not lose the precision the losses
    need (ratios near 1, small KL values, long sums).
    """
    if x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


def wide_dtype(device: torch.device) -> torch.dtype:
    """float64, or float32 on MPS (which has no float64): the dtype that sums over many values accumulate in."""
    return torch.float32 if device.type == "mps" else torch.float64


def _masked(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` (upcast) with masked-out entries set to 0, and the mask as a 0/1 tensor of the same dtype."""
    x = upcast(x)
    keep = mask != 0
    xm = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))  # broadcast shape of x and mask
    return xm, keep.to(x.dtype).expand_as(xm)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x * mask) over `dim` (all dimensions if None). Masked-out entries never enter the sum."""
    xm, _ = _masked(x, mask)
    return xm.sum() if dim is None else xm.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is 1.

        masked_mean = sum(x * m) / max(sum(m), 1)

    Shapes: `x` and `mask` broadcastable to the same shape; reduces over `dim` (all dimensions if None), so
    `dim=None` gives a scalar and `dim=-1` on (B, T) gives (B,). A slice with no valid position gives 0.
    """
    xm, m = _masked(x, mask)
    if dim is None:
        return xm.sum() / m.sum().clamp(min=1)
    return xm.sum(dim) / m.sum(dim).clamp(min=1)


def masked_moments(
    x: torch.Tensor, mask: torch.Tensor, *, unbiased: bool = True, sum_over: SumOver | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of `x` over all positions where `mask` is 1 (two scalars), over every process's
    positions with `sum_over` (two all-reduces: the sums, then the squared deviations from the global mean).

        mu  = sum(m * x) / max(n, 1)                 n = sum(m)
        var = sum(m * (x - mu)^2) / max(n - 1, 1)    if unbiased (Bessel's correction)
        var = sum(m * (x - mu)^2) / max(n, 1)        otherwise

    With one valid position the variance is 0, with none both are 0 (not NaN). Both are summed in `wide_dtype`
    and returned in `x`'s (upcast) dtype, so that equal values have exactly their own mean and a variance of
    exactly 0: summed in float32, the mean of eight scores of -0.6 was one ulp off, and whitening by the
    resulting ~6e-8 std turned the equal scores into +-0.8 (the sign set by the order of the sums).
    """
    xm, m = _masked(x, mask)
    wide = wide_dtype(xm.device)
    xw, mw = xm.to(wide), m.to(wide)
    total, n = xw.sum(), mw.sum()
    if sum_over is not None:
        total, n = sum_over(torch.stack([total, n])).unbind()
    mean = total / n.clamp(min=1)
    sq = (((xw - mean) * mw) ** 2).sum()  # (x - mu)^2 on valid positions, 0 elsewhere
    if sum_over is not None:
        sq = sum_over(sq)
    den = (n - 1).clamp(min=1) if unbiased else n.clamp(min=1)
    return mean.to(xm.dtype), (sq / den).to(xm.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `x` over all positions where `mask` is 1 (a scalar; `masked_moments`)."""
    return masked_moments(x, mask, unbiased=unbiased)[1]


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8, *, sum_over: SumOver | None = None
) -> torch.Tensor:
    """Normalise `x` to zero mean and unit variance over the valid positions.

        out = (x - mu) / sqrt(var + eps)           if shift_mean
        out = (x - mu) / sqrt(var + eps) + mu      otherwise (rescale only, keep the mean)

    mu and var (unbiased) are taken over all positions where `mask` is 1, as a single population (the usual
    whitening of PPO advantages across the batch; the global batch with `sum_over`). Masked-out positions are 0
    in the output. Shape of `x`.
    """
    xm, m = _masked(x, mask)
    mean, var = masked_moments(xm, m, sum_over=sum_over)
    whitened = (xm - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * m


def aggregate_parts(
    loss: torch.Tensor, mask: torch.Tensor, *, mode: str = "token_mean"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Numerator and denominator of `aggregate`, for exact gradient accumulation.

    For a batch split into micro-batches i, sum_i(num_i) / sum_i(den_i) equals `aggregate` on the whole batch
    (and so do the gradients), for every mode:

        token_mean            num = sum_{b,t} l*m                      den = sum_{b,t} m   (token count)
        seq_mean_token_mean   num = sum_b (sum_t l*m / max(sum_t m, 1))  den = B           (sequence count)
        seq_mean_token_sum    num = sum_b sum_t l*m                    den = B

    Shapes: `loss` and `mask` (B, T) (any shape for token_mean). Returns two scalars; `den` carries no gradient
    and is not clamped (a micro-batch may hold no token; the caller clamps the total).
    """
    if mode not in AGGREGATE_MODES:
        raise ValueError(f"unknown aggregation mode {mode!r}; expected one of {', '.join(AGGREGATE_MODES)}")
    lm, m = _masked(loss, mask)
    if mode == "token_mean":
        return lm.sum(), m.sum()
    if lm.dim() != 2:
        raise ValueError(f"mode {mode!r} needs a (B, T) loss, got shape {tuple(lm.shape)}")
    row_sum = lm.sum(dim=-1)  # (B,)
    # seq_mean_token_mean: each row's token mean; seq_mean_token_sum: each row's token sum
    row_value = row_sum / m.sum(dim=-1).clamp(min=1) if mode == "seq_mean_token_mean" else row_sum
    n_rows = torch.tensor(float(lm.shape[0]), dtype=lm.dtype, device=lm.device)
    return row_value.sum(), n_rows


def aggregate(loss: torch.Tensor, mask: torch.Tensor, *, mode: str = "token_mean") -> torch.Tensor:
    """Reduce a per-token loss (B, T) to a scalar.

        token_mean            = sum_{b,t} l*m / sum_{b,t} m                    every token weighs the same
        seq_mean_token_mean   = mean_b ( sum_t l*m / sum_t m )                 every sequence weighs the same
        seq_mean_token_sum    = mean_b ( sum_t l*m )                           longer sequences weigh more

    Denominators are clamped to at least 1: rows or batches with no valid token contribute 0.
    Equal to num / max(den, 1) from `aggregate_parts`.
    """
    num, den = aggregate_parts(loss, mask, mode=mode)
    return num / den.clamp(min=1)
