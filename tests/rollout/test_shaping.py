"""Reward shaping on hand-built rollouts."""

from __future__ import annotations

import pytest
import torch

from rlhf.rollout.shaping import shape_scores, token_rewards


def test_score_lands_on_last_token_of_each_length():
    """Rows of length 3, 1 and 0 (T = 4); k1 KL d = logp - ref = 0.5 everywhere; beta = 0.1.
    Row 0: [-0.05, -0.05, -0.05 + 2, 0]; row 1: [-0.05 + 7, 0, 0, 0]; row 2: all zero (no token)."""
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    logp = torch.full((3, 4), -1.0)
    ref = torch.full((3, 4), -1.5)
    rewards, kl = token_rewards(torch.tensor([2.0, 7.0, 5.0]), logp, ref, mask, kl_coef=0.1)
    want = torch.tensor([[-0.05, -0.05, 1.95, 0.0], [6.95, 0, 0, 0], [0, 0, 0, 0]])
    torch.testing.assert_close(rewards, want)
    torch.testing.assert_close(kl, 0.5 * mask)


def test_k3_kl_is_nonnegative_in_shaped_rewards():
    mask = torch.ones(2, 3)
    logp, ref = torch.randn(2, 3, generator=torch.Generator().manual_seed(0)), torch.zeros(2, 3)
    _, kl = token_rewards(torch.zeros(2), logp, ref, mask, kl_coef=1.0, kl_kind="k3")
    assert (kl >= 0).all()


def test_eos_and_length_penalties_then_clip():
    """Scores (1, 1): the second row lacks EOS (penalty 2) and is 2 tokens longer (0.5 per token)."""
    scores = torch.tensor([1.0, 1.0])
    ended = torch.tensor([True, False])
    lengths = torch.tensor([3, 5])
    got = shape_scores(scores, ended, lengths, missing_eos_penalty=2.0, length_penalty=0.5)
    assert got.tolist() == pytest.approx([1.0 - 1.5, 1.0 - 2.0 - 2.5])
    clipped = shape_scores(scores, ended, lengths, missing_eos_penalty=2.0, length_penalty=0.5, clip=1.0)
    assert clipped.tolist() == pytest.approx([-0.5, -1.0])


def test_normalised_scores_have_zero_mean_unit_std():
    got = shape_scores(
        torch.tensor([1.0, 2.0, 3.0, 6.0]), torch.ones(4, dtype=torch.bool), torch.ones(4), normalize=True
    )
    assert got.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert got.std().item() == pytest.approx(1.0, abs=1e-6)
