"""Reward sources: Python functions, reward models with their own tokenizer, ensembles."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.rollout.rewards import EnsembleReward, FunctionReward, RewardError, load_reward_function
from rlhf.tasks.sorting import gold_score


class _Const:
    def __init__(self, values):
        self.values = torch.tensor(values)

    def score(self, prompts, completions, extras):
        return self.values


def test_function_reward_passes_extra_columns():
    fn = load_reward_function("rlhf.tasks.sorting:gold_reward")
    got = FunctionReward(fn).score(["p1", "p2"], ["abc", "cba"], [{"letters": "cab"}, {"letters": "abc"}])
    assert got.tolist() == [1.0, pytest.approx(1 / 3)]
    assert gold_score("cab", "abcd") == 0.75  # three right positions out of the longer length 4


@pytest.mark.parametrize("spec", ["nocolon", "no_such_module_xyz:f", "rlhf.tasks.sorting:nope"])
def test_bad_function_spec_is_a_user_error(spec):
    with pytest.raises(RewardError, match="reward function"):
        load_reward_function(spec)


def test_function_reward_rejects_wrong_length_and_nan():
    with pytest.raises(RewardError, match="returned 1 scores for 2"):
        FunctionReward(lambda p, c: [1.0]).score(["a", "b"], ["x", "y"], [{}, {}])
    with pytest.raises(RewardError, match="score 1 is nan"):
        FunctionReward(lambda p, c: [1.0, math.nan]).score(["a", "b"], ["x", "y"], [{}, {}])


def test_ensemble_weighted_mean_minus_std_hand_computed():
    """Members score (1, 3) on one response, weights (1, 3): mean = (1 + 9)/4 = 2.5;
    var = (1*(1-2.5)^2 + 3*(3-2.5)^2)/4 = (2.25 + 0.75)/4 = 0.75; score = 2.5 - 2*sqrt(0.75)."""
    ens = EnsembleReward([_Const([1.0]), _Const([3.0])], weights=[1.0, 3.0], uncertainty_penalty=2.0)
    assert ens.score(["p"], ["c"], [{}]).item() == pytest.approx(2.5 - 2 * math.sqrt(0.75))
    assert EnsembleReward([_Const([1.0]), _Const([3.0])]).score(["p"], ["c"], [{}]).item() == 2.0
