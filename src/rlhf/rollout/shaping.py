"""Reward shaping for PPO: the sequence score lands on the last response token, a KL penalty on every token.

    r_t = -beta * kl_t                      for every response token t < last
    r_last = -beta * kl_last + s'            s' = the shaped sequence score
    kl_t = kl_penalty(logprobs_t, ref_logprobs_t, kind)       (k1, k2 or k3; rlhf.losses.kl)

(Ziegler et al. 2019, Sec. 2.2; Ouyang et al. 2022, eq. 2). The sequence score is shaped before it lands:

    s' = clip(normalise(s - eos_penalty * [no EOS] - length_penalty * length), -clip, clip)

where `normalise` whitens scores over the batch when asked. Only torch and the math core are imported.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf.losses.kl import kl_penalty


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
) -> Tensor:
    """Sequence scores (B,) after the EOS and length penalties, optional batch whitening, optional clipping."""
    shaped = scores.float() - missing_eos_penalty * (~ended_with_eos).float() - length_penalty * lengths.float()
    if normalize and shaped.numel() > 1:
        shaped = (shaped - shaped.mean()) / (shaped.std() + eps)
    if clip is not None:
        shaped = shaped.clamp(-clip, clip)
    return shaped


def token_rewards(
    scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, *, kl_coef: float, kl_kind: str = "k1"
) -> tuple[Tensor, Tensor]:
    """Per-token rewards (B, T) and the per-token KL (B, T), both zero where `mask` is 0.

    `mask` is a prefix of ones per row; the score is added at the row's last valid token. A row with no valid
    token gets no reward at all.
    """
    kl = kl_penalty(logprobs.float(), ref_logprobs.float(), kind=kl_kind)  # (B, T)
    kl = torch.where(mask.bool(), kl, torch.zeros_like(kl))  # an inf at padding must not become NaN
    rewards = -kl_coef * kl
    lengths = mask.sum(-1).long()  # (B,)
    last = (lengths - 1).clamp(min=0)  # (B,)
    has_token = (lengths > 0).to(rewards.dtype)
    rewards = rewards.scatter_add(1, last[:, None], (scores.to(rewards.dtype) * has_token)[:, None])
    return rewards, kl
