"""Clipped value-function loss for PPO, per token."""

from __future__ import annotations

import torch

from rlhf.losses.reduce import upcast


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    *,
    clip_range: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped squared error between the value predictions and the returns (to minimise).

        v_clip = old_values + clip(values - old_values, -clip_range, clip_range)
        l      = 0.5 * max((values - returns)^2, (v_clip - returns)^2)

    The value analogue of the PPO ratio clip: from OpenAI Baselines' ppo2 (Dhariwal et al. 2017) rather than
    the PPO paper (which has no value clipping); Andrychowicz et al. 2021, "What Matters in On-Policy
    Reinforcement Learning?", study its effect. `clip_range` is in the units of the value (rewards), not a
    ratio. No equation number: there is no paper equation to point to.

    Shapes: all (B, T). Returns the loss (B, T), not reduced (use `reduce.aggregate`), and the detached
    per-token metric `clipfrac` (B, T): 1.0 where the clipped error is strictly the larger one. Half precision
    is computed and returned in float32.
    """
    if clip_range < 0:
        raise ValueError(f"clip_range must be >= 0, got {clip_range}")
    values, old_values, returns = upcast(values), upcast(old_values), upcast(returns)
    v_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    vf_loss1 = (values - returns).square()
    vf_loss2 = (v_clipped - returns).square()
    loss = 0.5 * torch.maximum(vf_loss1, vf_loss2)
    metrics = {"clipfrac": (vf_loss2 > vf_loss1).to(loss.dtype)}
    return loss, metrics
