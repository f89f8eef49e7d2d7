"""rlhf.losses.policy: PPO clipped surrogate (asymmetric, dual clip) and the entropy re-export."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.losses import logprobs as logprobs_module
from rlhf.losses.policy import entropy_from_logits, ppo_policy_loss


def _loss(
    logratio: list[float],
    adv: list[float],
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ppo_policy_loss on one row, with old_logprobs = 0 so that logprobs is the log-ratio."""
    lr = torch.tensor([logratio], dtype=torch.float64)
    adv_t = torch.tensor([adv], dtype=torch.float64)
    return ppo_policy_loss(lr, torch.zeros_like(lr), adv_t, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip)


def test_ratio_one_gives_minus_advantage() -> None:
    """logprobs == old_logprobs: ratio 1, loss = -A, clipfrac 0, approx_kl 0."""
    adv = [1.5, -0.5, 0.0, 2.0]
    loss, m = _loss([0.0] * 4, adv)
    torch.testing.assert_close(loss, -torch.tensor([adv], dtype=torch.float64))
    assert m["clipfrac"].sum().item() == 0.0
    assert m["approx_kl"].abs().max().item() == 0.0
    torch.testing.assert_close(m["ratio"], torch.ones(1, 4, dtype=torch.float64))


def test_clip_cases_by_hand() -> None:
    """clip 0.2, so ratios are clipped into [0.8, 1.2]:
    ratio 1.5, A = +1: max(-1.5, -1.2) = -1.2   clipped      (gain capped)
    ratio 1.5, A = -1: max( 1.5,  1.2) =  1.5   not clipped  (pessimistic branch)
    ratio 0.5, A = +1: max(-0.5, -0.8) = -0.5   not clipped
    ratio 0.5, A = -1: max( 0.5,  0.8) =  0.8   clipped
    approx_kl = (ratio - 1) - log ratio: 0.5 - ln 1.5 = 0.0945349, -0.5 - ln 0.5 = 0.1931472."""
    lr = [math.log(1.5), math.log(1.5), math.log(0.5), math.log(0.5)]
    loss, m = _loss(lr, [1.0, -1.0, 1.0, -1.0])
    torch.testing.assert_close(loss, torch.tensor([[-1.2, 1.5, -0.5, 0.8]], dtype=torch.float64))
    torch.testing.assert_close(m["clipfrac"], torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=torch.float64))
    kl = [0.5 - math.log(1.5)] * 2 + [-0.5 - math.log(0.5)] * 2
    torch.testing.assert_close(m["approx_kl"], torch.tensor([kl], dtype=torch.float64))
    assert m["dual_clipfrac"].sum().item() == 0.0


def test_asymmetric_clip() -> None:
    """ratio 1.25, A = 1: clip_high 0.2 caps it at -1.2; clip_high 0.28 (DAPO) leaves -1.25.
    ratio 0.75, A = -1: clip_low 0.2 gives max(0.75, 0.8) = 0.8; clip_low 0.3 gives max(0.75, 0.7) = 0.75."""
    lr = [math.log(1.25), math.log(0.75)]
    loss, _ = _loss(lr, [1.0, -1.0])
    torch.testing.assert_close(loss, torch.tensor([[-1.2, 0.8]], dtype=torch.float64))
    loss, m = _loss(lr, [1.0, -1.0], clip_low=0.3, clip_high=0.28)
    torch.testing.assert_close(loss, torch.tensor([[-1.25, 0.75]], dtype=torch.float64))
    assert m["clipfrac"].sum().item() == 0.0


def test_dual_clip_by_hand() -> None:
    """dual_clip c = 3:
    ratio 5, A = -1: standard loss max(5, 1.2) = 5, capped at -c A = 3  -> 3   (dual clip active)
    ratio 2, A = -1: standard loss 2 < 3                                 -> 2
    ratio 5, A = +1: A > 0, dual clip does not apply: max(-5, -1.2)      -> -1.2
    ratio 5, A = -2: standard 10, cap 6                                   -> 6"""
    lr = [math.log(5.0), math.log(2.0), math.log(5.0), math.log(5.0)]
    adv = [-1.0, -1.0, 1.0, -2.0]
    loss, m = _loss(lr, adv, dual_clip=3.0)
    torch.testing.assert_close(loss, torch.tensor([[3.0, 2.0, -1.2, 6.0]], dtype=torch.float64))
    torch.testing.assert_close(m["dual_clipfrac"], torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=torch.float64))
    loss_plain, _ = _loss(lr, adv)
    torch.testing.assert_close(loss_plain, torch.tensor([[5.0, 2.0, -1.2, 10.0]], dtype=torch.float64))


@pytest.mark.parametrize("bad", [1.0, 0.5, -3.0])
def test_dual_clip_must_exceed_one(bad: float) -> None:
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        _loss([0.0], [1.0], dual_clip=bad)


def test_negative_clip_rejected() -> None:
    with pytest.raises(ValueError, match="clip_low"):
        _loss([0.0], [1.0], clip_low=-0.1)


def test_gradients_by_hand() -> None:
    """d loss / d logprobs = -A * ratio on the unclipped branch, 0 on the clipped one:
    ratio 1.1, A = 2 (inside the clip): -2.2; ratio 1.5, A = 1 (clipped): 0; ratio 1.5, A = -1: +1.5."""
    logprobs = torch.tensor([[math.log(1.1), math.log(1.5), math.log(1.5)]], dtype=torch.float64, requires_grad=True)
    loss, _ = ppo_policy_loss(logprobs, torch.zeros(1, 3, dtype=torch.float64), torch.tensor([[2.0, 1.0, -1.0]]))
    loss.sum().backward()
    assert logprobs.grad is not None
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-2.2, 0.0, 1.5]], dtype=torch.float64))


def test_sequence_level_advantages_broadcast() -> None:
    """advantages (B, 1) broadcast over T, as GRPO / RLOO give one advantage per completion."""
    lr = torch.zeros(2, 3)
    loss, m = ppo_policy_loss(lr, lr, torch.tensor([[1.0], [-2.0]]))
    torch.testing.assert_close(loss, torch.tensor([[-1.0] * 3, [2.0] * 3]))
    assert m["clipfrac"].shape == (2, 3)


@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_gradcheck_float64(dual_clip: float | None) -> None:
    """Analytic vs numerical gradients on random ratios in [e^-0.5, e^0.5], A of both signs."""
    torch.manual_seed(0)
    logprobs = (torch.rand(3, 5, dtype=torch.float64) - 0.5).requires_grad_(True)
    old = torch.zeros(3, 5, dtype=torch.float64)
    adv = torch.randn(3, 5, dtype=torch.float64)

    def fn(lp: torch.Tensor) -> torch.Tensor:
        return ppo_policy_loss(lp, old, adv, dual_clip=dual_clip)[0]

    assert torch.autograd.gradcheck(fn, (logprobs,))
    # old_logprobs and advantages too (the loss is differentiable in all three)
    old_req = old.clone().requires_grad_(True)
    adv_req = adv.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda lp, o, a: ppo_policy_loss(lp, o, a, dual_clip=dual_clip)[0], (logprobs, old_req, adv_req)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_extreme_log_ratios(dtype: torch.dtype, dual_clip: float | None) -> None:
    """logratio = +-500 (exp(500) overflows every dtype) with A = +-1: finite loss, metrics and gradients.
    ratio e^500, A = -1 without dual clip: the loss is e^20 (the clamp), finite; with dual clip it is 3."""
    logprobs = torch.tensor([[500.0, 500.0, -500.0, -500.0]], dtype=dtype, requires_grad=True)
    old = torch.zeros(1, 4, dtype=dtype)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]], dtype=dtype)
    loss, m = ppo_policy_loss(logprobs, old, adv, dual_clip=dual_clip)
    loss.sum().backward()
    assert torch.isfinite(loss).all()
    assert all(torch.isfinite(v).all() for v in m.values())
    assert logprobs.grad is not None and torch.isfinite(logprobs.grad).all()
    assert loss[0, 0].item() == pytest.approx(-1.2, rel=1e-6)
    assert loss[0, 1].item() == pytest.approx(3.0 if dual_clip else math.exp(20.0), rel=1e-6)
    assert loss[0, 3].item() == pytest.approx(0.8, rel=1e-6)


def test_half_precision_computes_in_float32() -> None:
    """bf16 inputs give a float32 loss equal to the float32 computation on the same (bf16-rounded) values."""
    torch.manual_seed(0)
    lp = (torch.randn(2, 4) * 0.3).to(torch.bfloat16)
    old = (torch.randn(2, 4) * 0.3).to(torch.bfloat16)
    adv = torch.randn(2, 4).to(torch.bfloat16)
    loss, _ = ppo_policy_loss(lp, old, adv)
    ref, _ = ppo_policy_loss(lp.float(), old.float(), adv.float())
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref)


def test_metrics_detached() -> None:
    lp = torch.zeros(1, 2, requires_grad=True)
    _, m = ppo_policy_loss(lp, torch.zeros(1, 2), torch.ones(1, 2))
    assert set(m) == {"ratio", "clipfrac", "dual_clipfrac", "approx_kl"}
    assert not any(v.requires_grad for v in m.values())


def test_entropy_is_the_single_implementation() -> None:
    """policy.entropy_from_logits is logprobs.entropy_from_logits (one implementation), and it gives
    H([0.25, 0.75]) = -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.5623351."""
    assert entropy_from_logits is logprobs_module.entropy_from_logits
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    assert entropy_from_logits(logits).item() == pytest.approx(0.5623351, rel=1e-6)
