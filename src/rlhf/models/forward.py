"""Forward passes shared by every trainer: token log-probs and entropy of a causal LM, scalar scores of a
reward model, per-token values of a critic.

Position ids always come from the attention mask (`cumsum - 1`), so a left-padded prompt gets the same
positions in training as in generation, and a right-padded one the same as without padding.

Given a batch's `Unpadded` layout (`flat=`) and a model switched to padding-free attention
(`rlhf.models.padding_free.enable`), a padded batch runs as one flat row of its attended tokens and the results
are put back in the padded layout (log-probs, entropy, hidden states and scores are 0 where the position is
not attended; the padded pass leaves values of no meaning there). At attended positions the values (and
gradients) equal the padded forward's up to float summation order. A rollout batch (left-padded prompts,
responses padded after EOS) is often more than half padding: PPO's scoring passes and updates run this way
(the no-grad passes about 2x faster at 40% attended tokens on a hidden-256 model, and 1.7x on the tiny
benchmark model at 45%). Rows that share their prompt (a GRPO group's completions) share it in the flat row too:
the prompt runs once for the group, its responses each attending to it (`Unpadded.of` with the prompts' width):
at 96 tokens of prompt and a group of 8 the GRPO loop ran 1.7x (hidden 64) to 2.5x (hidden 256) faster.
Building the layout reads the mask on the host, so build it where a sync costs nothing, not inside a step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from rlhf.losses.logprobs import token_logprobs
from rlhf.losses.policy import entropy_from_logits
from rlhf.models import padding_free
from rlhf.models.unwrap import base_model


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """(B, L) positions counting only attended tokens; padded positions get 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def prompt_groups(prompt_ids: Tensor, prompt_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Rows whose attended prompt tokens are the same (a GRPO group's) as groups: (group (B,), first (G,)), the groups
    numbered in the order of their first rows, which `first` holds."""
    B = prompt_ids.shape[0]
    _, group = torch.unique(prompt_ids.masked_fill(prompt_mask == 0, -1), dim=0, return_inverse=True)
    G = int(group.max()) + 1
    rows = torch.arange(B, device=group.device)
    first = torch.full((G,), B, device=group.device).scatter_reduce(0, group, rows, "amin")
    by_first = torch.argsort(first)
    rank = torch.empty_like(by_first)
    rank[by_first] = torch.arange(G, device=group.device)
    return rank[group], first[by_first]


@dataclass(frozen=True)
class Unpadded:
    """Where a padded batch's attended tokens go when it runs as one flat row (`rlhf.models.padding_free`).

    tokens:  (N,) index, into the flattened (B * L) batch, of each token of the flat row, in its order.
    index:   (B, L) flat index of each attended position, -1 elsewhere.
    lengths: each flat sequence's tokens.
    spans:   None: each row is one flat sequence. Else rows that share a prompt share its tokens: each flat sequence
             is [prompt | response 1 | ... | response k], these are its lengths, and the index of every one of its
             rows points at the one prompt (`of`).
    """

    tokens: Tensor
    index: Tensor
    lengths: tuple[int, ...]
    spans: tuple[tuple[int, ...], ...] | None = None
    _inputs: dict[int, dict[str, Any]] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, attention_mask: Tensor, input_ids: Tensor | None = None, prompt_len: int = 0) -> Unpadded:
        """The layout of a (B, L) mask (read on the host: build it outside a step's hot path).

        With `input_ids` and `prompt_len` (the width of the batch's left-padded prompts, before the responses), rows
        whose prompts are the same tokens (a GRPO group's completions) share them: their flat sequence is the
        prompt once, then each row's response, and each response attends to the prompt and to itself alone
        (`padding_free.tree_mask`). Causal attention never lets a prompt token see what follows it, so the prompt's
        states are those of every row's own prompt, and a response's log-probs, values and gradients equal those
        of its own row up to float summation order; the prompt runs once instead of once per row.
        """
        real = attention_mask.bool()
        if input_ids is not None and prompt_len > 0:
            shared = cls._sharing_prompts(real.cpu(), input_ids.cpu(), prompt_len)
            if shared is not None:
                return cls(*(x.to(real.device) for x in shared[:2]), *shared[2:])
        tokens = real.flatten().nonzero().squeeze(1)
        index = torch.full(real.shape, -1, dtype=torch.long, device=real.device)
        index.view(-1)[tokens] = torch.arange(len(tokens), device=real.device)
        return cls(tokens, index, tuple(real.sum(-1).tolist()))

    @staticmethod
    def _sharing_prompts(
        real: Tensor, input_ids: Tensor, prompt_len: int
    ) -> tuple[Tensor, Tensor, tuple[int, ...], tuple[tuple[int, ...], ...]] | None:
        """(tokens, index, lengths, spans) of the rows grouped by prompt, in the order of each prompt's first row;
        None when no two rows share a prompt. Each flat sequence: the first row's prompt tokens, then every row's
        response tokens in row order."""
        B, L = real.shape
        P = prompt_len
        group, first = prompt_groups(input_ids[:, :P], real[:, :P])
        G = len(first)
        if G == B:
            return None
        is_first = first[group] == torch.arange(B)  # (B,)
        take = real.clone()
        take[:, :P] &= is_first[:, None]  # the prompt once, from each group's first row
        b, c = take.nonzero(as_tuple=True)  # row-major
        response = (c >= P).long()
        order = torch.argsort(((group[b] * 2 + response) * B + b) * L + c)  # by group, prompt first, then rows
        tokens = (b * L + c)[order]
        index = torch.full((B * L,), -1, dtype=torch.long)
        index[tokens] = torch.arange(len(tokens))
        index = index.view(B, L)
        index[:, :P] = torch.where(real[:, :P], index[first[group], :P], -1)  # every row's prompt: the one prompt
        trunk = real[first, :P].sum(-1).tolist()  # (G,)
        responses = real[:, P:].sum(-1).tolist()  # (B,)
        members: list[list[int]] = [[] for _ in range(G)]
        for row, g in enumerate(group.tolist()):
            members[g].append(responses[row])
        spans = tuple((t, *m) for t, m in zip(trunk, members, strict=True))
        return tokens, index, tuple(sum(span) for span in spans), spans

    def kwargs(self, input_ids: Tensor, model: nn.Module) -> dict[str, Any]:
        """Keyword arguments of `model`'s flat forward of `input_ids` (B, L): `input_ids` (1, T) with
        `padding_free.flat_inputs` (`tree_inputs` where rows share prompts); T = N, or the next multiple of 16 where
        the model's matmuls run in half precision on the CPU (`padding_free.row_multiple`), the row then ending
        with a filler."""
        round_to = padding_free.row_multiple(model, input_ids.device)
        if round_to not in self._inputs:  # built once per batch and precision, from host-side lengths (no sync)
            if self.spans is None:
                inputs = padding_free.flat_inputs(self.lengths, round_to)
            else:
                inputs = padding_free.tree_inputs(self.spans, round_to)
            self._inputs[round_to] = {k: v.to(input_ids.device) for k, v in inputs.items()}
        inputs = self._inputs[round_to]
        ids = input_ids.flatten()[self.tokens]  # (N,)
        filler = inputs["position_ids"].shape[1] - ids.shape[0]
        if filler:
            ids = torch.cat([ids, ids.new_zeros(filler)])
        return {"input_ids": ids[None], **inputs, "use_cache": False}  # (1, T)


class TokenOutputs(NamedTuple):
    logprobs: Tensor  # (B, W) log-prob of each scored token
    entropy: Tensor | None  # (B, W) entropy of each prediction, when asked for
    hidden: Tensor | None  # (B, W, H) last hidden state (after the final norm) at each predicting position


def causal_lm_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    response_len: int | None = None,
    with_entropy: bool = False,
    temperature: float = 1.0,
    flat: Unpadded | None = None,
    hidden: bool = False,
) -> TokenOutputs:
    """Log-prob of each token given the ones before it; optionally the entropy of each prediction and the last
    hidden state at the predicting position (a value head's input).

    Aligned with `input_ids[:, 1:]`, W = L-1; or, when `response_len=T` is given, only the last T tokens (W = T):
    the response of a [left-padded prompt | response] rollout. Only the predicting positions go through the LM
    head (`logits_to_keep`), most of the vocabulary cost saved. `temperature` divides the logits, matching the
    sampling distribution of generation.

    `flat`: the batch's padding-free layout, used when the model can (see the module docstring). Then only the
    attended predicting positions go through the LM head, the log-softmax and the entropy, and every output is
    0 at the others.
    """
    width = input_ids.shape[1] - 1 if response_len is None else response_len
    labels = input_ids[:, -width:]  # (B, W): the logits at position i score token i+1
    keep = None
    if flat is not None and padding_free.enabled(model):
        positions = flat.index[:, -(width + 1) : -1]  # (B, W): flat index of the predicting positions, -1 on pads
        keep = positions >= 0
        rows = positions[keep]  # (N,)
        out = model(**flat.kwargs(input_ids, model), logits_to_keep=rows, output_hidden_states=hidden)
        logits, targets = out.logits, labels[keep][None]  # (1, N, V), (1, N)
        last_hidden = out.hidden_states[-1][:, rows] if hidden else None  # (1, N, H)
    else:
        position_ids = position_ids_from_mask(attention_mask)
        kwargs = {"attention_mask": attention_mask, "position_ids": position_ids, "use_cache": False}
        out = model(input_ids=input_ids, logits_to_keep=width + 1, output_hidden_states=hidden, **kwargs)
        logits, targets = out.logits[:, :-1], labels  # (B, W, V), (B, W)
        last_hidden = out.hidden_states[-1][:, -(width + 1) : -1] if hidden else None
    if temperature != 1.0:
        logits = logits / temperature
    outputs = TokenOutputs(
        token_logprobs(logits, targets), entropy_from_logits(logits) if with_entropy else None, last_hidden
    )
    if keep is None:
        return outputs
    return TokenOutputs(*(None if x is None else _padded(x[0], keep) for x in outputs))


def _padded(x: Tensor, keep: Tensor) -> Tensor:
    """Rows of `x` (N, ...) put at the True positions of `keep` (B, W), in row-major order; 0 elsewhere."""
    out = x.new_zeros(*keep.shape, *x.shape[1:])
    out[keep] = x
    return out


def mixes_by_attention_alone(model: nn.Module) -> bool:
    """Whether attention is the model's only way of passing information along the sequence, so that an attention
    mask (a 4-D one that keeps [prompt | chosen | rejected] apart) or a KV cache (a prompt's, continued by its
    responses) says all of who sees whom. Not so where `transformers`' cache gives some layer a recurrent state
    (`LinearAttentionCacheLayerMixin`: state-space, convolution and linear-attention layers of Mamba, Qwen3-Next,
    Qwen3.5, Jamba, LFM2 and others): their state runs through masked positions, and updating it in place when
    a response continues from a prompt's cache broke the backward pass."""
    from transformers import DynamicCache
    from transformers.cache_utils import LinearAttentionCacheLayerMixin

    config = getattr(base_model(model), "config", None)
    if config is None:
        return True
    cache = DynamicCache(config=config.get_text_config(decoder=True))
    return not any(isinstance(layer, LinearAttentionCacheLayerMixin) for layer in cache.layers)


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The transformer body and the scalar head of an `AutoModelForSequenceClassification` (or peft wrapper)."""
    base = base_model(model)
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
        scores = head(backbone(**flat.kwargs(input_ids, model)).last_hidden_state).squeeze(-1).float()  # (1, T)
        return torch.where(flat.index >= 0, scores[0, flat.index.clamp(min=0)], 0.0)  # (B, L)
    hidden = backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).last_hidden_state  # (B, L, H)
    return head(hidden).squeeze(-1).float()  # (B, L)


def score_index(input_ids: Tensor, attention_mask: Tensor, pad_token_id: int | None) -> Tensor:
    """Where a sequence-classification model reads each row's score, (B,): the rightmost attended token whose id
    is not the pad id, whatever the padding side. That is `transformers`' own pooling (the rightmost non-pad
    token), so a reward model scores in plain `transformers`, TRL or a pipeline what it scored here; when pad ==
    eos, a row ending with EOS is read at the token before it, as there. A row of pad ids only: its last token."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    real = attention_mask.bool()
    if pad_token_id is not None:
        scored = real & (input_ids != pad_token_id)
        real = torch.where(scored.any(-1, keepdim=True), scored, real)
    return (positions * real.long()).argmax(-1)


def pad_token_id(model: nn.Module) -> int | None:
    """The pad id a sequence-classification model pools by (its config's, as `transformers` reads it)."""
    base = base_model(model)
    config = getattr(base, "config", None)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    return getattr(text, "pad_token_id", None)


def sequence_scores(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, *, flat: Unpadded | None = None
) -> Tensor:
    """A reward model's score of each sequence, (B,), read where `transformers` reads it (`score_index`)."""
    scores = token_scores(model, input_ids, attention_mask, flat=flat)  # (B, L)
    index = score_index(input_ids, attention_mask, pad_token_id(model))
    return scores.gather(1, index[:, None]).squeeze(1)
