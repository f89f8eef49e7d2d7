"""Reward sources: a reward model, a Python function, or a weighted ensemble of several.

Every source scores decoded text, so a reward model whose tokenizer differs from the policy's works: the
response is decoded with the policy's tokenizer and re-tokenized with the reward model's own tokenizer and
chat template, exactly as `rlhf eval` and reward-model training tokenize it.

A Python reward function is named `module:function` and called as

    function(prompts: list[str | list[dict]], completions: list[str], **columns) -> list[float]

where `columns` holds every extra field of the prompt rows as lists (`letters=[...]` for the built-in task). It
may return any array-like of real numbers (a list, a tuple, a numpy array, a tensor), one per completion. A
function that raises, or returns the wrong number of scores, a non-number or a non-finite one (in float32),
stops the run with a `RewardError` naming it: nothing is ever trained on such a score.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
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
    """The function named `module:function` (imported with the working directory on the path, as `python -m`
    would) or `path/to/file.py:function` (the file loaded as a module of its own)."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise RewardError(f"reward function {spec!r}: expected 'module:function' or 'path/to/file.py:function'")
    try:
        module = _import_file(module_name) if module_name.endswith(".py") else _import_module(module_name)
    except ImportError as exc:
        raise RewardError(f"reward function {spec!r}: cannot import {module_name!r} ({exc})") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardError(f"reward function {spec!r}: {module_name!r} has no callable {attr!r}")
    return fn


def _import_module(name: str) -> Any:
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # the `rlhf` console script, unlike `python -m`, leaves it out
    return importlib.import_module(name)


def _import_file(path: str) -> Any:
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise ImportError(f"no such file: {file}")
    name = f"rlhf_reward_{file.stem}_{hashlib.sha1(str(file).encode()).hexdigest()[:10]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {file} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise ImportError(f"{type(exc).__name__}: {exc}") from exc
    return module


def checked_scores(raw: Any, n: int, name: str) -> Tensor:
    """`raw` (any array-like of real numbers) as (n,) float32 on the CPU; `RewardError` naming `name` when it is
    not numbers, not n of them, or not finite in float32 (1e39 is inf there)."""
    values = np.asarray(raw.detach().cpu() if isinstance(raw, Tensor) else raw)
    if values.dtype.kind not in "biuf":
        raise RewardError(f"reward {name}: returned {values.dtype} values ({raw!r:.80}), expected real numbers")
    if values.shape != (n,):
        shape = "" if values.ndim == 1 else f" (shape {values.shape})"
        raise RewardError(f"reward {name}: returned {values.size} scores{shape} for {n} completions")
    scores = torch.from_numpy(values.astype(np.float32))
    bad = (~torch.isfinite(scores)).nonzero()
    if len(bad):
        i = int(bad[0])
        raise RewardError(f"reward {name}: score {i} is {values[i].item()!r}, expected a finite number (in float32)")
    return scores


def source_name(source: RewardSource) -> str:
    return str(getattr(source, "name", type(source).__name__))


class FunctionReward:
    """A Python reward function over decoded text."""

    def __init__(self, fn: Callable[..., Sequence[float]], name: str = "function") -> None:
        self.fn = fn
        self.name = name

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str], extras: Sequence[dict[str, Any]]) -> Tensor:
        columns: dict[str, list[Any]] = {key: [row.get(key) for row in extras] for key in (extras[0] if extras else {})}
        try:
            raw = self.fn(list(prompts), list(completions), **columns)
        except Exception as exc:
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            raise RewardError(
                f"reward {self.name} raised {type(exc).__name__}: {exc} (at {frame.filename}:{frame.lineno})"
            ) from exc
        return checked_scores(raw, len(completions), self.name)


def reward_input_ids(
    prompts: Sequence[Prompt], completions: Sequence[str], tokenizer: PreTrainedTokenizerBase, cfg: DataConfig
) -> list[tuple[list[int], list[int]]]:
    """Token ids of each (prompt, completion), as (prompt part, completion part), exactly as reward-model training
    tokenizes a (prompt, chosen) pair: for message-list prompts the whole conversation as the chat template writes
    it (the completion becomes one assistant turn; `apply_chat_template(..., tokenize=True)`'s tokens), the BOS
    rule and truncation of `rlhf.data.tokenize`. Rows with equal prompts (a group's) have the prompt rendered and
    encoded once, and share its ids."""
    from rlhf.data.tokenize import tokenize_responses

    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    rows_of: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        rows_of.setdefault(repr(prompt), []).append(i)
    ids: list[tuple[list[int], list[int]]] = [([], []) for _ in prompts]
    for rows in rows_of.values():
        prompt = prompts[rows[0]]
        responses: list[Prompt] = [
            [{"role": "assistant", "content": completions[i]}] if isinstance(prompt, list) else completions[i]
            for i in rows
        ]
        prompt_ids, response_ids = tokenize_responses(prompt, responses, tokenizer, cfg, whole_turns=True)
        for i, response in zip(rows, response_ids, strict=True):
            ids[i] = (prompt_ids, response)
    return ids


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
        ids = reward_input_ids(prompts, completions, self.tokenizer, self.data)
        out = []
        for start in range(0, len(ids), self.batch_size):  # rows as a rollout's: [left-padded prompt | completion]
            chunk = ids[start : start + self.batch_size]
            P, R = max(len(p) for p, _ in chunk), max(len(r) for _, r in chunk)
            rows = [[pad_id] * (P - len(p)) + p + r + [pad_id] * (R - len(r)) for p, r in chunk]
            mask = [[0] * (P - len(p)) + [1] * (len(p) + len(r)) + [0] * (R - len(r)) for p, r in chunk]
            input_ids, mask_t = torch.tensor(rows, device=device), torch.tensor(mask, device=device)
            flat = Unpadded.of(mask_t, input_ids, prompt_len=P)  # a group's prompt runs once
            out.append(sequence_scores(self.model, input_ids, mask_t, flat=flat).float().cpu())
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
        return self.score_and_spread(prompts, completions, extras)[0]

    def score_and_spread(
        self, prompts: Sequence[Prompt], completions: Sequence[str], extras: Sequence[dict[str, Any]]
    ) -> tuple[Tensor, Tensor]:
        """(score, std) per completion, (B,) each: the members' disagreement is a reward-hacking signal."""
        n = len(completions)
        scores = torch.stack(
            [checked_scores(s.score(prompts, completions, extras), n, source_name(s)) for s in self.sources]
        )  # (M, B)
        w = torch.tensor(self.weights or [1.0] * len(self.sources), dtype=scores.dtype)[:, None]  # (M, 1)
        mean = (w * scores).sum(0) / w.sum()
        std = ((w * (scores - mean) ** 2).sum(0) / w.sum()).sqrt()
        return mean - self.uncertainty_penalty * std, std
