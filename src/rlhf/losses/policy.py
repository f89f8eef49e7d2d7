"""PPO clipped surrogate (asymmetric and dual clip), per token; entropy of the policy.

The loss is per token and not reduced: reduce it with `reduce.aggregate` (the choice of mode is what
separates GRPO, Dr. GRPO and DAPO). The metrics are per-token too, so the trainer reduces them with the same
mask and mode as the loss.
"""

from __future__ import annotations

import torch

from rlhf.losses.logprobs import entropy_from_logits
from rlhf.losses.reduce import masked_mean, upcast

__all__ = ["LOGRATIO_CLAMP", "entropy_from_logits", "ppo_policy_loss", "sequence_log_ratio"]

LOGRATIO_CLAMP = 20.0
"""The log-ratio is clamped to [-20, 20] before exp: exp(500) overflows every float dtype (and exp(89)
overflows float32), which would turn a stale or corrupted token into inf / NaN loss and gradients. A ratio of
exp(20) ~ 4.85e8 is far outside any clip range, so the clipped branches are unchanged; beyond the clamp the
unclipped branch has zero gradient."""


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate loss per token (to minimise).

        logratio = clamp(logprobs - old_logprobs, -20, 20),  ratio = exp(logratio)
        pg_loss1 = -A * ratio
        pg_loss2 = -A * clip(ratio, 1 - clip_low, 1 + clip_high)
        l        = max(pg_loss1, pg_loss2)
        if dual_clip = c (c > 1), where A < 0:   l = min(l, -A * c)

    PPO: Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7 (the max of the two losses is
    the min of the two objectives). Asymmetric bounds (clip_high > clip_low, "clip-higher"): Yu et al. 2025,
    DAPO. Dual clip: Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep Reinforcement
    Learning", eq. 5: for A < 0 the loss is capped at -c * A, so a ratio that has run far above 1 cannot give
    an unbounded loss.

    Shapes: logprobs, old_logprobs (B, T); advantages (B, T), or (B, 1) for one advantage per sequence
    (GRPO, RLOO), broadcast. Returns the loss (B, T), not reduced, and per-token (B, T) detached metrics:
        ratio          exp(logratio)
        clipfrac       1.0 where the clipped branch is strictly the larger loss (its gradient is cut), else 0
        dual_clipfrac  1.0 where the dual-clip cap is active, else 0 (all 0 when dual_clip is None)
        approx_kl      (ratio - 1) - logratio: the k3 estimator of KL(pi_old || pi) from tokens sampled from
                       pi_old (Schulman 2020, "Approximating KL Divergence"), >= 0
    Padded positions must hold finite log-probs (`token_logprobs` gives finite values everywhere); mask them
    in the reduction. Half precision is computed and returned in float32.
    """
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip_low and clip_high must be >= 0, got {clip_low} and {clip_high}")
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 (it caps the loss at -dual_clip * A for A < 0), got {dual_clip}")
    advantages = upcast(advantages)
    logratio = (upcast(logprobs) - upcast(old_logprobs)).clamp(-LOGRATIO_CLAMP, LOGRATIO_CLAMP)
    ratio = torch.exp(logratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    clipped_loss = torch.maximum(pg_loss1, pg_loss2)
    clipfrac = pg_loss2 > pg_loss1
    if dual_clip is None:
        loss = clipped_loss
        dual_clipfrac = torch.zeros_like(clipfrac)
    else:
        pg_loss3 = -advantages * dual_clip
        negative = advantages < 0
        loss = torch.where(negative, torch.minimum(clipped_loss, pg_loss3), clipped_loss)
        dual_clipfrac = negative & (pg_loss3 < clipped_loss)
    approx_kl = (torch.expm1(logratio) - logratio).clamp(min=0.0)
    metrics = {
        "ratio": ratio.detach(),
        "clipfrac": clipfrac.to(loss.dtype),
        "dual_clipfrac": dual_clipfrac.to(loss.dtype),
        "approx_kl": approx_kl.detach(),
    }
    return loss, metrics


def sequence_log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO's sequence-level importance ratio, as a per-token log-ratio for `ppo_policy_loss`.

        log s_i     = (1 / |y_i|) sum_t (logprobs_i,t - old_logprobs_i,t)       s_i = (pi(y_i) / pi_old(y_i))^(1/|y_i|)
        log s_i,t   = sg[log s_i] + logprobs_i,t - sg[logprobs_i,t]              (GSPO-token)

    Every token of sequence i gets the value log s_i (so clipping acts on the whole sequence) and the gradient of
    its own log-prob scaled by s_i; with one advantage per sequence this is GSPO's gradient exactly. Zheng et al.
    2025, "Group Sequence Policy Optimization", Sec. 4 (the sequence ratio, length-normalised) and Sec. 4.3
    (GSPO-token). Pass the result as `logprobs` with `old_logprobs = 0`.
    Shapes: (B, T) in, (B, T) out; rows with no valid token get 0. Half precision is computed in float32.
    """
    logprobs = upcast(logprobs)
    seq = masked_mean(logprobs - upcast(old_logprobs), mask, dim=-1).detach()  # (B,) log s_i
    return seq[:, None] + logprobs - logprobs.detach()
