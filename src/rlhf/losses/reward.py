"""Reward-model loss: Bradley-Terry pairwise likelihood, with an optional margin, and a reward-centering term."""

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


def reward_centering_penalty(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Auxiliary term that pulls the rewards of each pair towards zero mean, per pair.

        c = (r_c + r_r)^2

    Eisenstein et al. 2023, "Helping or Herding? Reward Model Ensembles Mitigate but do not Eliminate Reward
    Hacking", Sec. 3 (pretraining the reward models): the Bradley-Terry likelihood only sees differences
    r_c - r_r, so the reward's offset is free; adding `eta * (r_c + r_r)^2` (they use eta = 0.01) fixes it near
    0, which makes the rewards of different models (an ensemble, or runs of one model) comparable. The
    trainer adds `center_coef * c` to the Bradley-Terry loss of each pair, so the batch mean is
    `center_coef * mean((r_c + r_r)^2)`, TRL's `center_rewards_coefficient` term.

    Shapes: chosen_rewards, rejected_rewards (B,). Returns the penalty (B,), not reduced, with no metrics
    dict (it is one number per pair; the trainer logs its mean). Half precision is computed in float32.
    """
    return (upcast(chosen_rewards) + upcast(rejected_rewards)) ** 2
