"""Reward-model loss: Bradley-Terry pairwise likelihood, with an optional margin."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf.losses.reduce import upcast


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Negative log-likelihood of the preference under the Bradley-Terry model, per pair.

        l = -log sigmoid(r_c - r_r - margin)          (margin = 0 when None)

    Ouyang et al. 2022, "Training language models to follow instructions with human feedback" (InstructGPT),
    eq. 1 (there averaged over the K-choose-2 pairs of a prompt; here one loss per pair). The margin
    variant is from Touvron et al. 2023 (Llama 2), Sec. 3.2.2: the chosen reward must exceed the rejected
    one by `margin` (e.g. larger for "significantly better" labels). Computed with logsigmoid, so a reward
    gap of -1000 gives a loss of 1000, not inf.

    Shapes: chosen_rewards, rejected_rewards (B,); margin (B,) or a scalar. Returns the loss (B,), not
    reduced (take the mean), and detached metrics, each (B,):
        accuracy   1.0 where r_c > r_r, else 0.0
        margin     r_c - r_r
    Half precision is computed and returned in float32.
    """
    chosen_rewards, rejected_rewards = upcast(chosen_rewards), upcast(rejected_rewards)
    diff = chosen_rewards - rejected_rewards
    logits = diff
    if margin is not None:
        logits = diff - (upcast(margin) if isinstance(margin, torch.Tensor) else margin)
    losses = -F.logsigmoid(logits)
    metrics = {
        "accuracy": (diff > 0).to(losses.dtype),
        "margin": diff.detach(),
    }
    return losses, metrics
