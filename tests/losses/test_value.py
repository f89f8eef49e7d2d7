"""rlhf.losses.value: clipped value loss."""

from __future__ import annotations

import pytest
import torch

from rlhf.losses.value import clipped_value_loss


def test_by_hand() -> None:
    """old 1.0, clip 0.2 (so v_clip is in [0.8, 1.2]):
    v 1.5, R 2.0: v_clip 1.2; errors 0.25 vs 0.64 -> 0.5 * 0.64 = 0.32, clipped
    v 1.1, R 2.0: v_clip 1.1; errors 0.81 vs 0.81 -> 0.405, not clipped
    v 2.5, R 2.0: v_clip 1.2; errors 0.25 vs 0.64 -> 0.32, clipped (overshoot is not rewarded)
    v 0.5, R 2.0: v_clip 0.8; errors 2.25 vs 1.44 -> 1.125, not clipped (the worse of the two counts)"""
    values = torch.tensor([[1.5, 1.1, 2.5, 0.5]], dtype=torch.float64)
    loss, m = clipped_value_loss(values, torch.ones_like(values), torch.full_like(values, 2.0))
    torch.testing.assert_close(loss, torch.tensor([[0.32, 0.405, 0.32, 1.125]], dtype=torch.float64))
    torch.testing.assert_close(m["clipfrac"], torch.tensor([[1.0, 0.0, 1.0, 0.0]], dtype=torch.float64))


def test_unmoved_values_give_half_squared_error() -> None:
    """values == old_values: 0.5 (v - R)^2 and clipfrac 0."""
    torch.manual_seed(0)
    v, r = torch.randn(3, 4), torch.randn(3, 4)
    loss, m = clipped_value_loss(v, v, r)
    torch.testing.assert_close(loss, 0.5 * (v - r) ** 2)
    assert m["clipfrac"].sum().item() == 0.0


def test_gradcheck_float64() -> None:
    torch.manual_seed(0)
    values = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    old = (values.detach() + 0.3 * torch.randn(3, 5, dtype=torch.float64)).requires_grad_(True)
    returns = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, o, r: clipped_value_loss(v, o, r)[0], (values, old, returns))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_inputs_finite(dtype: torch.dtype) -> None:
    """Values and returns of +-1e4: finite loss (up to 0.5 * (2e4)^2 = 2e8) and gradients."""
    values = torch.tensor([[1e4, -1e4, 0.0]], dtype=dtype, requires_grad=True)
    old = torch.tensor([[-1e4, 1e4, 0.0]], dtype=dtype)
    returns = torch.tensor([[-1e4, 1e4, 1e4]], dtype=dtype)
    loss, _ = clipped_value_loss(values, old, returns)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and loss.dtype == torch.float32
    assert values.grad is not None and torch.isfinite(values.grad).all()
    assert loss[0, 0].item() == pytest.approx(2e8, rel=1e-2)  # bf16 rounds 1e4 to 9984


def test_negative_clip_range_rejected() -> None:
    with pytest.raises(ValueError, match="clip_range"):
        clipped_value_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), clip_range=-1.0)
