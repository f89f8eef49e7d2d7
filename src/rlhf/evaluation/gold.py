"""Score a policy on held-out prompts with a Python (gold) reward function: greedy answers, mean score, length.

Greedy decoding makes the figure deterministic for a checkpoint, so the stages of a pipeline can be compared
by one number each (the demo's summary table).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig

from rlhf.config import DataConfig, ModelConfig
from rlhf.data import collate_prompts, records_from_rows, tokenize_records
from rlhf.models.loading import load_causal_lm, load_tokenizer
from rlhf.rollout.generation import generate_as_configured, mask_after_eos
from rlhf.rollout.rewards import FunctionReward, load_reward_function


@torch.no_grad()
def greedy_responses(
    model_dir: str | Path, rows: Sequence[dict[str, Any]], *, max_new_tokens: int = 16, batch_size: int = 32
) -> tuple[list[str], list[dict[str, Any]]]:
    """Greedy completions (decoded, special tokens dropped) of prompt rows, and the rows' prompts/extras."""
    tokenizer = load_tokenizer(str(model_dir))
    model = load_causal_lm(ModelConfig(path=str(model_dir)), trainable=False)
    records, _ = records_from_rows(list(rows), "prompt")
    examples, _ = tokenize_records(records, "prompt", tokenizer, DataConfig())
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    texts: list[str] = []
    for start in range(0, len(examples), batch_size):
        batch = collate_prompts(examples[start : start + batch_size], tokenizer.pad_token_id)
        out = generate_as_configured(model, batch["input_ids"], batch["attention_mask"], config)
        ids, _, _ = mask_after_eos(
            out[:, batch["input_ids"].shape[1] :], tokenizer.eos_token_id, tokenizer.pad_token_id
        )
        texts += tokenizer.batch_decode(ids, skip_special_tokens=True)
    return texts, examples


def gold_eval(
    model_dir: str | Path, rows: Sequence[dict[str, Any]], reward_fn: str, *, max_new_tokens: int = 16
) -> dict[str, float]:
    """`gold/score` (mean reward of greedy answers), `gold/exact` (fraction scoring 1.0), `response/length` (chars)."""
    texts, examples = greedy_responses(model_dir, rows, max_new_tokens=max_new_tokens)
    prompts = [ex["prompt"] for ex in examples]
    scores = FunctionReward(load_reward_function(reward_fn), reward_fn).score(
        prompts, texts, [ex["extra"] for ex in examples]
    )
    return {
        "gold/score": scores.mean().item(),
        "gold/exact": (scores == 1.0).float().mean().item(),
        "response/length": sum(len(t) for t in texts) / max(1, len(texts)),
    }
