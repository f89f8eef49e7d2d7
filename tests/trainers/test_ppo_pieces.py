"""PPO piece by piece on hand-built tensors and tiny models: reward placement, penalties, the old log-probs, the
critic's positions, a reward model with another tokenizer, micro-batch exactness, config checks."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from transformers import AutoTokenizer

from rlhf.config import ConfigError, DataConfig, ModelConfig, TrainConfig, load_config
from rlhf.data import records_from_rows, tokenize_records
from rlhf.errors import UserError
from rlhf.models import padding_free
from rlhf.models.forward import token_scores
from rlhf.models.loading import load_causal_lm, load_scalar_model
from rlhf.models.value import PolicyWithValue
from rlhf.rollout.batch import RolloutBatch
from rlhf.rollout.config import KLConfig, RewardConfig, RolloutConfig
from rlhf.tasks.sorting import prompt_rows
from rlhf.trainers import ppo

from _ppo_helpers import sft_warm_start  # isort: skip

GOLD = "rlhf.tasks.sorting:gold_reward"


def small_config(policy: str, **kw) -> ppo.Config:
    cfg = ppo.Config(
        model=ModelConfig(path=policy),
        data=DataConfig(max_length=48, max_prompt_length=32),
        rollout=RolloutConfig(batch_size=8, forward_batch_size=3, max_new_tokens=6, temperature=0.7),
        reward=kw.pop("reward", RewardConfig(function=GOLD)),
        train=TrainConfig(batch_size=4, micro_batch_size=2),
        whiten_advantages=False,
    )
    for key, value in kw.items():
        setattr(cfg, key, value)
    return cfg


def prompt_examples(tokenizer, n: int = 8) -> list[dict]:
    records, _ = records_from_rows(prompt_rows(n, seed=3), "prompt")
    return tokenize_records(records, "prompt", tokenizer, DataConfig(max_length=48, max_prompt_length=32))[0]


# ---------------------------------------------------------------- shaping and advantages on hand-built rollouts


def hand_built(cfg: ppo.Config, **tokens) -> ppo.Estimates:
    """Three responses of lengths 3, 1, 5 in a T = 5 batch; the second one ended without EOS."""
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float)
    zeros = torch.zeros(3, 5)
    logprobs = tokens.get("logprobs", torch.where(mask.bool(), zeros, torch.full_like(zeros, float("-inf"))))
    tokens = {"logprobs": logprobs, "ref_logprobs": tokens.get("ref_logprobs", zeros), "values": zeros}
    ended = torch.tensor([True, False, True])
    return ppo.estimate_advantages(cfg, torch.tensor([1.0, 2.0, 3.0]), ended, mask, tokens, kl_coef=0.5)


def test_score_lands_on_each_responses_last_token_and_gae_carries_it_back():
    """gamma = lam = 1, V = 0, no KL: the reward is the score at the last valid token (index 2, 0, 4) and every
    valid token's advantage is the return-to-go, i.e. the score; padding holds 0 (the -inf log-probs at padding
    stay out)."""
    cfg = small_config("unused", gamma=1.0, lam=1.0)
    est = hand_built(cfg)
    want = torch.zeros(3, 5)
    want[0, 2], want[1, 0], want[2, 4] = 1.0, 2.0, 3.0
    assert torch.equal(est.rewards, want)
    assert est.advantages.tolist() == [[1.0] * 3 + [0.0] * 2, [2.0] + [0.0] * 4, [3.0] * 5]
    assert torch.equal(est.returns, est.advantages)


def test_missing_eos_and_length_penalties_and_the_kl_penalty():
    """Shaped score s - 0.5 [no EOS] - 0.1 len: (1 - 0.3, 2 - 0.5 - 0.1, 3 - 0.5) = (0.7, 1.4, 2.5). With
    logprobs - ref = 0.2 per token, k1 and beta = 0.5 every valid token also gets -0.1."""
    cfg = small_config("unused")
    cfg.reward.missing_eos_penalty, cfg.reward.length_penalty = 0.5, 0.1
    est = hand_built(cfg, ref_logprobs=torch.full((3, 5), -0.2))
    torch.testing.assert_close(est.shaped, torch.tensor([0.7, 1.4, 2.5]))
    torch.testing.assert_close(est.rewards[0], torch.tensor([-0.1, -0.1, -0.1 + 0.7, 0.0, 0.0]))
    torch.testing.assert_close(est.rewards[1], torch.tensor([-0.1 + 1.4, 0.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(est.kl.sum(-1), torch.tensor([0.6, 0.2, 1.0]))


def test_whitened_advantages_have_zero_mean_and_unit_variance_over_valid_tokens():
    est = hand_built(small_config("unused", whiten_advantages=True, lam=0.9), ref_logprobs=torch.full((3, 5), -0.3))
    valid = est.advantages[torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]).bool()]
    assert valid.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert valid.var().item() == pytest.approx(1.0, abs=1e-5)
    assert est.advantages[0, 3:].abs().sum() == 0


# ---------------------------------------------------------------- the rollout on a tiny model


@pytest.fixture(scope="module")
def rollout_and_models(tiny_dirs, tmp_path_factory):
    """A briefly supervised tiny policy (so responses end with EOS at different lengths) and one rollout of it."""
    policy = sft_warm_start(tiny_dirs["llama"], tmp_path_factory.mktemp("sft"), steps=40)
    cfg = small_config(str(policy))
    models = ppo.build_models(cfg)
    torch.manual_seed(0)
    examples = prompt_examples(models.tokenizer)
    result = ppo.make_rollout(cfg, models, models.actor_critic, examples, kl_coef=0.05)
    return cfg, models, result


def test_old_logprobs_equal_the_first_minibatch_recomputed_before_any_update(rollout_and_models):
    """The old log-probs (and values) come from one chunked no-grad pass (chunks of 3 rows); the first minibatch
    recomputes them with gradients in micro-batches of 2 other rows, trimmed differently: equal to 1e-5, so the
    first step's ratio is 1 and nothing is clipped. The rollout's passes ran padding-free; the updates' micro-batches
    are checked both padded and padding-free."""
    cfg, models, result = rollout_and_models
    assert all(padding_free.enabled(m) for m in (models.actor_critic.policy, models.actor_critic.critic, models.ref))
    assert models.actor_critic.padding_free
    model = models.actor_critic.train()
    rows = torch.randperm(8, generator=torch.Generator().manual_seed(1))[: cfg.train.batch_size]
    assert result.batch.response_len > 1 and result.batch.response_mask.sum(-1).min() < result.batch.response_len
    for flat in (False, True):
        for mb in result.batch.micro_batches(rows, cfg.train.micro_batch_size, flat=flat):
            assert (mb.flat is not None) == flat
            out = model(mb.input_ids, mb.attention_mask, response_len=mb.response_len, temperature=0.7, flat=mb.flat)
            mask = mb.response_mask.bool()
            torch.testing.assert_close(out.logprobs[mask], mb.tokens.old_logprobs[mask], atol=1e-5, rtol=0)
            torch.testing.assert_close(out.values[mask], mb.tokens.old_values[mask], atol=1e-5, rtol=0)
            _, units, metrics = ppo.ppo_loss(model, mb, cfg)
            assert metrics["policy/ratio"].item() / units.item() == pytest.approx(1.0, abs=1e-5)
            assert metrics["policy/approx_kl"].item() < 1e-9 and metrics["policy/clipfrac"].item() == 0


def test_rollout_scores_are_the_gold_scores_of_the_decoded_text(rollout_and_models):
    _, models, result = rollout_and_models
    from rlhf.tasks.sorting import gold_score

    letters = [row["letters"] for row in prompt_rows(8, seed=3)]
    assert result.scores.tolist() == pytest.approx(
        [gold_score(lt, c) for lt, c in zip(letters, result.completions, strict=True)]
    )
    lengths = result.batch.response_mask.sum(-1)
    assert result.generated_tokens == int(lengths.sum()) and result.stats["response/length"] == lengths.mean()


def test_minibatch_gradient_is_exact_however_it_is_split(rollout_and_models):
    """seq_mean_token_mean: the sums over two micro-batches / total units give the whole minibatch's loss."""
    cfg, models, result = rollout_and_models
    cfg = small_config("unused", loss_aggregation="seq_mean_token_mean")
    whole = result.batch.select(range(4))
    loss, units, _ = ppo.ppo_loss(models.actor_critic, whole, cfg)
    parts = [ppo.ppo_loss(models.actor_critic, result.batch.select(r), cfg) for r in ([0], [1, 2, 3])]
    assert units.item() == 4 and sum(p[1].item() for p in parts) == 4
    torch.testing.assert_close(sum(p[0] for p in parts) / 4, loss / units, atol=1e-6, rtol=1e-5)


def test_critic_value_of_token_t_is_read_at_the_position_before_it(tiny_dirs):
    """V_t is the critic's score of the prefix prompt + response[:t] (its last token): checked against the
    critic run on each prefix alone. A value head starts at exactly 0."""
    critic = load_scalar_model(ModelConfig(path=tiny_dirs["llama"]), trainable=False)
    policy = load_causal_lm(ModelConfig(path=tiny_dirs["llama"]), trainable=False)
    ids = torch.tensor([[1, 5, 80, 81, 6, 97, 98, 99, 2]])  # P = 5 prompt tokens, T = 4 response tokens
    mask = torch.ones_like(ids)
    values = PolicyWithValue(policy, critic).values(ids, mask, response_len=4)
    with torch.no_grad():
        want = [token_scores(critic, ids[:, : 5 + t], mask[:, : 5 + t])[0, -1] for t in range(4)]
    torch.testing.assert_close(values[0], torch.stack(want), atol=1e-5, rtol=0)
    rng = torch.get_rng_state()
    head = PolicyWithValue(policy, value_head=True)
    assert torch.equal(rng, torch.get_rng_state())  # building the head draws no random number
    out = head(ids, mask, response_len=4)
    assert out.values.shape == (1, 4) and out.values.abs().sum() == 0
    head.value_head.weight.data.normal_()
    with torch.no_grad():
        hidden = policy.model(input_ids=ids).last_hidden_state[0, 4:8]  # positions P-1 .. P+T-2
    torch.testing.assert_close(head(ids, mask, response_len=4).values[0], head.value_head(hidden).squeeze(-1))


def test_reward_model_with_another_tokenizer_scores_like_a_direct_call(tiny_dirs, tmp_path: Path):
    """Policy: llama-family tokenizer (BOS, own pad). Reward model: gpt2-family (no BOS, pad == EOS). Through the
    PPO path (decode the sampled ids with the policy tokenizer, re-tokenize with the RM's chat template) each
    score equals plain transformers' sequence classification of the RM's own chat-template rendering of (prompt,
    decoded text), one row: transformers pools at the rightmost non-pad token, so with pad == EOS the trailing EOS
    is not where the score is read."""
    rm_dir = tmp_path / "rm"
    torch.manual_seed(7)
    load_scalar_model(ModelConfig(path=tiny_dirs["gpt2"])).save_pretrained(rm_dir)
    rm_tok = AutoTokenizer.from_pretrained(tiny_dirs["gpt2"])
    rm_tok.save_pretrained(rm_dir)
    cfg = small_config(tiny_dirs["llama"], reward=RewardConfig(model=str(rm_dir)))
    models = ppo.build_models(cfg)
    examples = prompt_examples(models.tokenizer)
    torch.manual_seed(0)
    result = ppo.make_rollout(cfg, models, models.actor_critic, examples, kl_coef=0.05)
    rm = models.reward_models[0].model
    assert rm_tok.bos_token_id not in models.reward_models[0].tokenizer("x").input_ids
    direct = []
    for ex, text in zip(examples, result.completions, strict=True):
        rendered = rm_tok.apply_chat_template([*ex["prompt"], {"role": "assistant", "content": text}], tokenize=False)
        ids = torch.tensor([rm_tok(rendered, add_special_tokens=False).input_ids])
        with torch.no_grad():
            direct.append(rm(input_ids=ids).logits[0, 0])
    torch.testing.assert_close(result.scores, torch.stack(direct), atol=1e-5, rtol=0)
    assert result.scores.std() > 0


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["--rollout.batch_size", "12", "--train.batch_size", "8"], "rollout.batch_size"),
        (["--rollout.max_new_tokens", "400"], "rollout.max_new_tokens"),
        (["--reward.weights", "1,2", "--reward.function", GOLD], "reward.weights"),
        (["--kl.target", "0"], "kl.target"),
        (["--dual_clip", "0.5"], "dual_clip"),
    ],
)
def test_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(ppo.Config, None, overrides)
    assert key in str(err.value)


def test_value_init_from_reward_needs_a_reward_model(tiny_dirs):
    cfg = small_config(tiny_dirs["llama"])
    cfg.value.init = "reward"
    with pytest.raises(UserError, match="value.init: reward needs a reward model"):
        ppo.build_models(cfg)
    with pytest.raises(UserError, match="no reward source"):
        ppo.build_models(small_config(tiny_dirs["llama"], reward=RewardConfig()))


def test_run_length_from_episodes_steps_or_epochs():
    """rollout 64, minibatch 16, 4 epochs: 16 optimizer steps per iteration."""
    cfg = load_config(ppo.Config, None, ["--rollout.batch_size", "64", "--train.batch_size", "16"])
    assert ppo.count_iterations(cfg, 200) == 1 * (200 // 64)
    cfg.train.max_steps = 40
    assert ppo.count_iterations(cfg, 200) == 3  # ceil(40 / 16)
    cfg.total_episodes = 130
    assert ppo.count_iterations(cfg, 200) == 3  # ceil(130 / 64)
    with pytest.raises(UserError, match="only 10 prompts"):
        ppo.count_iterations(cfg, 10)


def test_kl_controller_section():
    from rlhf.losses import AdaptiveKLController, FixedKLController
    from rlhf.rollout.config import kl_controller

    assert isinstance(kl_controller(KLConfig(coef=0.1)), FixedKLController)
    ctl = kl_controller(KLConfig(coef=0.1, target=2.0, horizon=100))
    ctl.update(4.0, 10)  # error clipped to +0.2: 0.1 * (1 + 0.2 * 10 / 100)
    assert isinstance(ctl, AdaptiveKLController) and ctl.value == pytest.approx(0.102)


class Tokens(NamedTuple):
    x: torch.Tensor
    unset: torch.Tensor | None


def test_rollout_batch_select_trims_shared_padding():
    """3 prompt columns, 3 response columns. Rows 0 and 1 share one left padding column and one response token
    at most: selecting them keeps columns 1..3 and one response column."""
    batch = RolloutBatch(
        input_ids=torch.tensor([[0, 0, 5, 6, 0, 0], [0, 4, 5, 6, 0, 0], [3, 4, 5, 6, 7, 8]]),
        attention_mask=torch.tensor([[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]),
        response_mask=torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]),
        tokens=Tokens(torch.arange(9.0).view(3, 3), None),
    )
    sub = batch.select([0, 1])
    assert sub.input_ids.tolist() == [[0, 5, 6], [4, 5, 6]] and sub.response_len == 1
    assert sub.attention_mask.tolist() == [[0, 1, 1], [1, 1, 1]] and sub.tokens.x.tolist() == [[0.0], [3.0]]
    assert sub.tokens.unset is None
    assert batch.select(slice(0, 3)).input_ids.shape == (3, 6)
