"""Pure tensor math for the RLHF objectives: per-token / per-example losses, KL estimators, reductions.

Every module here imports only `torch` and `math`. Functions take tensors and keyword-only floats (never a
model, trainer or config) and return the loss, not reduced, with a dict of detached metric tensors; the
reduction to a scalar is a separate step (`reduce.aggregate`). Formulas and references: docs/algorithms.md.

    kl          kl_penalty (k1, k2, k3), AdaptiveKLController, FixedKLController
    policy      ppo_policy_loss (asymmetric and dual clip), entropy_from_logits
    value       clipped_value_loss
    reduce      masked_mean, masked_var, masked_whiten, aggregate, aggregate_parts
    reward      bradley_terry_loss
    preference  dpo_loss (PREFERENCE_LOSSES: sigmoid, ipo, hinge, robust), simpo_loss, orpo_odds_ratio_loss,
                kto_loss
    sft         sft_loss
    logprobs    token_logprobs, entropy_from_logits
"""

from rlhf.losses.kl import AdaptiveKLController, FixedKLController, kl_penalty
from rlhf.losses.logprobs import entropy_from_logits, token_logprobs
from rlhf.losses.policy import ppo_policy_loss
from rlhf.losses.preference import PREFERENCE_LOSSES, dpo_loss, kto_loss, orpo_odds_ratio_loss, simpo_loss
from rlhf.losses.reduce import AGGREGATE_MODES, aggregate, aggregate_parts, masked_mean, masked_var, masked_whiten
from rlhf.losses.reward import bradley_terry_loss
from rlhf.losses.sft import sft_loss
from rlhf.losses.value import clipped_value_loss

__all__ = [
    "AGGREGATE_MODES",
    "PREFERENCE_LOSSES",
    "AdaptiveKLController",
    "FixedKLController",
    "aggregate",
    "aggregate_parts",
    "bradley_terry_loss",
    "clipped_value_loss",
    "dpo_loss",
    "entropy_from_logits",
    "kl_penalty",
    "kto_loss",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "orpo_odds_ratio_loss",
    "ppo_policy_loss",
    "sft_loss",
    "simpo_loss",
    "token_logprobs",
]
