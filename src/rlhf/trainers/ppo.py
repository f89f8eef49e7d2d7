"""PPO: the classic online RLHF stage (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022, Sec. 3.5).

    rlhf train ppo --config configs/ppo.yaml

One iteration: draw `rollout.batch_size` prompts; sample one response each from the policy; score the decoded text
(reward models and/or Python functions); in batched no-grad passes take the old log-probs (with values, from the
actor-critic) and the reference log-probs (these passes, and the reward models', run padding-free where the model
allows: `rlhf.models.forward.Unpadded`); shape per-token rewards (-beta * KL on every token, the shaped score
added at the last response token); GAE; whiten the advantages; then `ppo_epochs` passes over shuffled minibatches
of `train.batch_size` responses, each ONE optimizer step (micro-batches of `train.micro_batch_size`) of

    loss = pg_loss + vf_coef * value_loss - ent_coef * entropy       each reduced by `loss_aggregation`

`value_loss` (`losses.value.clipped_value_loss`) already holds the 1/2: 0.5 * max((V - R)^2, (V_clip - R)^2). The
default vf_coef 0.5 on it is cleanrl's and OpenAI baselines' 0.25 * max(...); TRL's PPOTrainer has the same 1/2
inside and vf_coef 0.1 (benchmarks/bench_ppo.py sets 0.1 on both sides).

Bookkeeping: `train.batch_size` is the minibatch (responses per optimizer step); an iteration is `ppo_epochs *
rollout.batch_size / train.batch_size` steps (fewer when `target_approx_kl` stops it early). One metrics line per
iteration, at its last step. Checkpoints and SIGTERM stops happen only between iterations (a rollout is never
saved): `checkpoint.every` counts optimizer steps, and the checkpoint is written at the end of the iteration that
reaches a multiple of it (or in which `checkpoint.every_minutes` passed). The prompt order (which also counts the
iterations), the KL coefficient and every RNG stream (generation samples from torch's global RNG) are in the
checkpoint, so a resumed run equals an uninterrupted one bit for bit.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from rlhf.advantages import gae
from rlhf.config import (
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
    check,
    check_choice,
)
from rlhf.errors import UserError
from rlhf.losses import (
    AGGREGATE_MODES,
    aggregate_parts,
    clipped_value_loss,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
)
from rlhf.losses.reduce import SumOver
from rlhf.models.loading import (
    apply_lora,
    disable_dropout,
    load_causal_lm,
    load_model_tokenizer,
    reference_policy,
)
from rlhf.models.value import PolicyWithValue, ValueConfig, load_critic
from rlhf.rollout.batch import RolloutBatch
from rlhf.rollout.config import (
    KLConfig,
    OnlineEvalConfig,
    RewardConfig,
    RolloutConfig,
    build_reward,
    load_reward_models,
    move_reward_models,
)
from rlhf.rollout.experience import Experience, make_experience
from rlhf.rollout.rewards import RewardSource
from rlhf.rollout.shaping import shape_scores, token_rewards
from rlhf.runtime.finish import save_final
from rlhf.runtime.online import (
    IterationLoop,
    OnlineEvaluator,
    check_stop_rules,
    count_iterations,
    run_updates,
)
from rlhf.runtime.setup import load_splits, make_engine, seed_everything


@dataclass
class Config:
    output_dir: str = "runs/ppo"
    """Run directory (config, metrics, samples, checkpoints, final/)."""
    seed: int = 0
    """Seed of the prompt order, the critic's fresh head, the minibatch shuffles and generation."""
    total_episodes: int = 0
    """Responses to generate in the whole run (rounded up to whole iterations); 0: `train.max_steps` optimizer
    steps (rounded up to whole iterations), or else `train.epochs` passes over the prompts."""
    ppo_epochs: int = 4
    """Passes over each rollout batch."""
    clip_low: float = 0.2
    """Lower clip of the probability ratio: 1 - clip_low."""
    clip_high: float = 0.2
    """Upper clip of the probability ratio: 1 + clip_high (above clip_low: DAPO's clip-higher)."""
    dual_clip: float | None = None
    """Dual clip c > 1 (Ye et al. 2020): cap the loss of negative-advantage tokens at -c * A; null: off."""
    vf_coef: float = 0.5
    """Coefficient c1 of the value loss, which already holds the 1/2 of a squared error (see the module doc)."""
    value_clip: float = 0.2
    """Clip range of the value update around the rollout's values, in reward units."""
    ent_coef: float = 0.0
    """Coefficient c2 of the entropy bonus (0: the entropy is not computed in the update)."""
    gamma: float = 1.0
    """Discount of GAE over response tokens."""
    lam: float = 0.95
    """Lambda of GAE."""
    whiten_advantages: bool = True
    """Normalise the advantages over each rollout batch's response tokens (zero mean, unit variance)."""
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"] = "token_mean"
    """How per-token losses are reduced (rlhf.losses.reduce.aggregate)."""
    target_approx_kl: float | None = None
    """Stop an iteration's remaining updates once a minibatch's approx KL to the rollout policy exceeds this
    (checked on steps that log metrics: every step with logging.every 1); null: never."""
    samples_every: int = 10
    """Write `num_samples` (prompt, response, score) rows to samples.jsonl every N iterations (0: never)."""
    num_samples: int = 4
    """Rows per samples.jsonl write."""
    stop_when: list[str] = field(default_factory=list)
    """Stop the run early (and save final/) once an iteration's metrics line meets one of these rules, e.g.
    `hacking/length_drift>1.5` or `eval/gold<0.5` (METRIC>VALUE, <, >=, <=)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy, usually an SFT checkpoint."""
    ref: ModelConfig | None = None
    """A separate reference model; unset: the initial policy (a frozen copy; with LoRA the model with its
    adapters off). The same key as DPO's and GRPO's."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompt data (kind `prompt`; extra fields go to reward functions). Held-out prompts (`eval`, `eval_fraction`)
    are left out of training and are what `eval.every` evaluates on."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Prompts per iteration and sampling."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Reward sources and score shaping."""
    kl: KLConfig = field(default_factory=KLConfig)
    """The KL penalty to the reference and its controller."""
    value: ValueConfig = field(default_factory=ValueConfig)
    """The critic (trained in full: `model.lora` applies to the policy only)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW, over actor and critic together."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule over optimizer steps."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """batch_size: responses per optimizer step (the minibatch); micro_batch_size; epochs over the prompts."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics and progress."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Resumable checkpoints (written between iterations)."""
    eval: OnlineEvalConfig = field(default_factory=OnlineEvalConfig)
    """The policy evaluated on the held-out prompts during training: gold and proxy rewards against KL."""

    @property
    def minibatches(self) -> int:
        """Optimizer steps per pass over a rollout: rollout.batch_size / train.batch_size."""
        return self.rollout.batch_size // self.train.batch_size

    @property
    def steps_per_iteration(self) -> int:
        """Optimizer steps of a full iteration: ppo_epochs x minibatches per rollout."""
        return self.ppo_epochs * self.minibatches

    @property
    def episodes_per_iteration(self) -> int:
        """Responses generated per iteration: one per prompt."""
        return self.rollout.batch_size

    def validate(self) -> None:
        check(self.total_episodes >= 0, "total_episodes", f"must be >= 0, got {self.total_episodes}")
        check(self.ppo_epochs >= 1, "ppo_epochs", f"must be >= 1, got {self.ppo_epochs}")
        check(self.clip_low >= 0 and self.clip_high >= 0, "clip_low", "clip_low and clip_high must be >= 0")
        check(self.dual_clip is None or self.dual_clip > 1, "dual_clip", f"must be > 1 or null, got {self.dual_clip}")
        check(self.vf_coef >= 0, "vf_coef", f"must be >= 0, got {self.vf_coef}")
        check(self.value_clip >= 0, "value_clip", f"must be >= 0, got {self.value_clip}")
        check(self.ent_coef >= 0, "ent_coef", f"must be >= 0, got {self.ent_coef}")
        check(0 <= self.gamma <= 1, "gamma", f"must be in [0, 1], got {self.gamma}")
        check(0 <= self.lam <= 1, "lam", f"must be in [0, 1], got {self.lam}")
        check_choice(self.loss_aggregation, AGGREGATE_MODES, "loss_aggregation")
        check(self.target_approx_kl is None or self.target_approx_kl > 0, "target_approx_kl", "must be > 0 or null")
        check(self.samples_every >= 0 and self.num_samples >= 0, "samples_every", "samples_every and num_samples >= 0")
        check_stop_rules(self.stop_when)
        check(
            self.rollout.batch_size % self.train.batch_size == 0,
            "rollout.batch_size",
            f"must be a multiple of train.batch_size ({self.train.batch_size}), got {self.rollout.batch_size}",
        )
        check(
            self.data.max_prompt_length + self.rollout.max_new_tokens <= self.data.max_length,
            "rollout.max_new_tokens",
            f"data.max_prompt_length ({self.data.max_prompt_length}) + max_new_tokens "
            f"({self.rollout.max_new_tokens}) must fit data.max_length ({self.data.max_length})",
        )


# ---------------------------------------------------------------------------------------------- models


@dataclass
class Models:
    """Everything PPO runs: the trained actor-critic, the frozen reference, the reward and the tokenizers."""

    tokenizer: Any
    actor_critic: PolicyWithValue
    ref: nn.Module
    reward: RewardSource
    reward_models: list[Any]
    critic_tokenizer: Any = None


def build_models(cfg: Config) -> Models:
    """Policy, reference, reward sources and critic, dropout off everywhere, on the CPU."""
    if not cfg.model.path:
        raise UserError("model.path: no policy checkpoint given (usually the SFT run's final/ directory)")
    torch.manual_seed(cfg.seed)  # a fresh critic head is drawn from the global RNG
    trust = cfg.model.trust_remote_code
    tokenizer = load_model_tokenizer(cfg.model)
    policy = load_causal_lm(cfg.model, trainable=True)
    disable_dropout(policy)
    policy = apply_lora(policy, cfg.model.lora)
    ref = reference_policy(policy, cfg.ref)
    reward_models = load_reward_models(
        cfg.reward,
        cfg.data,
        forward_batch_size=cfg.rollout.forward_batch_size,
        dtype=cfg.model.dtype,
        trust_remote_code=trust,
    )
    reward = build_reward(cfg.reward, reward_models)
    critic, critic_tokenizer = load_critic(cfg.value, cfg.model, cfg.reward.model_paths, tokenizer)
    actor_critic = PolicyWithValue(policy, critic, value_head=cfg.value.head_on_policy)
    return Models(tokenizer, actor_critic, ref, reward, reward_models, critic_tokenizer)


# ---------------------------------------------------------------------------------------------- rollout


class PPOTokens(NamedTuple):
    """What PPO's loss reads per response token of its rollout batch: (B, T) each, 0 on padding."""

    old_logprobs: Tensor  # log-probs under the rollout policy (the ratio's denominator)
    old_values: Tensor  # the critic's values at the rollout (the value clip's centre)
    advantages: Tensor  # GAE, whitened if asked
    returns: Tensor  # value targets: advantages + values


@dataclass
class RolloutResult:
    batch: RolloutBatch[PPOTokens]  # the rollout's sequences and what the updates read
    experience: Experience  # what the experience maker gave: scores (B,), completions, timings, ...
    stats: dict[str, Tensor]  # scalar tensors, means over this process's rows

    @property
    def scores(self) -> Tensor:
        return self.experience.scores

    @property
    def completions(self) -> list[str]:
        return self.experience.completions

    @property
    def generated_tokens(self) -> int:
        return int(self.experience.lengths.sum())


@dataclass
class Estimates:
    shaped: Tensor  # (B,) sequence score after penalties, normalising, clipping
    rewards: Tensor  # (B, T) -beta * kl_t, plus the shaped score at the last response token
    kl: Tensor  # (B, T) per-token KL estimate to the reference (0 on padding)
    advantages: Tensor  # (B, T) GAE, whitened if asked
    returns: Tensor  # (B, T) value targets


def estimate_advantages(
    cfg: Config,
    scores: Tensor,
    ended_with_eos: Tensor,
    mask: Tensor,
    tokens: dict[str, Tensor],
    kl_coef: float,
    sum_over: SumOver | None = None,
) -> Estimates:
    """Scores (B,) and `tokens` logprobs, ref_logprobs, values (B, T) -> shaped rewards, GAE advantages, returns.
    Score normalising and advantage whitening use the global batch's statistics with `sum_over`."""
    shaped = shape_scores(scores, ended_with_eos, mask.sum(-1), **cfg.reward.shaping, sum_over=sum_over)
    rewards, kl = token_rewards(
        shaped, tokens["logprobs"], tokens["ref_logprobs"], mask, kl_coef=kl_coef, kl_kind=cfg.kl.estimator
    )
    advantages, returns = gae(rewards, tokens["values"], mask, gamma=cfg.gamma, lam=cfg.lam)
    if cfg.whiten_advantages:
        advantages = masked_whiten(advantages, mask, sum_over=sum_over)
    return Estimates(shaped, rewards, kl, advantages, returns)


def make_rollout(
    cfg: Config,
    models: Models,
    actor_critic: PolicyWithValue,
    examples: list[dict[str, Any]],
    kl_coef: float,
    *,
    keys: Tensor | None = None,
    sum_over: SumOver | None = None,
) -> RolloutResult:
    """Generate, score, shape and estimate advantages for one batch of prompt examples (this process's share;
    `keys`: the rows' sampling keys, `sum_over`: the global batch statistics, see `estimate_advantages`)."""
    exp = make_experience(actor_critic, models.ref, models.reward, models.tokenizer, examples, cfg.rollout, keys=keys)
    # PPO always runs the actor-critic pass and has a reference
    assert exp.logprobs is not None and exp.ref_logprobs is not None and exp.values is not None
    mask, device = exp.mask, exp.logprobs.device
    tokens = {"logprobs": exp.logprobs, "ref_logprobs": exp.ref_logprobs, "values": exp.values}
    est = estimate_advantages(cfg, exp.scores.to(device), exp.ended_with_eos, mask, tokens, kl_coef, sum_over)
    batch = exp.sequences.with_tokens(PPOTokens(exp.logprobs, exp.values, est.advantages, est.returns))
    stats = {
        **exp.stats(),
        "reward/shaped": est.shaped.mean(),
        "objective/kl": est.kl.sum(-1).mean(),
        "objective/rlhf_reward": est.rewards.sum(-1).mean(),
        "value/mean": masked_mean(exp.values, mask),
        "value/explained_variance": explained_variance(exp.values, est.returns, mask),
    }
    return RolloutResult(batch, exp, stats)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var(returns - values) / Var(returns) over the response tokens: 1 is a perfect critic, 0 no better than a
    constant, negative worse (the cleanrl diagnostic). 0 when the returns do not vary."""
    var_returns = masked_var(returns, mask)
    ev = 1 - masked_var(returns - values, mask) / var_returns.clamp(min=1e-8)
    return torch.where(var_returns > 0, ev, torch.zeros_like(ev))


# ---------------------------------------------------------------------------------------------- updates


def ppo_loss(model: nn.Module, mb: RolloutBatch[PPOTokens], cfg: Config) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """The engine's loss_fn: (sum of the per-unit loss, units, metric sums) of one micro-batch.

    Units are tokens (token_mean) or sequences (the seq_* modes), via `aggregate_parts`, so accumulating
    micro-batches gives exactly the minibatch's aggregate.
    """
    want_entropy = cfg.ent_coef > 0
    out = model(
        mb.input_ids,
        mb.attention_mask,
        response_len=mb.response_len,
        temperature=cfg.rollout.temperature,
        with_entropy=want_entropy,
        flat=mb.flat,
    )
    t, mask = mb.tokens, mb.response_mask
    pg_loss, pg_metrics = ppo_policy_loss(
        out.logprobs,
        t.old_logprobs,
        t.advantages,
        clip_low=cfg.clip_low,
        clip_high=cfg.clip_high,
        dual_clip=cfg.dual_clip,
    )
    v_loss, v_metrics = clipped_value_loss(out.values, t.old_values, t.returns, clip_range=cfg.value_clip)

    def part(x: Tensor) -> Tensor:
        return aggregate_parts(x, mask, mode=cfg.loss_aggregation)[0]

    pg_sum, units = aggregate_parts(pg_loss, mask, mode=cfg.loss_aggregation)
    v_sum = part(v_loss)
    loss = pg_sum + cfg.vf_coef * v_sum
    metrics = {
        "policy/loss": pg_sum.detach(),
        "policy/clipfrac": part(pg_metrics["clipfrac"]),
        "policy/approx_kl": part(pg_metrics["approx_kl"]),
        "policy/ratio": part(pg_metrics["ratio"]),
        "value/loss": v_sum.detach(),
        "value/clipfrac": part(v_metrics["clipfrac"]),
    }
    if want_entropy:
        assert out.entropy is not None
        entropy_sum = part(out.entropy)
        loss = loss - cfg.ent_coef * entropy_sum
        metrics["policy/entropy"] = entropy_sum.detach()
    return loss, units, metrics


# ---------------------------------------------------------------------------------------------- the loop


def train(cfg: Config) -> Path:
    """Run PPO; return the run directory (final/ holds the policy, final_value/ a separate critic)."""
    seed_everything(cfg.seed)
    models = build_models(cfg)
    splits = load_splits(cfg.data, "prompt", models.tokenizer, seed=cfg.seed)
    prompts = splits.train
    iterations = count_iterations(cfg, len(prompts))
    evaluator = OnlineEvaluator(cfg.eval, splits.eval, models.reward, seed=cfg.seed)
    engine = make_engine(models.actor_critic, cfg, iterations * cfg.steps_per_iteration, data_report=splits.report)
    with engine:
        models.ref.to(engine.device)
        move_reward_models(models.reward_models, engine.device)
        loop = IterationLoop(
            engine,
            cfg,
            prompts,
            iterations,
            name="ppo",
            evaluator=evaluator,
            reference=models.ref,
            tokenizer=models.tokenizer,
        )
        loss_fn = functools.partial(ppo_loss, cfg=cfg)
        for it in loop:
            result = make_rollout(
                cfg,
                models,
                engine.unwrapped_model,
                it.examples,
                it.kl_coef,
                keys=it.keys,
                sum_over=engine.sum_over_processes,
            )
            stats = loop.rollout_stats(result.stats, result.experience)
            t0 = time.perf_counter()
            logged, train_tokens = run_updates(
                engine,
                result.batch.to(engine.device),
                loss_fn,
                epochs=cfg.ppo_epochs,
                minibatches=cfg.minibatches,
                seed=cfg.seed,
                iteration=it.index,
                flat=models.actor_critic.padding_free,
                stop_kl=cfg.target_approx_kl,
            )
            train_s = time.perf_counter() - t0
            loop.end(
                it,
                logged,
                stats,
                policy=engine.unwrapped_model.policy,
                completions=result.completions,
                scores=result.scores,
                extra={"ppo/updates": float(engine.step - it.step_before)},
                perf={
                    "perf/generation_tokens_per_s": result.generated_tokens / max(result.experience.generation_s, 1e-9),
                    "perf/train_tokens_per_s": train_tokens / max(train_s, 1e-9),
                },
            )
        save_final(engine, models.actor_critic.policy, models.tokenizer, base_path=cfg.model.path)
        if models.actor_critic.critic is not None:
            engine.save_final(models.actor_critic.critic, models.critic_tokenizer, subdir="final_value")
        loop.close()
    return engine.run_dir
