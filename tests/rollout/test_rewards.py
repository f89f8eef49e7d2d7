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


def test_function_reward_takes_array_likes_of_real_numbers():
    """numpy arrays, numpy floats, ints, bools and tensors are numbers; they come back as float32 in order."""
    import numpy as np

    for raw in (np.array([0.5, 2.0]), [np.float32(0.5), np.float64(2)], (0.5, 2), torch.tensor([0.5, 2.0])):
        got = FunctionReward(lambda p, c, raw=raw: raw).score(["a", "b"], ["x", "y"], [{}, {}])
        assert got.dtype == torch.float32 and got.tolist() == [0.5, 2.0]
    assert FunctionReward(lambda p, c: [True, False]).score(["a", "b"], ["x", "y"], [{}, {}]).tolist() == [1.0, 0.0]


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (lambda p, c: ["1.0", "2.0"], "expected real numbers"),
        (lambda p, c: [[1.0, 2.0]], r"returned 2 scores \(shape \(1, 2\)\) for 2"),
        (lambda p, c: [1e39, 0.0], r"score 0 is 1e\+39, expected a finite number \(in float32\)"),
        (lambda p, c: [1.0, math.inf], "score 1 is inf"),
        (lambda p, c: 1 / 0, r"reward f raised ZeroDivisionError: division by zero \(at .*test_rewards.py:\d+\)"),
    ],
)
def test_a_bad_reward_function_is_one_error_naming_it(fn, message):
    with pytest.raises(RewardError, match=message):
        FunctionReward(fn, name="f").score(["a", "b"], ["x", "y"], [{}, {}])


def test_reward_function_from_a_file_path_or_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def length(prompts, completions, **_):\n    return [len(c) for c in completions]\n"
    )
    by_path = load_reward_function(f"{tmp_path / 'my_rewards.py'}:length")
    assert by_path(["p"], ["abc"]) == [3]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])
    assert load_reward_function("my_rewards:length")(["p"], ["ab"]) == [2]
    with pytest.raises(RewardError, match="no such file"):
        load_reward_function(f"{tmp_path / 'missing.py'}:length")


def test_ensemble_weighted_mean_minus_std_hand_computed():
    """Members score (1, 3) on one response, weights (1, 3): mean = (1 + 9)/4 = 2.5;
    var = (1*(1-2.5)^2 + 3*(3-2.5)^2)/4 = (2.25 + 0.75)/4 = 0.75; score = 2.5 - 2*sqrt(0.75)."""
    ens = EnsembleReward([_Const([1.0]), _Const([3.0])], weights=[1.0, 3.0], uncertainty_penalty=2.0)
    assert ens.score(["p"], ["c"], [{}]).item() == pytest.approx(2.5 - 2 * math.sqrt(0.75))
    assert EnsembleReward([_Const([1.0]), _Const([3.0])]).score(["p"], ["c"], [{}]).item() == 2.0


def test_reward_model_with_other_tokenizer_scores_text_as_when_called_directly(tiny_dirs):
    """A gpt2-family RM scores responses decoded from llama-family token ids exactly as it scores the same text
    tokenized directly by its own tokenizer (one row at a time, no padding); a prompt three rows share (a GRPO
    group, run once in the padding-free pass) changes no row's score."""
    from transformers import AutoTokenizer

    from rlhf.config import DataConfig, ModelConfig
    from rlhf.models import padding_free
    from rlhf.models.forward import sequence_scores
    from rlhf.models.loading import load_scalar_model
    from rlhf.rollout.rewards import RewardModelReward

    policy_tok = AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    rm_tok = AutoTokenizer.from_pretrained(tiny_dirs["gpt2"])
    rm = load_scalar_model(ModelConfig(path=tiny_dirs["gpt2"]), trainable=False)
    cab, hgfed = [{"role": "user", "content": "sort: cab"}], [{"role": "user", "content": "sort: hgfed"}]
    prompts, texts = [cab, hgfed, cab, cab], ["abc", "defgh and more", "cab, I think", "a"]
    decoded = [policy_tok.decode(policy_tok(t, add_special_tokens=False).input_ids) for t in texts]
    padding_free.enable(rm)
    got = RewardModelReward(rm, rm_tok, DataConfig(), batch_size=4).score(prompts, decoded, [{}] * 4)
    for i, (p, t) in enumerate(zip(prompts, texts, strict=True)):
        full = rm_tok.apply_chat_template(p + [{"role": "assistant", "content": t}], tokenize=False)
        ids = rm_tok(full, add_special_tokens=False).input_ids
        with torch.no_grad():
            want = sequence_scores(rm, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
        assert got[i].item() == pytest.approx(want.item(), abs=1e-5)


@pytest.mark.parametrize(("reward_rows", "want"), [(None, 8), (3, 3)])
def test_reward_model_rows_per_pass_default_to_the_rollouts(tiny_dirs, reward_rows, want):
    from rlhf.config import DataConfig
    from rlhf.rollout.config import RewardConfig, load_reward_models

    cfg = RewardConfig(model=tiny_dirs["llama"], batch_size=reward_rows)
    cfg.validate()
    (source,) = load_reward_models(cfg, DataConfig(), forward_batch_size=8)
    assert source.batch_size == want


@pytest.mark.parametrize("chat", [True, False])
def test_reward_ids_of_a_group_are_each_rows_own_tokenization(tiny_dirs, chat):
    """Rows sharing a prompt (a GRPO group, interleaved with another) get the ids `tokenize_sft` gives each
    (prompt, completion) row alone, truncation of a long prompt included."""
    from transformers import AutoTokenizer

    from rlhf.config import DataConfig
    from rlhf.data.formats import SFTRecord
    from rlhf.data.tokenize import tokenize_sft
    from rlhf.rollout.rewards import reward_input_ids

    tok = AutoTokenizer.from_pretrained(tiny_dirs["gpt2"])
    cfg = DataConfig(max_prompt_length=12, max_length=40)
    texts = ["sort: cab", "sort: hgfed " * 6]
    prompts = [[{"role": "user", "content": t}] for t in texts] if chat else texts
    rows = [0, 1, 0, 0, 1]
    completions = ["abc", "defgh", "a b c and more", "", "x"]
    got = reward_input_ids([prompts[r] for r in rows], completions, tok, cfg)
    for r, c, (prompt_ids, response_ids) in zip(rows, completions, got, strict=True):
        response = [{"role": "assistant", "content": c}] if chat else c
        want = tokenize_sft(SFTRecord(prompt=prompts[r], completion=response), tok, cfg, whole_turns=True)
        assert prompt_ids + response_ids == want["input_ids"] and prompt_ids == got[rows.index(r)][0]
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        reward_input_ids(prompts, ["abc"], tok, cfg)
