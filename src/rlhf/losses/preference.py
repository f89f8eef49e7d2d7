"""Direct preference losses: the DPO family (sigmoid, ipo, hinge, robust), SimPO, the ORPO odds-ratio term, KTO.

Log-probabilities are summed over the response tokens unless the argument name says `avg` (mean over the
response tokens, as SimPO and ORPO define them). Every loss is returned per example (B,), not reduced, with
a dict of detached per-example metrics. Half-precision inputs are computed and returned in float32.

The four DPO variants share one signature, `(h, *, beta, label_smoothing) -> losses`, where h is the
difference of the policy-to-reference log-ratios of the chosen and the rejected response; they sit in the
plain dict `PREFERENCE_LOSSES` at the bottom of this module and `dpo_loss` looks the variant up there.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F

from rlhf.losses.reduce import upcast


class PreferenceLoss(Protocol):
    """A DPO-family variant: per-example loss from h = (pc - rc) - (pr - rr)."""

    def __call__(self, h: torch.Tensor, *, beta: float, label_smoothing: float) -> torch.Tensor: ...


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")


def _check_no_smoothing(name: str, label_smoothing: float) -> None:
    if label_smoothing != 0.0:
        raise ValueError(f"label_smoothing applies to the 'sigmoid' and 'robust' losses only, not {name!r}")


def sigmoid_loss(h: torch.Tensor, *, beta: float, label_smoothing: float) -> torch.Tensor:
    """DPO, and conservative DPO (cDPO) when label_smoothing = eps > 0.

        l = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h),    0 <= eps <= 0.5

    Rafailov et al. 2023, "Direct Preference Optimization", eq. 7 (eps = 0). cDPO: Mitchell 2023, "A note on
    DPO with noisy preferences & relationship to IPO": the labels are assumed flipped with probability eps,
    which is a binary cross-entropy against the soft target 1 - eps. Shape of h.
    """
    _check_beta(beta)
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5] for the 'sigmoid' loss, got {label_smoothing}")
    z = beta * h
    return -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def ipo_loss(h: torch.Tensor, *, beta: float, label_smoothing: float) -> torch.Tensor:
    """IPO: regress the log-ratio difference onto 1 / (2 beta).

        l = (h - 1 / (2 beta))^2

    Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences", eq. 17
    (the sampled IPO loss; their tau is our beta). h uses summed log-probs, as in the paper. label_smoothing
    must be 0. Shape of h.
    """
    _check_beta(beta)
    _check_no_smoothing("ipo", label_smoothing)
    return (h - 1.0 / (2.0 * beta)).square()


def hinge_loss(h: torch.Tensor, *, beta: float, label_smoothing: float) -> torch.Tensor:
    """Hinge (SLiC) loss on the DPO log-ratio difference.

        l = relu(1 - beta h)

    Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback" (the rank-calibration
    hinge loss, here on reference-normalised log-probs as listed in the DPO literature; margin 1/beta).
    label_smoothing must be 0. Shape of h.
    """
    _check_beta(beta)
    _check_no_smoothing("hinge", label_smoothing)
    return torch.relu(1.0 - beta * h)


def robust_loss(h: torch.Tensor, *, beta: float, label_smoothing: float) -> torch.Tensor:
    """Robust DPO (rDPO): unbiased DPO loss under labels flipped with known probability eps.

        l = ( -(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h) ) / (1 - 2 eps),    0 <= eps < 0.5

    Chowdhury, Kini & Natarajan 2024, "Provably Robust DPO: Aligning Language Models with Noisy Feedback"
    (ICML), Sec. 3 (the rDPO loss). Unlike cDPO the second term has a plus sign: in expectation over the
    flips it equals the clean DPO loss. For eps > 0 it is unbounded below as beta h grows (the eps term
    tends to -eps beta h / (1 - 2 eps)); eps = 0.5 is excluded by the division. Shape of h.
    """
    _check_beta(beta)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) for the 'robust' loss, got {label_smoothing}")
    z = beta * h
    eps = label_smoothing
    return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO-family loss per preference pair.

        h = (pc - rc) - (pr - rr)          pc, pr: policy log-probs of chosen / rejected (summed over tokens)
                                           rc, rr: reference log-probs of the same
        l = PREFERENCE_LOSSES[loss_type](h, beta=beta, label_smoothing=label_smoothing)

    Variants (see each function for the formula and reference): sigmoid (DPO, Rafailov et al. 2023 eq. 7;
    cDPO with label_smoothing), ipo (Azar et al. 2023 eq. 17), hinge (SLiC, Zhao et al. 2023), robust
    (rDPO, Chowdhury et al. 2024).

    Shapes: the four inputs (B,). Returns the loss (B,), not reduced (take the mean), and detached metrics,
    each (B,):
        rewards/chosen     beta (pc - rc)        implicit reward of the chosen response
        rewards/rejected   beta (pr - rr)
        rewards/accuracy   1.0 where rewards/chosen > rewards/rejected
        rewards/margin     rewards/chosen - rewards/rejected
    """
    if loss_type not in PREFERENCE_LOSSES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {', '.join(PREFERENCE_LOSSES)}")
    chosen_logratios = upcast(policy_chosen_logps) - upcast(ref_chosen_logps)
    rejected_logratios = upcast(policy_rejected_logps) - upcast(ref_rejected_logps)
    h = chosen_logratios - rejected_logratios
    losses = PREFERENCE_LOSSES[loss_type](h, beta=beta, label_smoothing=label_smoothing)
    return losses, _reward_metrics(beta * chosen_logratios, beta * rejected_logratios)


def simpo_loss(
    chosen_avg_logps: torch.Tensor,
    rejected_avg_logps: torch.Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SimPO: reference-free, length-normalised reward with a target margin gamma.

        l = -log sigmoid(beta (c - r) - gamma)       c, r: mean per-token log-probs of chosen / rejected

    Meng, Xia & Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward", eq. 6.
    Shapes: (B,) in, loss (B,) out, not reduced. Detached metrics (B,): rewards/chosen = beta c,
    rewards/rejected = beta r, rewards/accuracy (1.0 where c > r), rewards/margin = beta (c - r).
    """
    _check_beta(beta)
    chosen_rewards = beta * upcast(chosen_avg_logps)
    rejected_rewards = beta * upcast(rejected_avg_logps)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return losses, _reward_metrics(chosen_rewards, rejected_rewards)


def _reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """Detached per-pair metrics of implied rewards (B,): chosen, rejected, accuracy (1.0 where chosen wins), margin."""
    chosen, rejected = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/accuracy": (chosen > rejected).to(chosen.dtype),
        "rewards/margin": chosen - rejected,
    }


LOG_PROB_MAX = -1e-6
"""Average log-probs are clamped to at most this value before log(1 - exp(p)): at p = 0 the odds are
infinite. A token-average log-prob above -1e-6 means probability > 0.999999; the clamp only touches those."""


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate over the whole range (Maechler 2012, "Accurately Computing
    log(1 - exp(-|a|))"): log(-expm1(x)) for x > -ln 2, log1p(-exp(x)) otherwise. Both branches are finite
    for x < 0, so the `where` passes finite gradients. Elementwise."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_odds_ratio_loss(
    chosen_avg_logps: torch.Tensor,
    rejected_avg_logps: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO odds-ratio term (the trainer adds lambda times this to the SFT NLL of the chosen response).

        log_odds(p) = p - log(1 - exp(p))            p: mean per-token log-prob, clamped to <= -1e-6
        l           = -log sigmoid(log_odds(c) - log_odds(r))

    Hong, Lee & Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference Model", eq. 7
    (odds: eq. 4; the full objective L_SFT + lambda L_OR: eq. 6). log(1 - exp(p)) is computed with
    `log1mexp`, so p near 0 and p of -500 are both finite.

    Shapes: (B,) in, loss (B,) out, not reduced. Detached metrics (B,): log_odds_ratio, log_odds_chosen,
    log_odds_rejected, accuracy (1.0 where the log odds ratio is > 0).
    """
    c = upcast(chosen_avg_logps).clamp(max=LOG_PROB_MAX)
    r = upcast(rejected_avg_logps).clamp(max=LOG_PROB_MAX)
    log_odds_chosen = c - log1mexp(c)
    log_odds_rejected = r - log1mexp(r)
    log_odds_ratio = log_odds_chosen - log_odds_rejected
    losses = -F.logsigmoid(log_odds_ratio)
    metrics = {
        "log_odds_ratio": log_odds_ratio.detach(),
        "log_odds_chosen": log_odds_chosen.detach(),
        "log_odds_rejected": log_odds_rejected.detach(),
        "accuracy": (log_odds_ratio > 0).to(losses.dtype).detach(),
    }
    return losses, metrics


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl_ref: torch.Tensor | float,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KTO loss per example, from unpaired desirable / undesirable labels.

        r = policy_logps - ref_logps,   z = max(kl_ref, 0)   (detached: no gradient through the reference point)
        desirable:     l = w_d (1 - sigmoid(beta (r - z)))  = w_d sigmoid(beta (z - r))
        undesirable:   l = w_u (1 - sigmoid(beta (z - r)))  = w_u sigmoid(beta (r - z))

    Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", Sec. 4.1, eq. 8
    (ICML version; lambda_D = w_d, lambda_U = w_u). 1 - sigmoid(x) is computed as sigmoid(-x), which keeps
    its precision when sigmoid(x) is close to 1. `kl_ref` is the batch estimate of KL(pi || pi_ref) from
    mismatched prompt / completion pairs (the trainer computes it).

    Shapes: policy_logps, ref_logps (B,) summed log-probs; desirable (B,) bool (True = desirable);
    kl_ref a scalar. Returns the loss (B,), not reduced, and detached metrics:
        rewards     (B,) beta r, the implicit reward (average it per class with `desirable`)
        desirable   (B,) 1.0 for desirable examples
        kl_ref      ()   z, the reference point used
    """
    _check_beta(beta)
    r = upcast(policy_logps) - upcast(ref_logps)
    z = torch.as_tensor(kl_ref, device=r.device).detach().to(r.dtype).clamp(min=0.0)
    is_desirable = desirable.to(device=r.device, dtype=torch.bool)
    desirable_losses = desirable_weight * torch.sigmoid(beta * (z - r))
    undesirable_losses = undesirable_weight * torch.sigmoid(beta * (r - z))
    losses = torch.where(is_desirable, desirable_losses, undesirable_losses)
    metrics = {
        "rewards": beta * r.detach(),
        "desirable": is_desirable.to(losses.dtype),
        "kl_ref": z,
    }
    return losses, metrics


PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {
    "sigmoid": sigmoid_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
    "robust": robust_loss,
}
