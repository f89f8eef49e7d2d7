"""GRPO / RLOO / REINFORCE++ piece by piece: the advantages of each estimator on hand-built groups, the loss of a
hand-built batch against the math core on independently computed log-probs, dropped groups, beta 0, bad rewards."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf import cli
from rlhf.config import DataConfig, ModelConfig, TrainConfig, load_config
from rlhf.losses import aggregate, kl_penalty, ppo_policy_loss
from rlhf.losses.policy import sequence_log_ratio
from rlhf.models.loading import load_causal_lm
from rlhf.rollout.batch import RolloutBatch
from rlhf.rollout.config import KLConfig, RewardConfig, RolloutConfig
from rlhf.rollout.experience import Experience
from rlhf.trainers import grpo

from _ppo_helpers import write_prompts  # isort: skip


def config(**kw) -> grpo.Config:
    cfg = grpo.Config(
        group_size=3,
        rollout=RolloutConfig(batch_size=2, forward_batch_size=6, max_new_tokens=4, temperature=0.8),
        data=DataConfig(max_length=40, max_prompt_length=24),
        reward=RewardConfig(function="rlhf.tasks.sorting:gold_reward"),
        train=TrainConfig(batch_size=6, micro_batch_size=3),
    )
    for key, value in kw.items():
        setattr(cfg, key, value)
    return cfg


def experience(scores, lengths, *, ended=None, logprobs=None, ref=None, group_size=3, T=4) -> Experience:
    """Rows with the given response lengths (a prompt of 2 tokens each); log-probs 0 unless given."""
    n = len(scores)
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).float()
    ids = torch.ones(n, 2 + T, dtype=torch.long)
    att = torch.cat([torch.ones(n, 2, dtype=torch.long), mask.long()], dim=1)
    logprobs = torch.zeros(n, T) if logprobs is None else logprobs
    return Experience(
        sequences=RolloutBatch(ids, att, mask, ()),
        logprobs=logprobs * mask,
        entropy=torch.zeros(n, T),
        ref_logprobs=None if ref is None else ref * mask,
        values=None,
        scores=torch.tensor(scores, dtype=torch.float32),
        score_spread=None,
        completions=["x"] * n,
        ended_with_eos=torch.tensor([True] * n if ended is None else ended),
        group_size=group_size,
        generation_s=0.0,
        scoring_s=0.0,
    )


# ---------------------------------------------------------------- advantages


def test_group_estimators_by_hand():
    """Groups (1, 0, 0) and (2, 2, 2). Group 1: mean 1/3, unbiased std sqrt(((2/3)^2 + 2 (1/3)^2) / 2) = sqrt(1/3).
    GRPO: (2/3, -1/3, -1/3) / sqrt(1/3); Dr. GRPO: (2/3, -1/3, -1/3); RLOO: 1 - 0, 0 - 1/2, 0 - 1/2. Group 2 has
    zero std: advantage 0 under every estimator. Each sequence's advantage sits on its valid tokens only."""
    exp = experience([1.0, 0.0, 0.0, 2.0, 2.0, 2.0], [4, 2, 3, 1, 4, 2])
    third = math.sqrt(1 / 3)
    want = {
        ("group", True): [2 / 3 / third, -1 / 3 / third, -1 / 3 / third],
        ("group", False): [2 / 3, -1 / 3, -1 / 3],
        ("rloo", True): [1.0, -0.5, -0.5],
    }
    for (estimator, scale), first in want.items():
        est = grpo.estimate_advantages(config(advantage=estimator, scale_by_std=scale), exp, beta=0.0)
        per_row = torch.tensor(first + [0.0, 0.0, 0.0])
        torch.testing.assert_close(est.advantages, per_row[:, None] * exp.mask, atol=1e-5, rtol=0)
        assert est.zero_std.tolist() == [False, True] and est.keep.all()


def test_zero_std_groups_and_overlong_rows_leave_the_loss_when_asked():
    exp = experience([1.0, 0.0, 0.0, 2.0, 2.0, 2.0], [4, 2, 3, 1, 4, 2], ended=[False, True, True, True, True, True])
    dropped = grpo.estimate_advantages(config(drop_zero_std_groups=True), exp, beta=0.0)
    assert dropped.keep.tolist() == [True, True, True, False, False, False]
    filtered = grpo.estimate_advantages(config(overlong="filter", drop_zero_std_groups=True), exp, beta=0.0)
    assert filtered.keep.tolist() == [False, True, True, False, False, False]
    batch, stats = grpo.rollout_batch(config(overlong="filter", drop_zero_std_groups=True), exp, beta=0.0)
    assert batch.tokens.loss_mask.sum(-1).tolist() == [0.0, 2.0, 3.0, 0.0, 0.0, 0.0]
    assert stats["reward/zero_std_fraction"].item() == 0.5
    assert stats["grpo/kept_fraction"].item() == pytest.approx(2 / 6)


def test_kl_in_the_reward_and_the_overlong_penalty_enter_the_sequence_score():
    """log pi - log ref = 0.5 on every valid token, k1, beta 0.2: the sequence score falls by 0.2 * 0.5 * length.
    Lengths (4, 2, 3) with max_new_tokens 4 and a buffer of 2: overlong penalties (-1, 0, -0.5). Scores 1, 1, 1
    become 1 - 0.4 - 1 = -0.4, 1 - 0.2 = 0.8, 1 - 0.3 - 0.5 = 0.2; Dr. GRPO subtracts their mean 0.2."""
    exp = experience(
        [1.0] * 3, [4, 2, 3], logprobs=torch.full((3, 4), -1.0), ref=torch.full((3, 4), -1.5), group_size=3
    )
    cfg = config(advantage="group", scale_by_std=False, kl_in="reward", overlong="penalty", overlong_buffer=2)
    cfg.kl = KLConfig(coef=0.2, estimator="k1")
    est = grpo.estimate_advantages(cfg, exp, beta=0.2)
    torch.testing.assert_close(est.shaped, torch.tensor([0.0, 1.0, 0.5]))
    torch.testing.assert_close(est.advantages[:, 0], torch.tensor([-0.6, 0.6, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(est.kl.sum(-1), torch.tensor([2.0, 1.0, 1.5]))


def test_reinforce_pp_whitens_token_returns_over_the_batch():
    """Scores (1, 0), lengths (2, 1), KL 0.5 per token in the reward with beta 1: token rewards [-0.5, 0.5] and
    [-0.5]; returns-to-go [0, 0.5] and [-0.5]; over those 3 tokens mean 0 and unbiased var 0.25: A = R / 0.5."""
    exp = experience([1.0, 0.0], [2, 1], logprobs=torch.zeros(2, 2), ref=torch.full((2, 2), -0.5), group_size=1, T=2)
    cfg = config(advantage="reinforce_pp", kl_in="reward", group_size=1)
    cfg.kl = KLConfig(coef=1.0, estimator="k1")
    est = grpo.estimate_advantages(cfg, exp, beta=1.0)
    torch.testing.assert_close(est.advantages, torch.tensor([[0.0, 1.0], [-1.0, 0.0]]), atol=1e-4, rtol=0)


# ---------------------------------------------------------------- the loss against the math core


def plain_logprobs(model, ids: torch.Tensor, att: torch.Tensor, T: int, temperature: float) -> torch.Tensor:
    """Each row alone, without its padding: log-softmax of the logits / temperature at the positions before its
    response tokens (an independent computation of what the trainer's forward gives), (B, T), 0 at padding."""
    out = torch.zeros(ids.shape[0], T)
    rows = []
    for b in range(ids.shape[0]):
        keep = att[b].bool()
        tokens = ids[b][keep][None]
        logits = model(input_ids=tokens).logits[0] / temperature
        logp = torch.log_softmax(logits[:-1], -1).gather(1, tokens[0, 1:, None])[:, 0]
        n_resp = int(att[b, -T:].sum())
        rows.append(logp[-n_resp:] if n_resp else logp[:0])
    out = torch.stack([torch.nn.functional.pad(r, (0, T - len(r))) for r in rows])
    return out


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
@pytest.mark.parametrize("ratio", ["token", "sequence"])
def test_loss_equals_the_math_core_on_independent_logprobs(tiny_dirs, aggregation, ratio):
    """Four rows (left-padded prompts of 2-3 tokens, responses of 3, 1, 4, 2 tokens), off-policy old log-probs,
    per-sequence advantages, the k3 KL in the loss, one row out of the loss: the trainer's (loss sum / units) over
    two micro-batches equals ppo_policy_loss + beta k3 aggregated over the loss mask, on log-probs computed row by
    row without padding; and so do the gradients."""
    torch.manual_seed(0)
    model = load_causal_lm(ModelConfig(path=tiny_dirs["llama"]), trainable=True)
    T, temp, beta = 4, 0.8, 0.1
    ids = torch.randint(10, 200, (4, 3 + T))
    att = torch.tensor([[0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])
    mask = att[:, -T:].float()
    with torch.no_grad():
        base = plain_logprobs(model, ids, att, T, temp)
    old = (base + 0.3 * torch.randn(4, T)) * mask
    ref = (base + 0.2 * torch.randn(4, T)) * mask
    adv = torch.tensor([1.0, -0.5, 2.0, -1.0])[:, None] * mask
    loss_mask = mask * torch.tensor([1.0, 1.0, 1.0, 0.0])[:, None]
    batch = RolloutBatch(ids, att, mask, grpo.GroupTokens(old, adv, loss_mask, ref))
    cfg = config(loss_aggregation=aggregation, importance_ratio=ratio, clip_low=0.2, clip_high=0.28)
    cfg.rollout.temperature, cfg.rollout.max_new_tokens, cfg.kl = temp, T, KLConfig(coef=beta, estimator="k3")

    parts = [grpo.grpo_loss(model, batch.select(rows), cfg) for rows in ([0, 2], [1, 3])]
    got = sum(p[0] for p in parts) / sum(p[1] for p in parts)
    got_grads = torch.autograd.grad(got, list(model.parameters()))

    logp = plain_logprobs(model, ids, att, T, temp)
    num, den = (sequence_log_ratio(logp, old, mask), torch.zeros_like(old)) if ratio == "sequence" else (logp, old)
    pg, _ = ppo_policy_loss(num, den, adv, clip_low=0.2, clip_high=0.28)
    want = aggregate(pg + beta * kl_penalty(logp, ref, kind="k3"), loss_mask, mode=aggregation)
    if aggregation == "seq_mean_token_sum":
        want = want / T
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_sequence_log_ratio_value_is_the_mean_and_its_gradient_is_per_token():
    """Row logratios (0.2, 0.4) over 2 valid tokens: every token holds log s = 0.3; d exp(log s_t) / d logp_t = s."""
    logp = torch.tensor([[-1.0, -2.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.2, -2.4, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    out = sequence_log_ratio(logp, old, mask)
    torch.testing.assert_close(out.detach(), torch.full((1, 3), 0.3))
    (out.exp() * mask).sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[1.0, 1.0, 0.0]]) * math.exp(0.3))


# ---------------------------------------------------------------- the run


def test_beta_zero_loads_no_reference(tiny_dirs, tmp_path):
    """kl.coef 0: the reference given is never even opened (it does not exist), nothing is computed against it."""
    cfg = config(model=ModelConfig(path=tiny_dirs["llama"]), ref=ModelConfig(path=str(tmp_path / "no-such-model")))
    cfg.kl = KLConfig(coef=0.0)
    policy, reference = grpo.load_models(cfg)
    assert reference is None and not cfg.uses_reference
    cfg.kl = KLConfig(coef=0.04)
    with pytest.raises(Exception, match="no-such-model"):
        grpo.load_models(cfg)


def test_validation_names_the_key():
    for overrides, key in (
        (["--group_size", "1"], "group_size"),
        (["--advantage", "rloo", "--group_size", "1"], "group_size"),
        (["--train.batch_size", "5"], "train.batch_size"),
        (["--overlong_buffer", "99"], "overlong_buffer"),
        (["--kl.coef", "0", "--kl.target", "1.0"], "kl.target"),
    ):
        with pytest.raises(Exception, match=key):
            load_config(grpo.Config, None, ["--rollout.batch_size", "4", "--train.batch_size", "8", *overrides])
    rloo = cli.train_config("rloo", grpo, None, [])
    assert (rloo.advantage, rloo.kl_in, rloo.kl.estimator) == ("rloo", "reward", "k1")


BAD_REWARDS = {
    "raises": "def f(prompts, completions, **_):\n    raise KeyError('letters')\n",
    "nan": "def f(prompts, completions, **_):\n    return [float('nan')] * len(completions)\n",
    "short": "def f(prompts, completions, **_):\n    return [0.0]\n",
}


@pytest.mark.parametrize("kind", list(BAD_REWARDS))
def test_a_bad_reward_function_stops_the_run_with_one_line(kind, tiny_dirs, tmp_path, capsys):
    (tmp_path / "bad.py").write_text(BAD_REWARDS[kind])
    prompts = write_prompts(tmp_path / "prompts.jsonl", 8)
    argv = ["train", "grpo", f"--output_dir={tmp_path / 'run'}", f"--model.path={tiny_dirs['llama']}"]
    argv += [f"--data.train={prompts}", f"--reward.function={tmp_path / 'bad.py'}:f", "--rollout.batch_size=2"]
    argv += [
        "--rollout.max_new_tokens=4",
        "--train.batch_size=4",
        "--train.micro_batch_size=4",
        "--logging.progress=false",
    ]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    err = [line for line in err.splitlines() if line.startswith("rlhf")]  # transformers' load bars aside
    want = {"raises": "raised KeyError: 'letters' (at ", "nan": "score 0 is nan", "short": "returned 1 scores for 8"}
    assert len(err) == 1 and err[0].startswith(f"rlhf: error: reward {tmp_path / 'bad.py'}:f") and want[kind] in err[0]
    assert not (tmp_path / "run" / "final").exists() and not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("reward", ["constant", "length"])
def test_a_reward_that_never_varies_is_reported_once(reward, tiny_dirs, tmp_path, caplog):
    """A reward function that gives every completion 0 (a parser that never matches, say) trains nothing: after 3
    iterations of one score the run says so, once, and goes on. A reward that varies (here the length) says nothing.
    """
    body = {"constant": "[0.0] * len(completions)", "length": "[float(len(c)) for c in completions]"}[reward]
    (tmp_path / "r.py").write_text(f"def f(prompts, completions, **_):\n    return {body}\n")
    prompts = write_prompts(tmp_path / "prompts.jsonl", 8)
    argv = ["train", "grpo", f"--output_dir={tmp_path / 'run'}", f"--model.path={tiny_dirs['llama']}",
            f"--data.train={prompts}", f"--reward.function={tmp_path / 'r.py'}:f", "--rollout.batch_size=2",
            "--group_size=2", "--rollout.max_new_tokens=4", "--train.batch_size=4", "--train.micro_batch_size=4",
            "--total_episodes=20", "--logging.progress=false"]  # fmt: skip
    with caplog.at_level("WARNING", logger="rlhf.runtime.online"):
        assert cli.main(argv) == 0
    warned = [r.getMessage() for r in caplog.records if "no learning signal" in r.getMessage()]
    if reward == "constant":
        assert len(warned) == 1 and warned[0].startswith(
            "every completion of the first 3 iterations got the same score, 0"
        )
    else:
        assert warned == []


def test_one_step_per_rollout_skips_the_policy_pass_and_takes_the_steps_own_logprobs(tiny_dirs):
    """ppo_epochs 1 and train.batch_size = the rollout: the old log-probs are the step's own, detached, so the
    ratio is 1 and the loss and gradients are those of old = the sampling policy's log-probs. A KL in the reward
    or an adaptive coefficient needs the policy's log-probs before the step: then the pass runs."""
    cfg = config(train=TrainConfig(batch_size=6, micro_batch_size=6))  # 2 prompts x 3 = 6 completions
    assert cfg.single_update
    assert not config(train=TrainConfig(batch_size=3, micro_batch_size=3)).single_update  # two steps per rollout
    assert not config(kl_in="reward").single_update
    adaptive = config()
    adaptive.kl = KLConfig(coef=0.04, target=1.0)
    assert not adaptive.single_update
    torch.manual_seed(0)
    model = load_causal_lm(ModelConfig(path=tiny_dirs["llama"]), trainable=True)
    ids = torch.randint(10, 200, (2, 6))
    att = torch.tensor([[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    mask = att[:, -3:].float()
    with torch.no_grad():
        old = plain_logprobs(model, ids, att, 3, cfg.rollout.temperature)
    adv = torch.tensor([1.0, -1.0])[:, None] * mask
    results = []
    for given in (old, None):
        batch = RolloutBatch(ids, att, mask, grpo.GroupTokens(given, adv, mask, None))
        loss, units, metrics = grpo.grpo_loss(model, batch, cfg)
        results.append((loss / units, torch.autograd.grad(loss / units, list(model.parameters())), metrics))
    (a, ga, _), (b, gb, m) = results
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert m["policy/clipfrac"].item() == 0 and m["policy/ratio"].item() / units.item() == pytest.approx(1.0)
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-4)
