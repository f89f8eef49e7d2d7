"""rlhf.advantages: GAE, group-normalised (GRPO / Dr. GRPO) and leave-one-out (RLOO) advantages."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf.advantages import batch_normalized_advantages, gae, group_advantages, rloo_advantages
from rlhf.rollout.shaping import shape_scores

from _shards import run_sharded  # isort: skip

F64 = torch.float64


def _gae_loop(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    """Textbook GAE on one trajectory (all of it valid), written as a plain sum, not a recursion:
    A_t = sum_l (gamma lam)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t, V_T = 0."""
    n = len(rewards)
    nxt = values[1:] + [0.0]
    deltas = [rewards[t] + gamma * nxt[t] - values[t] for t in range(n)]
    return [sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t)) for t in range(n)]


def _gae_reference(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Per row: keep the valid positions (in order), run the loop on them, scatter back, 0 elsewhere."""
    adv = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        idx = [t for t in range(rewards.shape[1]) if mask[b, t] != 0]
        a = _gae_loop([rewards[b, t].item() for t in idx], [values[b, t].item() for t in idx], gamma, lam)
        for t, v in zip(idx, a, strict=True):
            adv[b, t] = v
    return adv, torch.where(mask != 0, adv + values, torch.zeros_like(adv))


def test_gae_by_hand() -> None:
    """r = [0, 0, 1], V = [0.5, 0.6, 0.7], gamma 1, lam 0.5:
    delta = [0 + 0.6 - 0.5, 0 + 0.7 - 0.6, 1 + 0 - 0.7] = [0.1, 0.1, 0.3]
    A_2 = 0.3; A_1 = 0.1 + 0.5 * 0.3 = 0.25; A_0 = 0.1 + 0.5 * 0.25 = 0.225
    returns = A + V = [0.725, 0.85, 1.0]; a padded 4th position gives 0 and 0."""
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0]], dtype=F64)
    values = torch.tensor([[0.5, 0.6, 0.7, 9.0]], dtype=F64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=F64)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.225, 0.25, 0.3, 0.0]], dtype=F64))
    torch.testing.assert_close(ret, torch.tensor([[0.725, 0.85, 1.0, 0.0]], dtype=F64))


def test_gae_matches_loop_variable_lengths() -> None:
    """Random rewards and values, right-padded rows of lengths 0..9, several (gamma, lam): equal to the loop."""
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([9, 1, 0, 5, 7, 3, 9, 2])
    mask = (torch.arange(9)[None, :] < lengths[:, None]).to(F64)
    rewards = torch.randn(8, 9, dtype=F64, generator=gen)
    values = torch.randn(8, 9, dtype=F64, generator=gen)
    for gamma, lam in [(1.0, 0.95), (0.99, 0.9), (0.5, 1.0), (1.0, 0.0)]:
        adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
        ref_adv, ref_ret = _gae_reference(rewards, values, mask, gamma, lam)
        torch.testing.assert_close(adv, ref_adv)
        torch.testing.assert_close(ret, ref_ret)
        assert torch.all(adv[mask == 0] == 0) and torch.all(ret[mask == 0] == 0)


def test_gae_mask_with_holes_skips_masked_tokens() -> None:
    """A non-prefix mask (e.g. tool output inside a response): the valid tokens form the trajectory, masked
    ones are skipped. Equal to the loop run on the valid tokens only."""
    gen = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1, 0, 1, 1, 0, 1], [0, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=F64)
    rewards = torch.randn(3, 6, dtype=F64, generator=gen)
    values = torch.randn(3, 6, dtype=F64, generator=gen)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    ref_adv, ref_ret = _gae_reference(rewards, values, mask, 0.9, 0.8)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(ret, ref_ret)


def test_gae_lam_zero_is_one_step_td() -> None:
    """lam = 0: A_t = r_t + gamma V_{t+1} - V_t, with V after the last token 0."""
    torch.manual_seed(2)
    rewards, values = torch.randn(4, 6, dtype=F64), torch.randn(4, 6, dtype=F64)
    mask = torch.ones(4, 6, dtype=F64)
    adv, _ = gae(rewards, values, mask, gamma=0.9, lam=0.0)
    next_values = torch.cat([values[:, 1:], torch.zeros(4, 1, dtype=F64)], dim=1)
    torch.testing.assert_close(adv, rewards + 0.9 * next_values - values)


def test_gae_gamma_lam_one_is_return_to_go_minus_value() -> None:
    """gamma = lam = 1: A_t = sum_{s >= t} r_s - V_t (values telescope), so returns = reward-to-go."""
    torch.manual_seed(3)
    rewards, values = torch.randn(4, 6, dtype=F64), torch.randn(4, 6, dtype=F64)
    mask = torch.ones(4, 6, dtype=F64)
    mask[1, 3:] = 0
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    rtg = torch.flip(torch.cumsum(torch.flip(rewards * mask, [1]), 1), [1]) * mask
    torch.testing.assert_close(adv, (rtg - values) * mask)
    torch.testing.assert_close(ret, rtg)


def test_gae_empty_rows_and_half_precision() -> None:
    """A row with no valid token gives zeros; bf16 inputs give float32 outputs close to float32 GAE."""
    torch.manual_seed(4)
    rewards, values = torch.randn(3, 50), torch.randn(3, 50)
    mask = torch.ones(3, 50)
    mask[1] = 0
    adv, ret = gae(rewards.bfloat16(), values.bfloat16(), mask, gamma=1.0, lam=0.95)
    ref_adv, _ = gae(rewards.bfloat16().float(), values.bfloat16().float(), mask, gamma=1.0, lam=0.95)
    assert adv.dtype == torch.float32 and ret.dtype == torch.float32
    torch.testing.assert_close(adv, ref_adv)
    assert adv[1].abs().sum().item() == 0.0 and ret[1].abs().sum().item() == 0.0


def test_group_advantages_by_hand() -> None:
    """Groups [1, 2, 3] and [4, 4, 4]: mean 2, unbiased std 1 -> [-1, 0, 1] / (1 + 1e-6);
    the constant group gives 0 (0 / (0 + eps)). Without scaling: [-1, 0, 1, 0, 0, 0]."""
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 4.0, 4.0], dtype=F64)
    torch.testing.assert_close(
        group_advantages(scores, 3), torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0], dtype=F64) / (1 + 1e-6)
    )
    torch.testing.assert_close(
        group_advantages(scores, 3, scale=False), torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0], dtype=F64)
    )


def test_group_advantages_group_of_one() -> None:
    """group_size 1: every advantage is 0 (no NaN from an n - 1 = 0 denominator)."""
    out = group_advantages(torch.tensor([1.0, 5.0]), 1)
    assert out.tolist() == [0.0, 0.0]


scores_strategy = st.integers(min_value=1, max_value=4).flatmap(
    lambda groups: st.integers(min_value=2, max_value=6).flatmap(
        lambda k: st.tuples(
            st.just(k),
            st.lists(
                st.floats(min_value=-100, max_value=100, allow_nan=False), min_size=groups * k, max_size=groups * k
            ),
        )
    )
)


@settings(max_examples=60, deadline=None)
@given(scores_strategy)
def test_group_advantages_properties(case: tuple[int, list[float]]) -> None:
    """Per group: centered advantages sum to ~0; scaled ones are the centered ones / (std + eps), so their
    unbiased std is std / (std + eps) (1 up to eps for a non-constant group)."""
    k, values = case
    scores = torch.tensor(values, dtype=F64)
    centered = group_advantages(scores, k, scale=False).view(-1, k)
    assert torch.allclose(centered.sum(dim=1), torch.zeros(centered.shape[0], dtype=F64), atol=1e-9)
    scaled = group_advantages(scores, k).view(-1, k)
    std = scores.view(-1, k).std(dim=1)
    torch.testing.assert_close(scaled.std(dim=1), std / (std + 1e-6))


@settings(max_examples=80, deadline=None)
@given(
    st.floats(min_value=-100, max_value=100, allow_nan=False, width=32),
    st.integers(min_value=2, max_value=32),
    st.integers(min_value=1, max_value=3),
)
def test_equal_float32_scores_carry_no_signal(value: float, k: int, groups: int) -> None:
    """Scores that are all equal give exactly 0 from every normaliser, in float32 as the trainers call them: a
    one-ulp error in their mean, divided by the ~1e-8 std it makes, would be a +-0.1-0.9 advantage that only
    the order of the float sums decides (found with scores of -0.6 and -2.7)."""
    scores = torch.full((groups * k,), value, dtype=torch.float32)
    assert group_advantages(scores, k).abs().max().item() == 0.0
    assert rloo_advantages(scores, k).abs().max().item() == 0.0
    eos, lengths = torch.ones(groups * k, dtype=torch.bool), torch.zeros(groups * k)
    assert shape_scores(scores, eos, lengths, normalize=True).abs().max().item() == 0.0
    rewards = torch.zeros(groups * k, 5).index_fill_(1, torch.tensor([4]), value)
    assert batch_normalized_advantages(rewards, torch.ones(groups * k, 5)).abs().max().item() == 0.0


@settings(max_examples=60, deadline=None)
@given(scores_strategy)
def test_rloo_equals_loop(case: tuple[int, list[float]]) -> None:
    """A_i = r_i - mean of the other k - 1 scores of its group, by a plain loop."""
    k, values = case
    expected = []
    for g in range(len(values) // k):
        group = values[g * k : (g + 1) * k]
        for i, r in enumerate(group):
            others = group[:i] + group[i + 1 :]
            expected.append(r - math.fsum(others) / len(others))
    out = rloo_advantages(torch.tensor(values, dtype=F64), k)
    torch.testing.assert_close(out, torch.tensor(expected, dtype=F64))


def test_rloo_by_hand() -> None:
    """[1, 2, 3]: 1 - 2.5 = -1.5, 2 - 2 = 0, 3 - 1.5 = 1.5 (= 3/2 times the centered scores)."""
    torch.testing.assert_close(rloo_advantages(torch.tensor([1.0, 2.0, 3.0]), 3), torch.tensor([-1.5, 0.0, 1.5]))


def test_validation() -> None:
    with pytest.raises(ValueError, match="divide"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 2), 2)
    with pytest.raises(ValueError, match="group_size >= 2"):
        rloo_advantages(torch.zeros(4), 1)


def test_reinforce_pp_and_score_normalising_are_global_over_processes():
    """REINFORCE++'s batch normalisation and `reward.normalize` over two shards (as two processes) with
    `sum_over` equal the whole batch's, so N processes train on the advantages one process would."""
    g = torch.Generator().manual_seed(1)
    rewards = torch.randn(8, 6, generator=g)
    lengths = torch.randint(1, 7, (8,), generator=g)
    mask = (torch.arange(6)[None] < lengths[:, None]).float()
    together = batch_normalized_advantages(rewards, mask)
    halves = [(rewards[:4], mask[:4]), (rewards[4:], mask[4:])]
    torch.testing.assert_close(torch.cat(run_sharded(batch_normalized_advantages, halves)), together, atol=1e-6, rtol=0)

    scores, ended = torch.randn(8, generator=g), lengths < 6
    whole = shape_scores(scores, ended, lengths, normalize=True)
    torch.testing.assert_close(whole, (scores - scores.mean()) / (scores.std() + 1e-8), atol=1e-6, rtol=0)

    def shaped(s, e, n, *, sum_over):
        return shape_scores(s, e, n, normalize=True, sum_over=sum_over)

    parts = [(scores[:4], ended[:4], lengths[:4]), (scores[4:], ended[4:], lengths[4:])]
    torch.testing.assert_close(torch.cat(run_sharded(shaped, parts)), whole, atol=1e-6, rtol=0)
