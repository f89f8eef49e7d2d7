"""Forward passes shared by every trainer: token log-probs and entropy of a causal LM, scalar scores of a
reward model, per-token values of a critic.

Position ids always come from the attention mask (`cumsum - 1`), so a left-padded prompt gets the same
positions in training as in generation, and a right-padded one the same as without padding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from rlhf.losses.logprobs import token_logprobs
from rlhf.losses.policy import entropy_from_logits


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """(B, L) positions counting only attended tokens; padded positions get 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def causal_lm_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    response_len: int | None = None,
    with_entropy: bool = False,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor | None]:
    """Log-prob of each token given the ones before it, and optionally the entropy of each prediction.

    Returns `(logprobs, entropy)` aligned with `input_ids[:, 1:]`, shape (B, L-1); or, when `response_len=T` is
    given, only the last T tokens (B, T): the response of a [left-padded prompt | response] rollout. Then only the
    last T+1 positions go through the LM head (`logits_to_keep`), which is most of the vocabulary cost saved.
    `temperature` divides the logits, matching the sampling distribution of generation.
    """
    kwargs: dict[str, Any] = {"attention_mask": attention_mask, "position_ids": position_ids_from_mask(attention_mask)}
    if response_len is not None:
        kwargs["logits_to_keep"] = response_len + 1
    logits = model(input_ids=input_ids, use_cache=False, **kwargs).logits[:, :-1]  # (B, T or L-1, V)
    if temperature != 1.0:
        logits = logits / temperature
    labels = input_ids[:, -logits.shape[1] :]  # (B, T or L-1)
    logprobs = token_logprobs(logits, labels)
    entropy = entropy_from_logits(logits) if with_entropy else None
    return logprobs, entropy


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The transformer body and the scalar head of an `AutoModelForSequenceClassification` (or peft wrapper)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = getattr(base, "score", None)
    backbone = getattr(base, getattr(base, "base_model_prefix", ""), None)
    if head is None or backbone is None:
        raise TypeError(f"{type(base).__name__}: expected a sequence-classification model with a `score` head")
    return backbone, head


def token_scores(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The scalar head applied at every position, (B, L): a critic's values or a reward model's per-token scores."""
    backbone, head = backbone_and_head(model)
    hidden = backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).last_hidden_state  # (B, L, H)
    return head(hidden).squeeze(-1).float()  # (B, L)


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of the last attended token of each row, whatever the padding side. (B,)"""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)


def sequence_scores(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """A reward model's score of each sequence, read at its last non-pad token (by the mask, not the pad id). (B,)

    Reading by the mask keeps the final EOS even when pad == eos, where `transformers`' own pooling (by pad id)
    would step back one token.
    """
    scores = token_scores(model, input_ids, attention_mask)  # (B, L)
    return scores.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)
