"""Forward passes shared by every trainer: token log-probs and entropy of a causal LM, scalar scores of a
reward model, per-token values of a critic.

Position ids always come from the attention mask (`cumsum - 1`), so a left-padded prompt gets the same
positions in training as in generation, and a right-padded one the same as without padding.

Given a batch's `Unpadded` layout (`flat=`) and a model switched to padding-free attention
(`rlhf.models.padding_free.enable`), a padded batch runs as one flat row of its attended tokens and the results
are put back in the padded layout (hidden states, logits and scores are 0 where the position is not attended;
the padded pass leaves values of no meaning there). At attended positions the values (and gradients) equal the
padded forward's up to float summation order. A rollout batch (left-padded prompts, responses padded after
EOS) is often more than half padding: PPO's no-grad scoring passes run this way, about 2x faster at 40%
attended tokens on a hidden-256 model (on the tiny benchmark model per-op overhead dominates and it is even).
Building the layout reads the mask on the host, so build it where a sync costs nothing, not inside a step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from rlhf.losses.logprobs import token_logprobs
from rlhf.losses.policy import entropy_from_logits
from rlhf.models import padding_free


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """(B, L) positions counting only attended tokens; padded positions get 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass(frozen=True)
class Unpadded:
    """Where a padded batch's attended tokens go when it runs as one flat row (`rlhf.models.padding_free`).

    tokens: (N,) index, into the flattened (B * L) batch, of each attended token, in row order.
    index:  (B, L) flat index of each attended position, -1 elsewhere.
    """

    tokens: Tensor
    index: Tensor
    inputs: dict[str, Any]  # `padding_free.flat_inputs`: position ids, mask and layout of the flat forward

    @classmethod
    def of(cls, attention_mask: Tensor) -> Unpadded:
        """The layout of a (B, L) mask (read on the host: build it outside a step's hot path)."""
        real = attention_mask.bool()
        lengths = real.sum(-1).tolist()
        tokens = real.flatten().nonzero().squeeze(1)
        index = torch.full(real.shape, -1, dtype=torch.long, device=real.device)
        index.view(-1)[tokens] = torch.arange(len(tokens), device=real.device)
        inputs = {k: v.to(real.device) for k, v in padding_free.flat_inputs(lengths).items()}
        return cls(tokens, index, inputs)

    def kwargs(self, input_ids: Tensor) -> dict[str, Any]:
        """Keyword arguments of the flat forward of `input_ids` (B, L)."""
        return {"input_ids": input_ids.flatten()[self.tokens][None], **self.inputs, "use_cache": False}  # (1, N)

    def take(self, flat: Tensor, positions: Tensor) -> Tensor:
        """Rows of `flat` (1, N, ...) at padded `positions` (B, K) of flat indices: (B, K, ...), 0 where -1."""
        return zero_where_padding(flat[0, positions.clamp(min=0)], positions)


def zero_where_padding(x: Tensor, positions: Tensor) -> Tensor:
    """`x` (B, K, ...) with 0 wherever `positions` (B, K) is -1."""
    keep = (positions >= 0).view(*positions.shape, *([1] * (x.dim() - positions.dim())))
    return torch.where(keep, x, x.new_zeros(()))


def causal_lm_logits(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    response_len: int | None = None,
    flat: Unpadded | None = None,
    hidden: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Logits predicting each token from the ones before it, (B, L-1, V) aligned with `input_ids[:, 1:]`, or
    with `response_len=T` only those of the last T tokens, (B, T, V): only those positions go through the LM
    head (`logits_to_keep`), most of the vocabulary cost saved. With `hidden`, also the last hidden state at
    the same positions, (B, T, H). `flat`: the batch's padding-free layout, used when the model can (see the
    module docstring).
    """
    width = input_ids.shape[1] - 1 if response_len is None else response_len
    if flat is not None and padding_free.enabled(model):
        positions = flat.index[:, -(width + 1) : -1]  # (B, T): the predicting positions
        out = model(
            **flat.kwargs(input_ids), logits_to_keep=positions.clamp(min=0).flatten(), output_hidden_states=hidden
        )
        logits = zero_where_padding(out.logits.view(*positions.shape, -1), positions)  # (B, T, V)
        return logits, flat.take(out.hidden_states[-1], positions) if hidden else None
    kwargs: dict[str, Any] = {"attention_mask": attention_mask, "position_ids": position_ids_from_mask(attention_mask)}
    out = model(input_ids=input_ids, use_cache=False, logits_to_keep=width + 1, output_hidden_states=hidden, **kwargs)
    return out.logits[:, :-1], out.hidden_states[-1][:, -(width + 1) : -1] if hidden else None


def causal_lm_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    response_len: int | None = None,
    with_entropy: bool = False,
    temperature: float = 1.0,
    flat: Unpadded | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Log-prob of each token given the ones before it, and optionally the entropy of each prediction.

    Returns `(logprobs, entropy)` aligned with `input_ids[:, 1:]`, shape (B, L-1); or, when `response_len=T` is
    given, only the last T tokens (B, T): the response of a [left-padded prompt | response] rollout (see
    `causal_lm_logits`). `temperature` divides the logits, matching the sampling distribution of generation.
    """
    logits, _ = causal_lm_logits(model, input_ids, attention_mask, response_len=response_len, flat=flat)
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


def token_scores(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, *, flat: Unpadded | None = None
) -> Tensor:
    """The scalar head applied at every position, (B, L): a critic's values or a reward model's per-token scores.
    `flat`: the batch's padding-free layout, used when the model can (see the module docstring)."""
    backbone, head = backbone_and_head(model)
    if flat is not None and padding_free.enabled(model):
        scores = head(backbone(**flat.kwargs(input_ids)).last_hidden_state).squeeze(-1).float()  # (1, N)
        return flat.take(scores[..., None], flat.index)[..., 0]  # (B, L)
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


def sequence_scores(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, *, flat: Unpadded | None = None
) -> Tensor:
    """A reward model's score of each sequence, read at its last non-pad token (by the mask, not the pad id). (B,)

    Reading by the mask keeps the final EOS even when pad == eos, where `transformers`' own pooling (by pad id)
    would step back one token.
    """
    scores = token_scores(model, input_ids, attention_mask, flat=flat)  # (B, L)
    return scores.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)
