"""Reward shaping for PPO: the sequence score lands on the last response token, a KL penalty on every token.

    r_t = -beta * kl_t                      for every response token t < last
    r_last = -beta * kl_last + s'            s' = the shaped sequence score
    kl_t = kl_penalty(logprobs_t, ref_logprobs_t, kind)       (k1, k2 or k3; rlhf.losses.kl)

(Ziegler et al. 2019, Sec. 2.2; Ouyang et al. 2022, eq. 2). The sequence score is shaped before it lands:

    s' = clip(normalise(s - eos_penalty * [no EOS] - length_penalty * length), -clip, clip)

where `normalise` whitens scores over the batch when asked. DAPO's soft overlong punishment
(`overlong_penalty`) is one more term of the score. Only torch and the math core are imported.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf.losses.kl import kl_penalty
from rlhf.losses.reduce import SumOver, masked_moments


def shape_scores(
    scores: Tensor,
    ended_with_eos: Tensor,
    lengths: Tensor,
    *,
    missing_eos_penalty: float = 0.0,
    length_penalty: float = 0.0,
    normalize: bool = False,
    clip: float | None = None,
    eps: float = 1e-8,
    sum_over: SumOver | None = None,
) -> Tensor:
    """Sequence scores (B,) after the EOS and length penalties, optional batch whitening, optional clipping.

    normalize: s <- (s - mean(s)) / (std(s) + eps)    over the batch (the global one with `sum_over`)
    """
    shaped = scores.float() - missing_eos_penalty * (~ended_with_eos).float() - length_penalty * lengths.float()
    if normalize and shaped.numel() > 1:
        mean, var = masked_moments(shaped, torch.ones_like(shaped), sum_over=sum_over)
        shaped = (shaped - mean) / (var.sqrt() + eps)
    if clip is not None:
        shaped = shaped.clamp(-clip, clip)
    return shaped


def masked_kl(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, *, kind: str = "k1") -> Tensor:
    """Per-token KL estimate (B, T) of `kind` (rlhf.losses.kl), 0 where `mask` is 0 (an inf at padding stays out)."""
    kl = kl_penalty(logprobs.float(), ref_logprobs.float(), kind=kind)
    return torch.where(mask.bool(), kl, torch.zeros_like(kl))


def score_at_last_token(scores: Tensor, mask: Tensor) -> Tensor:
    """(B, T) zeros with each row's score (B,) at its last valid token; a row with no valid token gets none.
    `mask` is a prefix of ones per row."""
    lengths = mask.sum(-1).long()  # (B,)
    has_token = (lengths > 0).float()
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    return out.scatter_add(1, (lengths - 1).clamp(min=0)[:, None], (scores.float() * has_token)[:, None])


def token_rewards(
    scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, *, kl_coef: float, kl_kind: str = "k1"
) -> tuple[Tensor, Tensor]:
    """Per-token rewards (B, T) = -kl_coef * kl_t + the score at the last valid token, and the per-token KL
    (B, T); both zero where `mask` is 0 (a prefix of ones per row). A row with no valid token gets no reward."""
    kl = masked_kl(logprobs, ref_logprobs, mask, kind=kl_kind)
    return score_at_last_token(scores, mask) - kl_coef * kl, kl


def overlong_penalty(lengths: Tensor, max_length: int, buffer: int) -> Tensor:
    """DAPO's soft overlong punishment of each response length L (B,), with L_max = max_length, L_c = buffer:

        0                              L <= L_max - L_c
        ((L_max - L_c) - L) / L_c      L_max - L_c < L <= L_max         (from 0 down to -1)
        -1                             L > L_max

    Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", eq. 13: responses that run
    into the generation budget lose reward gradually instead of all at once. Added to the score (times a factor).
    """
    if not 0 < buffer <= max_length:
        raise ValueError(f"buffer must be in [1, max_length {max_length}], got {buffer}")
    lengths = lengths.float()
    start = max_length - buffer
    ramp = (start - lengths) / buffer
    return torch.where(lengths <= start, torch.zeros_like(lengths), torch.where(lengths <= max_length, ramp, -1.0))
