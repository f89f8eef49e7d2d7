"""rlhf.losses.sft: masked token cross-entropy."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rlhf.losses.reduce import aggregate
from rlhf.losses.sft import sft_loss


def test_by_hand() -> None:
    """Uniform logits over V = 4: every valid token costs ln 4 = 1.3862944; prompt / padding (-100) cost 0."""
    logits = torch.zeros(2, 3, 4)
    labels = torch.tensor([[-100, 1, 3], [2, -100, -100]])
    loss, mask = sft_loss(logits, labels)
    ln4 = math.log(4.0)
    torch.testing.assert_close(loss, torch.tensor([[0.0, ln4, ln4], [ln4, 0.0, 0.0]]))
    torch.testing.assert_close(mask, torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]]))


def test_matches_torch_cross_entropy() -> None:
    """Per token equal to F.cross_entropy(reduction='none'); token_mean aggregate equals its mean."""
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 13, dtype=torch.float64) * 4
    labels = torch.randint(0, 13, (3, 6))
    labels[0, :2] = -100
    labels[2, 4:] = -100
    loss, mask = sft_loss(logits, labels)
    ref = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=-100)
    torch.testing.assert_close(loss, ref)
    expected_mean = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100)
    torch.testing.assert_close(aggregate(loss, mask), expected_mean)


def test_custom_ignore_index() -> None:
    """ignore_index=-1: label -1 is masked; label 0 counts, ln 3 under uniform logits over V = 3."""
    labels = torch.tensor([[-1, 0]])
    loss, mask = sft_loss(torch.zeros(1, 2, 3), labels, ignore_index=-1)
    torch.testing.assert_close(mask, torch.tensor([[0.0, 1.0]]))
    assert loss[0, 1].item() == pytest.approx(math.log(3.0))


def test_bf16_finite_and_float32() -> None:
    """bf16 logits with extreme values: float32 loss, finite values and gradients."""
    logits = torch.tensor([[[1e4, -1e4, 0.0], [0.0, 0.0, 0.0]]], dtype=torch.bfloat16, requires_grad=True)
    loss, mask = sft_loss(logits, torch.tensor([[1, -100]]))
    loss.sum().backward()
    assert loss.dtype == torch.float32 and mask.dtype == torch.float32
    assert torch.isfinite(loss).all() and loss[0, 1].item() == 0.0
    assert loss[0, 0].item() == pytest.approx(2e4, rel=1e-2)
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
