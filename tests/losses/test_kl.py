"""rlhf.losses.kl: k1/k2/k3 estimators and the KL controllers."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf.losses.kl import KL_ESTIMATORS, AdaptiveKLController, FixedKLController, kl_penalty


def test_estimators_by_hand() -> None:
    """d = logprobs - ref = [0, 1, -1]:
    k1 = d = [0, 1, -1]; k2 = d^2/2 = [0, 0.5, 0.5];
    k3 = exp(-d) - 1 + d = [0, e^-1 - 1 + 1, e - 1 - 1] = [0, 0.367879, 0.718282]."""
    logprobs = torch.tensor([[-1.0, -1.0, -2.0]], dtype=torch.float64)
    ref = torch.tensor([[-1.0, -2.0, -1.0]], dtype=torch.float64)
    torch.testing.assert_close(kl_penalty(logprobs, ref), torch.tensor([[0.0, 1.0, -1.0]], dtype=torch.float64))
    torch.testing.assert_close(
        kl_penalty(logprobs, ref, kind="k2"), torch.tensor([[0.0, 0.5, 0.5]], dtype=torch.float64)
    )
    torch.testing.assert_close(
        kl_penalty(logprobs, ref, kind="k3"),
        torch.tensor([[0.0, math.exp(-1), math.e - 2]], dtype=torch.float64),
    )


def test_unknown_kind() -> None:
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), kind="k4")


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=-1000.0, max_value=1000.0), st.floats(min_value=-1000.0, max_value=1000.0))
def test_k3_nonnegative_everywhere(a: float, b: float) -> None:
    """k3 >= 0 for any pair of log-probs, including gaps of thousands of nats and tiny gaps (rounding)."""
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        kl = kl_penalty(torch.tensor([[a]], dtype=dtype), torch.tensor([[b]], dtype=dtype), kind="k3")
        assert torch.isfinite(kl).all()
        assert kl.item() >= 0.0


def test_k3_nonnegative_on_a_dense_grid() -> None:
    """Dense grid of d in [-500, 500] plus values near 0 (where expm1(-d) + d cancels): all >= 0, finite."""
    d = torch.cat([torch.linspace(-500, 500, 10001), torch.linspace(-1e-4, 1e-4, 2001)])
    kl = kl_penalty(d[None, :], torch.zeros(1, d.numel()), kind="k3")
    assert torch.isfinite(kl).all()
    assert kl.min().item() >= 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KL_ESTIMATORS)
def test_extreme_log_ratios_finite_values_and_grads(kind: str, dtype: torch.dtype) -> None:
    """Log-prob gaps of +-500 nats: finite values and finite gradients for every estimator."""
    logprobs = torch.tensor([[-500.0, -1.0, -0.0, -300.0]], dtype=dtype, requires_grad=True)
    ref = torch.tensor([[-0.5, -501.0, -500.0, -0.0]], dtype=dtype)
    kl = kl_penalty(logprobs, ref, kind=kind)
    kl.sum().backward()
    assert torch.isfinite(kl).all()
    assert logprobs.grad is not None and torch.isfinite(logprobs.grad).all()


def test_k1_and_k3_unbiased_k2_not() -> None:
    """Sample 200k tokens from pi = softmax(a) and score them under pi_ref = softmax(b) (5 categories).
    The sample means of k1 and k3 match KL(pi || pi_ref) within 4 standard errors; k2 is biased (its
    mean is off by many standard errors), which shows the test can tell the difference."""
    gen = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.tensor([1.0, 0.5, -0.5, 0.0, -1.5], dtype=torch.float64), dim=0)
    logq = torch.log_softmax(torch.tensor([0.0, 1.0, 0.2, -1.0, 0.5], dtype=torch.float64), dim=0)
    true_kl = (logp.exp() * (logp - logq)).sum().item()
    n = 200_000
    samples = torch.multinomial(logp.exp(), n, replacement=True, generator=gen)
    lp, lq = logp[samples][None, :], logq[samples][None, :]
    for kind in ("k1", "k3"):
        est = kl_penalty(lp, lq, kind=kind)
        stderr = est.std().item() / math.sqrt(n)
        assert abs(est.mean().item() - true_kl) < 4 * stderr, kind
    k2 = kl_penalty(lp, lq, kind="k2")
    assert abs(k2.mean().item() - true_kl) > 10 * k2.std().item() / math.sqrt(n)


def test_adaptive_controller_hand_sequence() -> None:
    """init 0.1, target 6, horizon 10000.
    1. kl 12 -> e = clip(12/6 - 1 = 1) = +0.2;  x (1 + 0.2 * 256/10000) = x 1.00512  -> 0.100512
    2. kl 6  -> e = 0: unchanged                                                      -> 0.100512
    3. kl 3  -> e = clip(-0.5) = -0.2;          x (1 - 0.2 * 512/10000) = x 0.98976  -> 0.09948275712
    4. kl 6.6 -> e = 0.1 (inside the clip);     x (1 + 0.1 * 100/10000) = x 1.001    -> 0.09958223987712
    5. kl 0  -> e = clip(-1) = -0.2;            x (1 - 0.2 * 10000/10000) = x 0.8    -> 0.079665791901696"""
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000.0)
    assert ctl.value == 0.1
    expected = [0.100512, 0.100512, 0.09948275712, 0.09958223987712, 0.079665791901696]
    for (kl, n), want in zip([(12.0, 256), (6.0, 256), (3.0, 512), (6.6, 100), (0.0, 10000)], expected, strict=True):
        ctl.update(kl, n)
        assert ctl.value == pytest.approx(want, rel=1e-12)


def test_adaptive_controller_resume_is_exact() -> None:
    """state_dict holds plain floats; a fresh controller loaded from it follows the same trajectory."""
    a = AdaptiveKLController(0.05, target=3.0, horizon=2000.0)
    for kl in (1.0, 5.0, 2.9):
        a.update(kl, 64)
    state = a.state_dict()
    assert all(type(v) is float for v in state.values())
    b = AdaptiveKLController(0.05, target=3.0, horizon=2000.0)
    b.load_state_dict(state)
    for kl in (4.0, 0.5, 3.3):
        a.update(kl, 64)
        b.update(kl, 64)
        assert a.value == b.value
    assert a.value != 0.05


def test_adaptive_controller_validation() -> None:
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=100.0)
    with pytest.raises(ValueError, match="horizon"):
        AdaptiveKLController(0.1, target=1.0, horizon=0.0)
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=100.0)
    with pytest.raises(ValueError, match="finite"):
        ctl.update(float("nan"), 10)
    assert ctl.value == 0.1


def test_fixed_controller() -> None:
    """update is a no-op; state round-trips."""
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 1000)
    assert ctl.value == 0.05
    assert ctl.state_dict() == {"value": 0.05}
    other = FixedKLController(0.2)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05
