"""rlhf.losses.preference: DPO family, SimPO, ORPO odds-ratio term, KTO."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from rlhf.losses.preference import (
    PREFERENCE_LOSSES,
    dpo_loss,
    kto_loss,
    log1mexp,
    orpo_odds_ratio_loss,
    simpo_loss,
)

F64 = torch.float64
# pc, pr, rc, rr with h = (pc - rc) - (pr - rr) = (-1 + 2) - (-3 + 2) = 2
PC, PR, RC, RR = (torch.tensor([x], dtype=F64) for x in (-1.0, -3.0, -2.0, -2.0))
LS1 = math.log1p(math.exp(-1.0))  # -log sigmoid(1)  = 0.31326169
LSM1 = math.log1p(math.exp(1.0))  # -log sigmoid(-1) = 1.31326169


def test_dpo_sigmoid_by_hand() -> None:
    """h = 2, beta = 0.5: beta h = 1, loss = -log sigmoid(1) = log(1 + e^-1) = 0.3132617.
    metrics: rewards/chosen = 0.5 * (-1 + 2) = 0.5, rewards/rejected = 0.5 * (-3 + 2) = -0.5,
    margin 1.0, accuracy 1.0."""
    losses, m = dpo_loss(PC, PR, RC, RR, beta=0.5)
    assert losses.item() == pytest.approx(LS1)
    assert m["rewards/chosen"].item() == pytest.approx(0.5)
    assert m["rewards/rejected"].item() == pytest.approx(-0.5)
    assert m["rewards/margin"].item() == pytest.approx(1.0)
    assert m["rewards/accuracy"].item() == 1.0


def test_cdpo_by_hand() -> None:
    """eps = 0.1, beta h = 1: 0.9 * 0.3132617 + 0.1 * 1.3132617 = 0.4132617."""
    losses, _ = dpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.1)
    assert losses.item() == pytest.approx(0.9 * LS1 + 0.1 * LSM1)
    assert losses.item() == pytest.approx(0.4132617, abs=1e-7)


def test_robust_by_hand() -> None:
    """eps = 0.1, beta h = 1: (0.9 * 0.3132617 - 0.1 * 1.3132617) / 0.8 = 0.1882617."""
    losses, _ = dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="robust", label_smoothing=0.1)
    assert losses.item() == pytest.approx((0.9 * LS1 - 0.1 * LSM1) / 0.8)
    assert losses.item() == pytest.approx(0.1882617, abs=1e-7)


def test_ipo_and_hinge_by_hand() -> None:
    """ipo: h = 2, beta = 0.5: (2 - 1/(2*0.5))^2 = (2 - 1)^2 = 1; beta = 0.25: (2 - 2)^2 = 0 (the minimum).
    hinge: beta = 0.25: relu(1 - 0.5) = 0.5; beta = 0.5: relu(1 - 1) = 0."""
    assert dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="ipo")[0].item() == pytest.approx(1.0)
    assert dpo_loss(PC, PR, RC, RR, beta=0.25, loss_type="ipo")[0].item() == pytest.approx(0.0)
    assert dpo_loss(PC, PR, RC, RR, beta=0.25, loss_type="hinge")[0].item() == pytest.approx(0.5)
    assert dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="hinge")[0].item() == pytest.approx(0.0)


def test_limit_cases() -> None:
    """label_smoothing 0 gives plain DPO for sigmoid and robust; h = 0 gives ln 2 for sigmoid."""
    torch.manual_seed(0)
    x = [torch.randn(8, dtype=F64) * 5 for _ in range(4)]
    h = (x[0] - x[2]) - (x[1] - x[3])
    plain = -torch.nn.functional.logsigmoid(0.1 * h)
    for loss_type in ("sigmoid", "robust"):
        torch.testing.assert_close(dpo_loss(*x, beta=0.1, loss_type=loss_type, label_smoothing=0.0)[0], plain)
    zero = torch.zeros(3, dtype=F64)
    torch.testing.assert_close(dpo_loss(zero, zero, zero, zero)[0], torch.full((3,), math.log(2.0), dtype=F64))


def test_robust_is_unbiased_under_flips() -> None:
    """With labels flipped with probability eps, the expected rDPO loss equals the clean DPO loss:
    (1 - eps) l_robust(h) + eps l_robust(-h) = -log sigmoid(beta h)."""
    h = torch.linspace(-5, 5, 11, dtype=F64)
    eps, beta = 0.2, 0.7
    fn = PREFERENCE_LOSSES["robust"]
    expected = (1 - eps) * fn(h, beta=beta, label_smoothing=eps) + eps * fn(-h, beta=beta, label_smoothing=eps)
    torch.testing.assert_close(expected, -torch.nn.functional.logsigmoid(beta * h))


def test_registry_shares_one_signature() -> None:
    """Every variant takes (h, *, beta, label_smoothing); dpo_loss dispatches through the dict."""
    assert set(PREFERENCE_LOSSES) == {"sigmoid", "ipo", "hinge", "robust"}
    h = torch.tensor([2.0], dtype=F64)
    for name, fn in PREFERENCE_LOSSES.items():
        direct = fn(h, beta=0.5, label_smoothing=0.0)
        via_dpo = dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type=name)[0]
        torch.testing.assert_close(direct, via_dpo)


def test_validation() -> None:
    with pytest.raises(ValueError, match="sigmoid, ipo, hinge, robust"):
        dpo_loss(PC, PR, RC, RR, loss_type="kto_pair")
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        dpo_loss(PC, PR, RC, RR, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match=r"\[0, 0.5\]"):
        dpo_loss(PC, PR, RC, RR, loss_type="sigmoid", label_smoothing=0.6)
    with pytest.raises(ValueError, match=r"\[0, 0.5\]"):
        dpo_loss(PC, PR, RC, RR, loss_type="sigmoid", label_smoothing=-0.1)
    with pytest.raises(ValueError, match="'sigmoid' and 'robust'"):
        dpo_loss(PC, PR, RC, RR, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(PC, PR, RC, RR, beta=0.0)
    # eps = 0.5 is allowed for sigmoid (the loss no longer prefers either response):
    # at beta h = 1 it is 0.5 * (0.3132617 + 1.3132617) = 0.8132617
    assert dpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.5)[0].item() == pytest.approx(0.5 * (LS1 + LSM1))


def _rand_inputs(n: int = 5) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [(torch.randn(n, dtype=F64) * 3).requires_grad_(True) for _ in range(4)]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
def test_dpo_gradcheck(loss_type: str) -> None:
    """float64 gradcheck for each variant (with smoothing where allowed). Hinge inputs are kept away from
    its kink at beta h = 1 by using beta = 0.1 with |h| of a few units."""
    eps = 0.1 if loss_type in ("sigmoid", "robust") else 0.0
    inputs = _rand_inputs()

    def fn(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor) -> torch.Tensor:
        return dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type=loss_type, label_smoothing=eps)[0]

    assert torch.autograd.gradcheck(fn, tuple(inputs))


def test_simpo_by_hand() -> None:
    """c = -1, r = -2, beta 2, gamma 1: -log sigmoid(2 * 1 - 1) = 0.3132617; rewards 2c = -2, 2r = -4."""
    losses, m = simpo_loss(torch.tensor([-1.0], dtype=F64), torch.tensor([-2.0], dtype=F64))
    assert losses.item() == pytest.approx(LS1)
    assert m["rewards/chosen"].item() == -2.0 and m["rewards/rejected"].item() == -4.0
    assert m["rewards/margin"].item() == 2.0 and m["rewards/accuracy"].item() == 1.0


def test_simpo_gradcheck() -> None:
    c, r = _rand_inputs()[:2]
    assert torch.autograd.gradcheck(lambda a, b: simpo_loss(a, b, beta=2.0, gamma=0.5)[0], (c, r))


def test_orpo_by_hand() -> None:
    """c = ln 0.5: odds 1, log odds 0; r = ln 0.2: odds 0.25, log odds ln 0.25 = -1.3862944;
    log odds ratio ln 4, loss = -log sigmoid(ln 4) = -log(4/5) = 0.2231436."""
    losses, m = orpo_odds_ratio_loss(torch.tensor([math.log(0.5)], dtype=F64), torch.tensor([math.log(0.2)], dtype=F64))
    assert losses.item() == pytest.approx(-math.log(0.8))
    assert m["log_odds_ratio"].item() == pytest.approx(math.log(4.0))
    assert m["log_odds_chosen"].item() == pytest.approx(0.0, abs=1e-12)
    assert m["log_odds_rejected"].item() == pytest.approx(math.log(0.25))
    assert m["accuracy"].item() == 1.0


def test_log1mexp_accuracy() -> None:
    """log(1 - exp(x)) against float64 references on both branches, where the naive formula fails in float32:
    x = -1e-5: log(1 - e^-1e-5) = log(9.99995e-6) = -11.512930; x = -30: -e^-30 = -9.357623e-14."""
    x = torch.tensor([-1e-5, -30.0, -0.5, -1.0])
    ref = torch.tensor(
        [
            math.log(-math.expm1(-1e-5)),
            math.log1p(-math.exp(-30.0)),
            math.log1p(-math.exp(-0.5)),
            math.log1p(-math.exp(-1.0)),
        ]
    )
    torch.testing.assert_close(log1mexp(x), ref, rtol=1e-6, atol=0.0)


def test_orpo_limits_finite() -> None:
    """p = 0 (probability 1, infinite odds) is clamped to -1e-6; p = -500 is fine: finite loss and grads."""
    for dtype in (torch.float32, torch.bfloat16, F64):
        c = torch.tensor([0.0, -500.0, -0.0, -1e-9], dtype=dtype, requires_grad=True)
        r = torch.tensor([-500.0, 0.0, -0.0, -3.0], dtype=dtype, requires_grad=True)
        losses, _ = orpo_odds_ratio_loss(c, r)
        losses.sum().backward()
        assert torch.isfinite(losses).all(), dtype
        assert c.grad is not None and torch.isfinite(c.grad).all()
        assert r.grad is not None and torch.isfinite(r.grad).all()
        assert losses[2].item() == pytest.approx(math.log(2.0), rel=1e-3)  # equal inputs: ln 2


def test_orpo_gradcheck() -> None:
    c = (-torch.rand(5, dtype=F64) * 3 - 0.01).requires_grad_(True)
    r = (-torch.rand(5, dtype=F64) * 3 - 0.01).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: orpo_odds_ratio_loss(a, b)[0], (c, r))


def test_kto_by_hand() -> None:
    """policy [-1, -1], ref [-2, -0.5] -> r = [1, -0.5]; kl_ref 0.5, beta 1, w_d 2, w_u 3.
    desirable:   2 * (1 - sigmoid(1 - 0.5))    = 2 * 0.3775407 = 0.7550813
    undesirable: 3 * (1 - sigmoid(0.5 + 0.5))  = 3 * 0.2689414 = 0.8068243"""
    losses, m = kto_loss(
        torch.tensor([-1.0, -1.0], dtype=F64),
        torch.tensor([-2.0, -0.5], dtype=F64),
        torch.tensor([True, False]),
        torch.tensor(0.5, dtype=F64),
        beta=1.0,
        desirable_weight=2.0,
        undesirable_weight=3.0,
    )
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    torch.testing.assert_close(losses, torch.tensor([2 * (1 - sig(0.5)), 3 * (1 - sig(1.0))], dtype=F64))
    torch.testing.assert_close(m["rewards"], torch.tensor([1.0, -0.5], dtype=F64))
    assert m["kl_ref"].item() == 0.5
    torch.testing.assert_close(m["desirable"], torch.tensor([1.0, 0.0], dtype=F64))


def test_kto_reference_point_is_clamped_and_detached() -> None:
    """kl_ref = -3 is clamped to 0 (loss as with 0); no gradient reaches kl_ref."""
    kl_ref = torch.tensor(-3.0, dtype=F64, requires_grad=True)
    pol = torch.tensor([-1.0, -2.0], dtype=F64, requires_grad=True)
    ref = torch.tensor([-1.5, -1.0], dtype=F64)
    desirable = torch.tensor([True, False])
    losses, m = kto_loss(pol, ref, desirable, kl_ref)
    zero_ref, _ = kto_loss(pol, ref, desirable, 0.0)
    torch.testing.assert_close(losses, zero_ref)
    assert m["kl_ref"].item() == 0.0
    losses.sum().backward()
    assert kl_ref.grad is None
    assert pol.grad is not None and torch.all(pol.grad != 0)


def test_kto_gradcheck() -> None:
    pol, ref = _rand_inputs()[:2]
    desirable = torch.tensor([True, False, True, True, False])
    assert torch.autograd.gradcheck(lambda p, r: kto_loss(p, r, desirable, torch.tensor(0.3), beta=0.5)[0], (pol, ref))


EXTREME_CASES: dict[str, Callable[[list[torch.Tensor]], torch.Tensor]] = {
    "sigmoid": lambda x: dpo_loss(*x, beta=0.1, label_smoothing=0.1)[0],
    "ipo": lambda x: dpo_loss(*x, beta=0.1, loss_type="ipo")[0],
    "hinge": lambda x: dpo_loss(*x, beta=0.1, loss_type="hinge")[0],
    "robust": lambda x: dpo_loss(*x, beta=0.1, loss_type="robust", label_smoothing=0.2)[0],
    "simpo": lambda x: simpo_loss(x[0] / 100, x[1] / 100)[0],
    "orpo": lambda x: orpo_odds_ratio_loss(x[0], x[1])[0],
    "kto": lambda x: kto_loss(x[0], x[2], torch.tensor([True, False, True, False]), torch.tensor(1.0))[0],
}


@pytest.mark.parametrize("name", sorted(EXTREME_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_log_prob_gaps(name: str, dtype: torch.dtype) -> None:
    """Summed log-probs of 0 and -1000 in all combinations (gaps of +-1000 nats, h up to +-2000): finite
    losses and finite gradients for every loss, in float32 and bfloat16."""
    pc = torch.tensor([0.0, -1000.0, -1000.0, 0.0], dtype=dtype, requires_grad=True)
    pr = torch.tensor([-1000.0, 0.0, -1000.0, 0.0], dtype=dtype, requires_grad=True)
    rc = torch.tensor([-1000.0, 0.0, 0.0, -1000.0], dtype=dtype, requires_grad=True)
    rr = torch.tensor([0.0, -1000.0, 0.0, -1000.0], dtype=dtype, requires_grad=True)
    losses = EXTREME_CASES[name]([pc, pr, rc, rr])
    losses.sum().backward()
    assert torch.isfinite(losses).all()
    grads = [t.grad for t in (pc, pr, rc, rr) if t.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
