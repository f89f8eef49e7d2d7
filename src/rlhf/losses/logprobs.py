"""Log-probabilities of given tokens, and entropy, from logits, without a second full (B, T, V) tensor.

`torch.log_softmax(logits, -1).gather(...)` allocates another (B, T, V) tensor (in float32 if the logits
are upcast first): for a 150k-token vocabulary that is several GB for one micro-batch. Here the
normalisers are computed a few batch rows at a time, in chunks of at most `CHUNK_ELEMENTS` logits (but at
least one row), so the extra memory is bounded by one chunk. A small vocabulary fits the whole batch in one
chunk: one vectorised call instead of a Python loop. (When autograd records the graph it keeps each chunk's
float32 copy for the backward pass; the saving is in peak working memory and in no-grad passes such as
rollout scoring and the reference model.)

Half-precision logits are upcast to float32 per row; results are float32 for half inputs and keep the dtype
of float32 / float64 inputs.
"""

from __future__ import annotations

import torch

from rlhf.losses.reduce import upcast

CHUNK_ELEMENTS = 1 << 24
"""Logits per chunk (64 MiB in float32); a chunk is never smaller than one batch row."""


def _row_chunks(logits: torch.Tensor) -> list[slice]:
    rows_per_chunk = max(1, CHUNK_ELEMENTS // max(1, logits.shape[1] * logits.shape[2]))
    return [slice(s, s + rows_per_chunk) for s in range(0, logits.shape[0], rows_per_chunk)]


def _check_logits(logits: torch.Tensor) -> None:
    if logits.dim() != 3:
        raise ValueError(f"logits must be (B, T, V), got shape {tuple(logits.shape)}")


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] for each position.

        logp[b, t] = logits[b, t, labels[b, t]] - logsumexp_v logits[b, t, v]

    Shapes: logits (B, T, V), labels (B, T) integer, already aligned with the logits (the caller shifts:
    the logits at position t score labels[t]). Labels below 0 (ignore values such as -100) are read as
    token 0 so the gather stays in range; the caller masks those positions. Returns (B, T), not reduced.
    """
    _check_logits(logits)
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels {tuple(labels.shape)} must match logits (B, T) = {tuple(logits.shape[:2])}")
    index = labels.clamp(min=0).unsqueeze(-1)  # (B, T, 1)
    rows = []
    for chunk in _row_chunks(logits):
        part = upcast(logits[chunk])  # (b, T, V), float32 copy only for half inputs
        label_logit = part.gather(-1, index[chunk]).squeeze(-1)  # (b, T)
        rows.append(label_logit - torch.logsumexp(part, dim=-1))
    if not rows:
        return upcast(logits.new_zeros(logits.shape[:2]))
    return torch.cat(rows)  # (B, T)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position.

        H[b, t] = -sum_v p_v log p_v,   p = softmax(logits[b, t]),  log p = logits - logsumexp(logits)

    Stable for any finite logits (log-softmax through logsumexp) and for -inf logits (masked vocabulary
    entries): those have p = 0 and contribute 0, with a zero (not NaN) gradient. A row whose logits are all
    -inf has no distribution and gives NaN. Shapes: (B, T, V) in, (B, T) out; computed in chunks of rows
    over B (see the module docstring). Used as the entropy bonus and the `policy/entropy` metric.
    """
    _check_logits(logits)
    rows = []
    for chunk in _row_chunks(logits):
        logp = torch.log_softmax(upcast(logits[chunk]), dim=-1)  # (b, T, V)
        # -inf logits give logp = -inf and p = 0; 0 * -inf is NaN, so zero those log-probs first
        # (masked_fill also blocks the gradient there, which would be 0 * inf otherwise).
        logp_finite = logp.masked_fill(torch.isneginf(logp), 0.0)
        rows.append(-(logp.exp() * logp_finite).sum(dim=-1))  # (b, T)
    if not rows:
        return upcast(logits.new_zeros(logits.shape[:2]))
    return torch.cat(rows)  # (B, T)
