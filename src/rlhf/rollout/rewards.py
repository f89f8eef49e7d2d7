"""Reward sources: a reward model, a Python function, or a weighted ensemble of several.

Every source scores decoded text, so a reward model whose tokenizer differs from the policy's works: the
response is decoded with the policy's tokenizer and re-tokenized with the reward model's own tokenizer and
chat template, exactly as `rlhf eval` and reward-model training tokenize it.

A Python reward function is named `module:function` and called as

    function(prompts: list[str | list[dict]], completions: list[str], **columns) -> list[float]

where `columns` holds every extra field of the prompt rows as lists (`letters=[...]` for the built-in task).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from rlhf.config import DataConfig
from rlhf.errors import UserError

Prompt = str | list[dict[str, str]]


class RewardSource(Protocol):
    def score(self, prompts: Sequence[Prompt], completions: Sequence[str], extras: Sequence[dict[str, Any]]) -> Tensor:
        """One float32 score per completion, (B,), on the CPU."""
        ...


class RewardError(UserError):
    """A reward function or model that cannot be loaded, or returned something unusable."""


def load_reward_function(spec: str) -> Callable[..., Sequence[float]]:
    """Import `module:function` (a file-system path is not accepted: put the module on PYTHONPATH)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise RewardError(f"reward function {spec!r}: expected 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RewardError(f"reward function {spec!r}: cannot import {module_name!r} ({exc})") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardError(f"reward function {spec!r}: {module_name!r} has no callable {attr!r}")
    return fn


class FunctionReward:
    """A Python reward function over decoded text."""

    def __init__(self, fn: Callable[..., Sequence[float]], name: str = "function") -> None:
        self.fn = fn
        self.name = name

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str], extras: Sequence[dict[str, Any]]) -> Tensor:
        columns: dict[str, list[Any]] = {key: [row.get(key) for row in extras] for key in (extras[0] if extras else {})}
        values = list(self.fn(list(prompts), list(completions), **columns))
        if len(values) != len(completions):
            raise RewardError(f"reward {self.name}: returned {len(values)} scores for {len(completions)} completions")
        bad = [i for i, v in enumerate(values) if not isinstance(v, int | float) or not math.isfinite(v)]
        if bad:
            raise RewardError(f"reward {self.name}: score {bad[0]} is {values[bad[0]]!r}, expected a finite number")
        return torch.tensor(values, dtype=torch.float32)


def reward_input_ids(prompt: Prompt, completion: str, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> list[int]:
    """Token ids of (prompt, completion) exactly as reward-model training tokenizes a (prompt, chosen) pair:
    the chat template for message-list prompts (the completion becomes one assistant turn), BOS/EOS rules and
    truncation of `rlhf.data.tokenize`."""
    from rlhf.data.formats import SFTRecord
    from rlhf.data.tokenize import tokenize_sft

    response: Prompt = [{"role": "assistant", "content": completion}] if isinstance(prompt, list) else completion
    return list(tokenize_sft(SFTRecord(prompt=prompt, completion=response), tokenizer, cfg)["input_ids"])


class RewardModelReward:
    """A one-label sequence-classification model, scored on text re-tokenized with its own tokenizer."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        data: DataConfig | None = None,
        *,
        batch_size: int = 16,
        name: str = "reward_model",
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.data = data or DataConfig()
        self.batch_size = batch_size
        self.name = name

    @torch.no_grad()
    def score(self, prompts: Sequence[Prompt], completions: Sequence[str], extras: Sequence[dict[str, Any]]) -> Tensor:
        from rlhf.models.forward import Unpadded, sequence_scores

        device = next(self.model.parameters()).device
        pad_id = self.tokenizer.pad_token_id
        ids = [reward_input_ids(p, c, self.tokenizer, self.data) for p, c in zip(prompts, completions, strict=True)]
        out = []
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start : start + self.batch_size]
            width = max(len(x) for x in chunk)
            input_ids = torch.tensor([x + [pad_id] * (width - len(x)) for x in chunk], device=device)
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in chunk], device=device)
            out.append(sequence_scores(self.model, input_ids, mask, flat=Unpadded.of(mask)).float().cpu())
        return torch.cat(out)


@dataclass
class EnsembleReward:
    """Weighted mean of several sources, minus `uncertainty_penalty` times their weighted standard deviation.

        mean = sum_m w_m s_m / sum_m w_m
        std  = sqrt(sum_m w_m (s_m - mean)^2 / sum_m w_m)
        score = mean - k * std

    The penalty discourages responses the members disagree on, a common guard against reward hacking
    (Coste et al. 2024, "Reward model ensembles help mitigate overoptimization", Sec. 3).
    """

    sources: list[RewardSource]
    weights: list[float] = field(default_factory=list)
    uncertainty_penalty: float = 0.0

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str], extras: Sequence[dict[str, Any]]) -> Tensor:
        scores = torch.stack([s.score(prompts, completions, extras) for s in self.sources])  # (M, B)
        w = torch.tensor(self.weights or [1.0] * len(self.sources), dtype=scores.dtype)[:, None]  # (M, 1)
        mean = (w * scores).sum(0) / w.sum()
        if self.uncertainty_penalty == 0.0:
            return mean
        std = ((w * (scores - mean) ** 2).sum(0) / w.sum()).sqrt()
        return mean - self.uncertainty_penalty * std
