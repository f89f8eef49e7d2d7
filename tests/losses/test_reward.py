"""rlhf.losses.reward: Bradley-Terry loss with optional margin."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.losses.reward import bradley_terry_loss


def test_by_hand() -> None:
    """r_c - r_r = [1, 0, -2]: -log sigmoid(d) = log(1 + e^-d) = [0.3132617, ln 2 = 0.6931472, 2.1269280];
    accuracy [1, 0, 0]; margin metric = d."""
    chosen = torch.tensor([2.0, 0.5, -1.0], dtype=torch.float64)
    rejected = torch.tensor([1.0, 0.5, 1.0], dtype=torch.float64)
    losses, m = bradley_terry_loss(chosen, rejected)
    expected = [math.log1p(math.exp(-1.0)), math.log(2.0), math.log1p(math.exp(2.0))]
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(m["accuracy"], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(m["margin"], torch.tensor([1.0, 0.0, -2.0], dtype=torch.float64))


def test_margin() -> None:
    """d = 1 with margin 0.5: log(1 + e^-0.5) = 0.4740770; a scalar margin equals the same tensor margin."""
    chosen, rejected = torch.tensor([2.0, 2.0]), torch.tensor([1.0, 1.0])
    losses, m = bradley_terry_loss(chosen, rejected, margin=torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(losses, torch.tensor([0.4740770, 0.3132617]))
    torch.testing.assert_close(m["margin"], torch.tensor([1.0, 1.0]))
    scalar, _ = bradley_terry_loss(chosen, rejected, margin=0.5)
    torch.testing.assert_close(scalar, torch.tensor([0.4740770, 0.4740770]))


def test_gradcheck_float64() -> None:
    torch.manual_seed(0)
    c = torch.randn(6, dtype=torch.float64, requires_grad=True)
    r = torch.randn(6, dtype=torch.float64, requires_grad=True)
    margin = torch.rand(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, mg: bradley_terry_loss(a, b, margin=mg)[0], (c, r, margin))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_gaps(dtype: torch.dtype) -> None:
    """Gap -1000: loss 1000 (not inf), gradient -1 on the chosen reward; gap +1000: loss 0, gradient 0."""
    chosen = torch.tensor([-500.0, 500.0], dtype=dtype, requires_grad=True)
    rejected = torch.tensor([500.0, -500.0], dtype=dtype)
    losses, _ = bradley_terry_loss(chosen, rejected)
    losses.sum().backward()
    assert losses[0].item() == pytest.approx(1000.0)
    assert losses[1].item() == pytest.approx(0.0, abs=1e-30)
    assert chosen.grad is not None
    torch.testing.assert_close(chosen.grad.float(), torch.tensor([-1.0, 0.0]))


def test_metrics_detached() -> None:
    c = torch.zeros(2, requires_grad=True)
    _, m = bradley_terry_loss(c, torch.ones(2))
    assert not any(v.requires_grad for v in m.values())


def test_reward_centering_penalty_by_hand() -> None:
    """(r_c + r_r)^2 per pair: (2 + 1)^2 = 9, (0.5 - 0.5)^2 = 0, (-1 - 2)^2 = 9; gradient 2 (r_c + r_r) = [6, 0, -6]
    on either reward; bf16 input gives a float32 result."""
    from rlhf.losses.reward import reward_centering_penalty

    chosen = torch.tensor([2.0, 0.5, -1.0], requires_grad=True)
    rejected = torch.tensor([1.0, -0.5, -2.0])
    penalty = reward_centering_penalty(chosen, rejected)
    torch.testing.assert_close(penalty, torch.tensor([9.0, 0.0, 9.0]))
    penalty.sum().backward()
    assert chosen.grad is not None
    torch.testing.assert_close(chosen.grad, torch.tensor([6.0, 0.0, -6.0]))
    half = reward_centering_penalty(chosen.detach().bfloat16(), rejected.bfloat16())
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, torch.tensor([9.0, 0.0, 9.0]))
