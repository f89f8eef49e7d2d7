"""Advantage estimators: GAE (PPO), group-normalised (GRPO, Dr. GRPO), leave-one-out (RLOO), batch-normalised
returns (REINFORCE++).

Pure tensor math (imports only torch and the math core). Half-precision inputs are computed and returned in
float32. Group estimators take the scores of N = groups * group_size completions laid out group by group:
`scores.view(-1, group_size)` row g holds the completions of prompt g.
"""

from __future__ import annotations

import torch

from rlhf.losses.reduce import SumOver, masked_whiten, upcast, wide_dtype


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the valid tokens of each row, and the value targets.

        delta_t = r_t + gamma V_{t+1} - V_t
        A_t     = sum_{l >= 0} (gamma lam)^l delta_{t+l}  =  delta_t + gamma lam A_{t+1}
        returns = A + V

    Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation",
    eq. 16. The value after the last valid token of a row is 0 (the response ends the episode). lam = 0
    gives the one-step TD error; gamma = lam = 1 gives the return-to-go minus V_t.

    Shapes: rewards, values, mask (B, T); responses are right-padded (each row's mask is a prefix of ones).
    Any 0/1 mask is accepted: the valid tokens of a row are treated as one trajectory and masked positions
    are skipped (their reward and value are ignored; t+1 means the next valid token). Returns
    (advantages, returns), each (B, T), 0 where mask == 0. A reverse loop over T, vectorised over B.
    Whitening of the advantages is a separate step (`rlhf.losses.reduce.masked_whiten`).
    """
    rewards, values = upcast(rewards), upcast(values)
    keep = (mask != 0).expand_as(rewards)
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros_like(rewards[:, 0])  # (B,) V of the next valid token, 0 past the end
    last_gae = torch.zeros_like(rewards[:, 0])  # (B,) A of the next valid token
    advantages_reversed = []
    for t in reversed(range(rewards.shape[1])):
        valid = keep[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        gae_t = delta + gamma * lam * last_gae
        advantages_reversed.append(torch.where(valid, gae_t, zero))
        last_gae = torch.where(valid, gae_t, last_gae)
        next_value = torch.where(valid, values[:, t], next_value)
    if not advantages_reversed:
        empty = torch.zeros_like(rewards)
        return empty, empty.clone()
    advantages = torch.stack(advantages_reversed[::-1], dim=1)  # (B, T)
    returns = torch.where(keep, advantages + values, zero)
    return advantages, returns


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D (N,), got shape {tuple(scores.shape)}")
    if group_size < 1 or scores.numel() % group_size != 0:
        raise ValueError(f"group_size {group_size} must be >= 1 and divide the number of scores {scores.numel()}")
    return scores.to(wide_dtype(scores.device)).reshape(-1, group_size)  # (groups, group_size), summed exactly


def group_advantages(scores: torch.Tensor, group_size: int, *, scale: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Group-relative advantages: each score minus its group's mean, optionally divided by the group's std.

        A_i = (r_i - mean_g) / (std_g + eps)    if scale      (GRPO)
        A_i =  r_i - mean_g                     otherwise     (Dr. GRPO)

    std_g is the unbiased (n - 1) estimate within the group (0 for a group of one). GRPO: Shao et al. 2024,
    "DeepSeekMath", Sec. 4.1.2 (outcome supervision); dropping the std: Liu et al. 2025, "Understanding
    R1-Zero-Like Training: A Critical Perspective" (Dr. GRPO). A group whose scores are all equal gets exactly 0
    (the group statistics are taken in `wide_dtype`: in float32 the mean of eight scores of -2.7 was one ulp
    off, and dividing by the resulting std gave +-0.19).

    Shapes: scores (N,), N = groups * group_size, contiguous groups. Returns (N,), one advantage per
    completion (broadcast over its tokens as (N, 1)).
    """
    grouped = _groups(scores, group_size)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        var = centered.square().sum(dim=1, keepdim=True) / max(group_size - 1, 1)
        centered = centered / (var.sqrt() + eps)
    return centered.reshape(-1).to(upcast(scores).dtype)


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out: each score minus the mean of the other scores of its group.

        A_i = r_i - (sum_{j != i} r_j) / (k - 1)  =  k / (k - 1) (r_i - mean_g),    k = group_size >= 2

    Kool, van Hoof & Welling 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!"; Ahmadian et al.
    2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback in LLMs".
    Shapes: scores (N,), contiguous groups; returns (N,).
    """
    if group_size < 2:
        raise ValueError(f"rloo needs group_size >= 2 (the baseline is the mean of the others), got {group_size}")
    grouped = _groups(scores, group_size)
    others_mean = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others_mean).reshape(-1).to(upcast(scores).dtype)


def batch_normalized_advantages(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    eps: float = 1e-8,
    sum_over: SumOver | None = None,
) -> torch.Tensor:
    """REINFORCE++: each token's return-to-go, normalised over every valid token of the batch.

        G_t = sum_{s >= t} gamma^(s - t) r_s          (over the row's valid tokens)
        A_t = (G_t - mean(G)) / sqrt(var(G) + eps)     mean and unbiased var over all valid tokens of the batch

    With per-token rewards r_t = -beta kl_t + [t = last] score (`rollout.shaping.token_rewards`) and gamma = 1,
    G_t = score - beta sum_{s >= t} kl_s. Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning
    Large Language Models", Sec. 3 (token-level KL penalty, global advantage normalisation): no critic and no
    group, so it works with one completion per prompt; the normalisation over the whole batch replaces the
    per-prompt baseline. Shapes: rewards, mask (B, T), right padded. Returns (B, T), 0 where mask == 0. Under
    data parallelism `sum_over` makes "the batch" the global one (`rlhf.losses.reduce`).
    """
    zeros = torch.zeros_like(upcast(rewards))
    returns, _ = gae(rewards, zeros, mask, gamma=gamma, lam=1.0)  # V = 0, lam = 1: the discounted return-to-go
    return masked_whiten(returns, mask, eps=eps, sum_over=sum_over)
