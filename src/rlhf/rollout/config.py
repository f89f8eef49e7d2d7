"""Config sections shared by the online trainers (PPO, GRPO, RLOO): how rollouts are sampled and how they are scored.

    rollout:   prompts per iteration, sampling settings, the batch size of no-grad scoring passes
    reward:    where the sequence score comes from (reward models, Python functions, a weighted ensemble) and
               how it is shaped before it reaches the advantages (EOS and length penalties, normalising, clipping)
    kl:        the KL term to the reference: coefficient, estimator, and an optional adaptive controller
    eval:      the policy evaluated on held-out prompts during training (gold next to proxy, against KL)

`build_reward(cfg.reward, load_reward_models(...))` turns the reward section into one `RewardSource`;
`kl_controller(cfg.kl)` gives the controller (fixed or adaptive) with its state for resume.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from rlhf.config import DataConfig, ModelConfig, check
from rlhf.errors import UserError
from rlhf.losses.kl import AdaptiveKLController, FixedKLController, KLController
from rlhf.rollout.generation import SamplingConfig
from rlhf.rollout.rewards import (
    EnsembleReward,
    FunctionReward,
    RewardModelReward,
    RewardSource,
    load_reward_function,
)


@dataclass
class RolloutConfig:
    batch_size: int = 64
    """Prompts drawn per iteration (PPO: one response each, the batch that is split into minibatches of
    `train.batch_size` for the updates)."""
    forward_batch_size: int = 64
    """Rows per no-grad forward pass when a rollout is scored (old and reference log-probs, values) and per
    `generate` call; lower it to save memory."""
    max_new_tokens: int = 32
    """Tokens generated per response at most (`data.max_prompt_length` + this must fit `data.max_length`)."""
    temperature: float = 1.0
    """Sampling temperature; the log-probs of the policy and the reference are taken at the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens with this total probability (1.0: off)."""
    top_k: int = 0
    """Keep only the k most likely tokens when sampling (0: off)."""

    def validate(self) -> None:
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.forward_batch_size >= 1, "forward_batch_size", f"must be >= 1, got {self.forward_batch_size}")
        check(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        check(self.temperature > 0, "temperature", f"must be > 0 (rollouts always sample), got {self.temperature}")
        check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        check(self.top_k >= 0, "top_k", f"must be >= 0 (0: off), got {self.top_k}")

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.max_new_tokens, self.temperature, self.top_p, self.top_k)


@dataclass
class RewardConfig:
    model: str | None = None
    """A reward-model directory (a one-label AutoModelForSequenceClassification). Responses are decoded with the
    policy's tokenizer and re-tokenized with the reward model's own tokenizer and chat template."""
    function: str | None = None
    """A Python reward `module:function` or `path/to/file.py:function`, called as f(prompts, completions,
    **columns) with every extra field of the prompt rows as a list (`rlhf.tasks.sorting:gold_reward`)."""
    models: list[str] = field(default_factory=list)
    """More reward-model directories, scored as an ensemble with the others."""
    functions: list[str] = field(default_factory=list)
    """More Python reward functions, scored as an ensemble with the others."""
    weights: list[float] = field(default_factory=list)
    """Ensemble weights, in the order model, models..., function, functions... (empty: equal weights)."""
    uncertainty_penalty: float = 0.0
    """Ensemble score = weighted mean - this x weighted standard deviation of the members (Coste et al. 2024)."""
    batch_size: int | None = None
    """Rows per reward-model forward pass; null: `rollout.forward_batch_size` (set it lower for a reward model
    much larger than the policy)."""
    missing_eos_penalty: float = 0.0
    """Subtracted from the score of a response that hit max_new_tokens without an EOS."""
    length_penalty: float = 0.0
    """Subtracted from the score per response token (EOS included)."""
    normalize: bool = False
    """Whiten the (penalised) scores over each rollout batch: zero mean, unit standard deviation."""
    clip: float | None = None
    """Clip the shaped score to [-clip, clip] (null: no clipping)."""

    def validate(self) -> None:
        n = len(self.model_paths) + len(self.function_specs)
        check(
            not self.weights or len(self.weights) == n,
            "weights",
            f"needs one weight per source ({n}), got {len(self.weights)}",
        )
        check(all(w >= 0 for w in self.weights), "weights", f"must be >= 0, got {self.weights}")
        check(not self.weights or sum(self.weights) > 0, "weights", "must not all be 0")
        check(self.uncertainty_penalty >= 0, "uncertainty_penalty", f"must be >= 0, got {self.uncertainty_penalty}")
        check(self.batch_size is None or self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.missing_eos_penalty >= 0, "missing_eos_penalty", f"must be >= 0, got {self.missing_eos_penalty}")
        check(self.length_penalty >= 0, "length_penalty", f"must be >= 0, got {self.length_penalty}")
        check(self.clip is None or self.clip > 0, "clip", f"must be > 0 or null, got {self.clip}")

    @property
    def shaping(self) -> dict[str, Any]:
        """Keyword arguments of `rollout.shaping.shape_scores`."""
        return {
            "missing_eos_penalty": self.missing_eos_penalty,
            "length_penalty": self.length_penalty,
            "normalize": self.normalize,
            "clip": self.clip,
        }

    @property
    def model_paths(self) -> list[str]:
        """Reward-model directories in ensemble order."""
        return ([self.model] if self.model else []) + list(self.models)

    @property
    def function_specs(self) -> list[str]:
        """`module:function` names in ensemble order (after the models)."""
        return ([self.function] if self.function else []) + list(self.functions)


def load_reward_models(
    cfg: RewardConfig,
    data: DataConfig,
    *,
    forward_batch_size: int,
    dtype: str = "float32",
    trust_remote_code: bool = False,
) -> list[RewardModelReward]:
    """Each reward model, frozen, in eval mode, dropout off, with its own tokenizer (still on the CPU), scoring
    `cfg.batch_size` rows per forward pass, else `forward_batch_size` (the rollout's)."""
    from rlhf.models.loading import disable_dropout, load_scalar_model, load_tokenizer

    sources = []
    for path in cfg.model_paths:
        model = load_scalar_model(
            ModelConfig(path=path, dtype=dtype, trust_remote_code=trust_remote_code), trainable=False
        )
        disable_dropout(model)
        tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
        rows = cfg.batch_size or forward_batch_size
        sources.append(RewardModelReward(model, tokenizer, data, batch_size=rows, name=path))
    return sources


def build_reward(cfg: RewardConfig, reward_models: list[RewardModelReward]) -> RewardSource:
    """One source for the whole reward section: the single member itself, or a weighted ensemble.

    `reward_models` comes from `load_reward_models` (moved to the device by the caller); the functions are
    imported here. Raises `UserError` when the section names no source at all.
    """
    sources: list[RewardSource] = [*reward_models]
    sources += [FunctionReward(load_reward_function(spec), name=spec) for spec in cfg.function_specs]
    if not sources:
        raise UserError("reward: no reward source given (set reward.model, reward.function, or their lists)")
    if len(sources) == 1 and cfg.uncertainty_penalty == 0:
        return sources[0]
    return EnsembleReward(sources, list(cfg.weights), cfg.uncertainty_penalty)


def move_reward_models(models: list[RewardModelReward], device: torch.device) -> None:
    """Put every reward model on `device` (scores come back on the CPU either way)."""
    for source in models:
        source.model.to(device)


@dataclass
class KLConfig:
    coef: float = 0.05
    """Coefficient beta of the KL term (PPO: the per-token penalty -beta * kl_t in the reward); the starting
    value when adaptive."""
    estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimator (see rlhf.losses.kl); also what `objective/kl` reports."""
    target: float | None = None
    """Adaptive coefficient (Ziegler et al. 2019): steer the mean per-sequence KL (nats) to this; null: fixed."""
    horizon: float = 10000.0
    """Horizon of the adaptive controller, in episodes: a batch of n moves beta by at most 20% x n / horizon."""

    def validate(self) -> None:
        check(self.coef >= 0, "coef", f"must be >= 0, got {self.coef}")
        check(self.target is None or self.target > 0, "target", f"must be > 0 or null, got {self.target}")
        check(self.horizon > 0, "horizon", f"must be > 0, got {self.horizon}")


def kl_controller(cfg: KLConfig) -> KLController:
    """Adaptive when `cfg.target` is set, else fixed at `cfg.coef`."""
    if cfg.target is not None:
        return AdaptiveKLController(cfg.coef, cfg.target, cfg.horizon)
    return FixedKLController(cfg.coef)


@dataclass
class OnlineEvalConfig:
    every: int = 0
    """Evaluate the policy every N iterations and after the last (0: never), on the held-out prompts (`data.eval`
    or `data.eval_fraction`): greedy answers scored by the training reward (`eval/proxy`) and by `gold`
    (`eval/gold`), and the KL to the reference from the policy's own samples (`eval/kl`). Plotted against each
    other they show over-optimisation: the proxy rising while the gold falls."""
    gold: str | None = None
    """A Python reward `module:function` that stands for what you really want (null: proxy and KL only)."""
    prompts: int = 64
    """Held-out prompts per evaluation, at most."""
    kl_samples: int = 2
    """Sampled completions per prompt for the KL estimate (0: no KL)."""

    def validate(self) -> None:
        check(self.every >= 0, "every", f"must be >= 0, got {self.every}")
        check(self.prompts >= 1, "prompts", f"must be >= 1, got {self.prompts}")
        check(self.kl_samples >= 0, "kl_samples", f"must be >= 0, got {self.kl_samples}")
