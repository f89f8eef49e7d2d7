"""Online group methods without a critic: GRPO (Shao et al. 2024), RLOO (Ahmadian et al. 2024), REINFORCE++ (Hu
2025), and their variants (Dr. GRPO, DAPO, GSPO) as combinations of settings.

    rlhf train grpo --config configs/grpo.yaml
    rlhf train rloo --config configs/grpo.yaml       # the same trainer with the `rloo` preset

One iteration: draw `rollout.batch_size` prompts; sample `group_size` completions of each (`rollout.experience`);
score the decoded text (reward models and/or Python functions); shape the scores (`reward.*` penalties, DAPO's
overlong punishment); turn them into advantages by the estimator:

    group         A_i = (s_i - mean_g) / (std_g + eps)           GRPO; scale_by_std false: s_i - mean_g (Dr. GRPO)
    rloo          A_i = s_i - mean of the other s_j of the group  RLOO
    reinforce_pp  A_t = whiten_batch(sum_{t' >= t} r_t')            REINFORCE++ (per token, r_t holds the KL)

and broadcast a sequence's advantage over its tokens. Then `ppo_epochs` passes of minibatch steps of

    loss_t = max(-A ratio_t, -A clip(ratio_t, 1 - clip_low, 1 + clip_high)) + beta kl_t      (kl_in: loss)

reduced by `loss_aggregation` (token_mean: DAPO; seq_mean_token_mean: the GRPO paper; seq_mean_token_sum:
Dr. GRPO, each sequence's token sum divided by the constant `rollout.max_new_tokens`). The ratio is per token, or
per sequence (`importance_ratio: sequence`, GSPO). The KL to the reference (`kl.coef` = beta) sits in the loss
(k3 per token, as GRPO), or in the reward (as PPO and RLOO: minus beta times the sequence KL, per token for
REINFORCE++); with beta 0 no reference model is loaded at all. Old log-probs come from one no-grad pass over the
rollout, so every epoch's ratio is against the sampling policy.

DAPO's dynamic sampling (`drop_zero_std_groups`) and overlong filtering (`overlong: filter`) take rows out of the
loss (their tokens count as no units), never out of the batch, so every process runs the same steps.

When an iteration is one optimizer step from the sampling weights (`ppo_epochs` 1, `train.batch_size` = all
its completions) and nothing before the step needs the policy's log-probs (the KL in the loss or none, a fixed
coefficient), the no-grad policy pass is skipped: the step's own forward gives those log-probs, detached, as the
ratio's denominator (ratio 1, as TRL does for mu = 1). `objective/kl` and `objective/entropy` then come from
that forward as `policy/kl` and `policy/entropy`.

Bookkeeping as PPO's: an iteration is `ppo_epochs * rollout.batch_size * group_size / train.batch_size`
optimizer steps; one metrics line per iteration; checkpoints and SIGTERM stops between iterations; the prompt
order, the KL coefficient and every RNG stream (generation samples from torch's global RNG) are checkpointed.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from rlhf.advantages import batch_normalized_advantages, group_advantages, rloo_advantages
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
from rlhf.losses import AGGREGATE_MODES, aggregate_parts, kl_penalty, ppo_policy_loss
from rlhf.losses.policy import sequence_log_ratio
from rlhf.losses.reduce import SumOver
from rlhf.models import padding_free
from rlhf.models.forward import causal_lm_logprobs
from rlhf.models.loading import (
    apply_lora,
    disable_dropout,
    load_causal_lm,
    load_model_tokenizer,
    reference_policy,
)
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
from rlhf.rollout.shaping import masked_kl, overlong_penalty, score_at_last_token, shape_scores
from rlhf.runtime.finish import save_final
from rlhf.runtime.online import (
    IterationLoop,
    OnlineEvaluator,
    check_stop_rules,
    count_iterations,
    run_updates,
)
from rlhf.runtime.setup import load_splits, make_engine, seed_everything

ESTIMATORS = ("group", "rloo", "reinforce_pp")

PRESETS = {"rloo": {"advantage": "rloo", "kl_in": "reward", "kl": {"estimator": "k1"}}}
"""`rlhf train rloo`: leave-one-out advantages with the KL in the reward (Ahmadian et al. 2024, Sec. 3)."""


@dataclass
class Config:
    output_dir: str = "runs/grpo"
    """Run directory (config, metrics, samples, checkpoints, final/)."""
    seed: int = 0
    """Seed of the prompt order, the minibatch shuffles and generation."""
    total_episodes: int = 0
    """Completions to generate in the whole run (rounded up to whole iterations); 0: `train.max_steps` optimizer
    steps (rounded up to whole iterations), or else `train.epochs` passes over the prompts."""
    group_size: int = 4
    """Completions sampled per prompt (the group its advantages are relative to). The prompt is computed once per
    group, not once per completion, in generation, scoring and the updates (docs/algorithms.md)."""
    advantage: Literal["group", "rloo", "reinforce_pp"] = "group"
    """Estimator: group (GRPO; Dr. GRPO without std scaling), rloo (leave-one-out), reinforce_pp (REINFORCE++:
    per-token returns normalised over the batch)."""
    scale_by_std: bool = True
    """group: divide by the group's standard deviation (GRPO); false: only subtract the mean (Dr. GRPO)."""
    kl_in: Literal["loss", "reward"] = "loss"
    """Where the KL to the reference goes: the loss (beta * kl_t per token, GRPO) or the reward (PPO, RLOO);
    `kl.coef` 0 puts it nowhere and loads no reference."""
    ppo_epochs: int = 1
    """Passes over each rollout (GRPO's mu); the old log-probs of every pass are those of the sampling policy."""
    clip_low: float = 0.2
    """Lower clip of the probability ratio: 1 - clip_low."""
    clip_high: float = 0.2
    """Upper clip of the probability ratio: 1 + clip_high (DAPO's clip-higher: 0.28)."""
    importance_ratio: Literal["token", "sequence"] = "token"
    """Per-token ratios (GRPO), or one length-normalised ratio per sequence (GSPO; use clips of about 3e-4)."""
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"] = "seq_mean_token_mean"
    """token_mean (DAPO), seq_mean_token_mean (the GRPO paper), seq_mean_token_sum (Dr. GRPO: each sequence's
    token sum divided by the constant rollout.max_new_tokens)."""
    drop_zero_std_groups: bool = False
    """DAPO's dynamic sampling: leave out of the loss the groups whose shaped scores are all equal (they carry no
    signal and would dilute the rest); their fraction is logged either way (`reward/zero_std_fraction`)."""
    overlong: Literal["keep", "filter", "penalty"] = "keep"
    """Responses that hit rollout.max_new_tokens: kept as they are, left out of the loss (DAPO's overlong
    filtering), or penalised softly over the last `overlong_buffer` tokens (DAPO eq. 13)."""
    overlong_buffer: int = 4
    """Tokens before rollout.max_new_tokens where the soft overlong penalty ramps from 0 to -overlong_factor."""
    overlong_factor: float = 1.0
    """Weight of the soft overlong penalty in the score."""
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
    adapters off)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompt data (kind `prompt`; extra fields go to reward functions). Held-out prompts (`eval`, `eval_fraction`)
    are left out of training and are what `eval.every` evaluates on."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """batch_size: prompts per iteration (each sampled group_size times); sampling; no-grad pass sizes."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Reward sources and score shaping."""
    kl: KLConfig = field(default_factory=lambda: KLConfig(coef=0.04, estimator="k3"))
    """The KL term to the reference (coef is beta; 0: no reference model) and its controller."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule over optimizer steps."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """batch_size: completions per optimizer step (the minibatch); micro_batch_size; epochs over the prompts."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics and progress."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Resumable checkpoints (written between iterations)."""
    eval: OnlineEvalConfig = field(default_factory=OnlineEvalConfig)
    """The policy evaluated on the held-out prompts during training: gold and proxy rewards against KL."""

    @property
    def episodes_per_iteration(self) -> int:
        """Completions generated per iteration."""
        return self.rollout.batch_size * self.group_size

    @property
    def minibatches(self) -> int:
        """Optimizer steps per pass over a rollout."""
        return self.episodes_per_iteration // self.train.batch_size

    @property
    def steps_per_iteration(self) -> int:
        return self.ppo_epochs * self.minibatches

    @property
    def uses_reference(self) -> bool:
        return self.kl.coef > 0

    @property
    def single_update(self) -> bool:
        """One optimizer step per rollout, from the sampling weights, with nothing before it that needs the
        policy's log-probs: the no-grad policy pass is skipped (see the module docstring)."""
        needs_logprobs = self.uses_reference and (self.kl_in == "reward" or self.kl.target is not None)
        return self.steps_per_iteration == 1 and not needs_logprobs

    def validate(self) -> None:
        check(self.total_episodes >= 0, "total_episodes", f"must be >= 0, got {self.total_episodes}")
        check_choice(self.advantage, ESTIMATORS, "advantage")
        least = 1 if self.advantage == "reinforce_pp" else 2
        check(self.group_size >= least, "group_size", f"must be >= {least} for {self.advantage}, got {self.group_size}")
        check_choice(self.kl_in, ("loss", "reward"), "kl_in")
        check(self.ppo_epochs >= 1, "ppo_epochs", f"must be >= 1, got {self.ppo_epochs}")
        check(self.clip_low >= 0 and self.clip_high >= 0, "clip_low", "clip_low and clip_high must be >= 0")
        check_choice(self.importance_ratio, ("token", "sequence"), "importance_ratio")
        check_choice(self.loss_aggregation, AGGREGATE_MODES, "loss_aggregation")
        check_choice(self.overlong, ("keep", "filter", "penalty"), "overlong")
        check(
            0 < self.overlong_buffer <= self.rollout.max_new_tokens,
            "overlong_buffer",
            f"must be in [1, rollout.max_new_tokens ({self.rollout.max_new_tokens})], got {self.overlong_buffer}",
        )
        check(self.overlong_factor >= 0, "overlong_factor", f"must be >= 0, got {self.overlong_factor}")
        check(self.samples_every >= 0 and self.num_samples >= 0, "samples_every", "samples_every and num_samples >= 0")
        check_stop_rules(self.stop_when)
        check(
            self.kl.target is None or self.kl.coef > 0,
            "kl.target",
            "an adaptive KL coefficient needs kl.coef > 0 to start from",
        )
        check(
            self.episodes_per_iteration % self.train.batch_size == 0,
            "train.batch_size",
            f"must divide rollout.batch_size x group_size ({self.episodes_per_iteration}), got {self.train.batch_size}",
        )
        check(
            self.data.max_prompt_length + self.rollout.max_new_tokens <= self.data.max_length,
            "rollout.max_new_tokens",
            f"data.max_prompt_length ({self.data.max_prompt_length}) + max_new_tokens "
            f"({self.rollout.max_new_tokens}) must fit data.max_length ({self.data.max_length})",
        )


# ---------------------------------------------------------------------------------------------- advantages


class GroupTokens(NamedTuple):
    """What the loss reads per response token of the rollout batch: (B, T) each, 0 on padding."""

    old_logprobs: Tensor | None  # log-probs under the sampling policy (the ratio's denominator); None: the
    # step's own log-probs, detached (`Config.single_update`)
    advantages: Tensor  # the sequence's advantage on each of its tokens (REINFORCE++: per token)
    loss_mask: Tensor  # response mask, 0 for the rows left out of the loss (dynamic sampling, overlong filter)
    ref_logprobs: Tensor | None  # the reference's log-probs, for the KL in the loss; else None


@dataclass
class Estimates:
    shaped: Tensor  # (N,) scores after reward shaping and the overlong penalty (before any KL)
    kl: Tensor  # (N, T) per-token KL estimate to the reference (0 without one)
    advantages: Tensor  # (N, T)
    keep: Tensor  # (N,) bool: the row is in the loss
    zero_std: Tensor  # (G,) bool: the group's shaped scores are all equal


def estimate_advantages(cfg: Config, exp: Experience, beta: float, sum_over: SumOver | None = None) -> Estimates:
    """Shaped scores, the KL to the reference, the estimator's advantages and the rows kept in the loss. The
    batch statistics (score normalising, REINFORCE++'s normalisation) are the global batch's with `sum_over`;
    the group statistics need none, a group being on one process."""
    mask, k = exp.mask, exp.group_size
    shaped = shape_scores(
        exp.scores.to(mask.device), exp.ended_with_eos, exp.lengths, **cfg.reward.shaping, sum_over=sum_over
    )
    if cfg.overlong == "penalty":
        penalty = overlong_penalty(exp.lengths, cfg.rollout.max_new_tokens, cfg.overlong_buffer)
        shaped = shaped + cfg.overlong_factor * penalty
    kl = torch.zeros_like(mask)
    if exp.logprobs is not None and exp.ref_logprobs is not None:
        kl = masked_kl(exp.logprobs, exp.ref_logprobs, mask, kind=cfg.kl.estimator)
    beta_reward = beta if cfg.kl_in == "reward" else 0.0
    total = shaped - beta_reward * kl.sum(-1)  # (N,) the sequence reward
    if cfg.advantage == "reinforce_pp":
        rewards = score_at_last_token(shaped, mask) - beta_reward * kl  # (N, T)
        advantages = batch_normalized_advantages(rewards, mask, sum_over=sum_over)
    elif cfg.advantage == "rloo":
        advantages = rloo_advantages(total, k)[:, None] * mask
    else:
        advantages = group_advantages(total, k, scale=cfg.scale_by_std)[:, None] * mask
    groups = total.view(-1, k)
    zero_std = (groups == groups[:, :1]).all(-1)  # (G,)
    keep = torch.ones_like(shaped, dtype=torch.bool)
    if cfg.drop_zero_std_groups:
        keep &= ~zero_std.repeat_interleave(k)
    if cfg.overlong == "filter":
        keep &= exp.ended_with_eos.to(keep.device)
    return Estimates(shaped, kl, advantages, keep, zero_std)


def rollout_batch(
    cfg: Config, exp: Experience, beta: float, sum_over: SumOver | None = None
) -> tuple[RolloutBatch[GroupTokens], dict[str, Tensor]]:
    """The batch the updates read, and the iteration's rollout statistics (scalar tensors)."""
    est = estimate_advantages(cfg, exp, beta, sum_over)
    loss_mask = exp.mask * est.keep[:, None]
    ref = exp.ref_logprobs if cfg.kl_in == "loss" and cfg.uses_reference else None
    batch = exp.sequences.with_tokens(GroupTokens(exp.logprobs, est.advantages, loss_mask, ref))
    stats = {
        **exp.stats(),
        "reward/shaped": est.shaped.mean(),
        "reward/zero_std_fraction": est.zero_std.float().mean(),
        "grpo/kept_fraction": est.keep.float().mean(),
    }
    if exp.logprobs is not None and exp.ref_logprobs is not None:
        stats["objective/kl"] = est.kl.sum(-1).mean()
    return batch, stats


# ---------------------------------------------------------------------------------------------- the loss


def grpo_loss(model: nn.Module, mb: RolloutBatch[GroupTokens], cfg: Config) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """The engine's loss_fn: (sum of the per-unit loss, units, metric sums) of one micro-batch.

    Units are the kept rows' tokens (token_mean) or the kept rows (seq_* modes), by `aggregate_parts` over the
    loss mask, so accumulating micro-batches gives exactly the minibatch's aggregate.
    """
    t, mask = mb.tokens, mb.tokens.loss_mask
    kw = {"response_len": mb.response_len, "temperature": cfg.rollout.temperature, "flat": mb.flat}
    out = causal_lm_logprobs(model, mb.input_ids, mb.attention_mask, with_entropy=True, **kw)
    logprobs = out.logprobs
    old = logprobs.detach() if t.old_logprobs is None else t.old_logprobs
    if cfg.importance_ratio == "sequence":
        logprobs, old = sequence_log_ratio(logprobs, old, mb.response_mask), torch.zeros_like(old)
    pg_loss, pg = ppo_policy_loss(logprobs, old, t.advantages, clip_low=cfg.clip_low, clip_high=cfg.clip_high)
    loss = pg_loss
    kl = None
    if t.ref_logprobs is not None:
        kl = kl_penalty(out.logprobs, t.ref_logprobs, kind=cfg.kl.estimator)
        loss = loss + cfg.kl.coef * kl
    scale = 1.0 / cfg.rollout.max_new_tokens if cfg.loss_aggregation == "seq_mean_token_sum" else 1.0

    def part(x: Tensor) -> Tensor:
        return aggregate_parts(x, mask, mode=cfg.loss_aggregation)[0] * scale

    loss_sum, units = aggregate_parts(loss, mask, mode=cfg.loss_aggregation)
    metrics = {
        "policy/loss": part(pg_loss).detach(),
        "policy/clipfrac": part(pg["clipfrac"]),
        "policy/approx_kl": part(pg["approx_kl"]),
        "policy/ratio": part(pg["ratio"]),
    }
    if out.entropy is not None:
        metrics["policy/entropy"] = part(out.entropy.detach())
    if kl is not None:
        metrics["policy/kl"] = part(kl).detach()
    return loss_sum * scale, units, metrics


# ---------------------------------------------------------------------------------------------- the loop


def load_models(cfg: Config) -> tuple[nn.Module, nn.Module | None]:
    """The policy (dropout off, LoRA applied) and the frozen reference (None when beta is 0)."""
    if not cfg.model.path:
        raise UserError("model.path: no policy checkpoint given (usually the SFT run's final/ directory)")
    policy = load_causal_lm(cfg.model, trainable=True)
    disable_dropout(policy)
    policy = apply_lora(policy, cfg.model.lora)
    reference = reference_policy(policy, cfg.ref) if cfg.uses_reference else None
    return policy, reference


def train(cfg: Config) -> Path:
    """Run the group method; return the run directory (final/ holds the policy)."""
    seed_everything(cfg.seed)
    tokenizer = load_model_tokenizer(cfg.model)
    policy, reference = load_models(cfg)
    reward_models = load_reward_models(
        cfg.reward,
        cfg.data,
        forward_batch_size=cfg.rollout.forward_batch_size,
        dtype=cfg.model.dtype,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    reward = build_reward(cfg.reward, reward_models)
    splits = load_splits(cfg.data, "prompt", tokenizer, seed=cfg.seed)
    prompts = splits.train
    iterations = count_iterations(cfg, len(prompts))
    evaluator = OnlineEvaluator(cfg.eval, splits.eval, reward, seed=cfg.seed)
    engine = make_engine(policy, cfg, iterations * cfg.steps_per_iteration, data_report=splits.report)
    with engine:
        if reference is not None:
            reference.to(engine.device)
        move_reward_models(reward_models, engine.device)
        loop = IterationLoop(
            engine,
            cfg,
            prompts,
            iterations,
            name="grpo",
            evaluator=evaluator,
            reference=reference,
            tokenizer=tokenizer,
        )
        loss_fn = functools.partial(grpo_loss, cfg=cfg)
        flat = padding_free.enabled(policy)
        for it in loop:
            exp = make_experience(
                engine.unwrapped_model,
                reference,
                reward,
                tokenizer,
                it.examples,
                cfg.rollout,
                group_size=cfg.group_size,
                actor_pass=not cfg.single_update,
                keys=it.keys,
            )
            batch, stats_t = rollout_batch(cfg, exp, it.kl_coef, engine.sum_over_processes)
            stats = loop.rollout_stats(stats_t, exp)
            t0 = time.perf_counter()
            logged, train_tokens = run_updates(
                engine,
                batch.to(engine.device),
                loss_fn,
                epochs=cfg.ppo_epochs,
                minibatches=cfg.minibatches,
                seed=cfg.seed,
                iteration=it.index,
                flat=flat,
                group_size=cfg.group_size,
            )
            train_s = time.perf_counter() - t0
            rollout_s = exp.generation_s + exp.scoring_s
            loop.end(
                it,
                logged,
                stats,
                policy=engine.unwrapped_model,
                completions=exp.completions,
                scores=exp.scores,
                perf={
                    "perf/completions_per_s": len(exp) / max(rollout_s + train_s, 1e-9),
                    "perf/generation_s": exp.generation_s,
                    "perf/scoring_s": exp.scoring_s,
                    "perf/train_s": train_s,
                    "perf/generation_tokens_per_s": float(exp.lengths.sum()) / max(exp.generation_s, 1e-9),
                    "perf/train_tokens_per_s": train_tokens / max(train_s, 1e-9),
                },
            )
        save_final(engine, engine.unwrapped_model, tokenizer, base_path=cfg.model.path)
        loop.close()
    return engine.run_dir
