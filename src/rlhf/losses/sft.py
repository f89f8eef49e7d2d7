"""Supervised fine-tuning loss: masked token cross-entropy, per token."""

from __future__ import annotations

import torch

from rlhf.losses.logprobs import token_logprobs


def sft_loss(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Negative log-likelihood of each label token, and the mask of tokens that carry loss.

        mask[b, t] = labels[b, t] != ignore_index
        l[b, t]    = -log softmax(logits[b, t])[labels[b, t]]   where mask, 0 elsewhere

    The standard maximum-likelihood objective (no paper equation to cite). The labels are already aligned
    with the logits (the caller shifts by one); prompt and padding positions carry `ignore_index`. Uses
    `token_logprobs`, so no second (B, T, V) tensor is built.

    Shapes: logits (B, T, V), labels (B, T). Returns (loss (B, T), mask (B, T) float 0/1 of the loss dtype),
    not reduced: `reduce.aggregate(loss, mask)` with mode token_mean is the usual mean cross-entropy.
    Half-precision logits give a float32 loss.
    """
    keep = labels != ignore_index
    logp = token_logprobs(logits, torch.where(keep, labels, torch.zeros_like(labels)))  # (B, T)
    loss = torch.where(keep, -logp, torch.zeros_like(logp))
    return loss, keep.to(loss.dtype)
