"""Helpers of the PPO tests: prompt files, a quick supervised warm-start of the tiny model, a slow reward.

`slow_gold_reward` is importable as `_ppo_helpers:slow_gold_reward` by a subprocess that has this folder on its
PYTHONPATH: it paces a run (so a test can kill it mid-way) without changing what it computes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rlhf.tasks.sorting import gold_reward, prompt_rows, sft_rows


def write_prompts(path: Path, n: int, seed: int = 0) -> Path:
    """The built-in task's prompt rows (`prompt` + `letters`) as a .jsonl file."""
    path.write_text("".join(json.dumps(row) + "\n" for row in prompt_rows(n, seed=seed)))
    return path


def slow_gold_reward(
    prompts: Sequence[Any], completions: Sequence[str], letters: Sequence[str], **_: Any
) -> list[float]:
    """`gold_reward`, 50 ms later."""
    time.sleep(0.05)
    return gold_reward(prompts, completions, letters)


def sft_warm_start(base_dir: str, out_dir: Path, *, steps: int = 60, lr: float = 3e-3, seed: int = 0) -> Path:
    """A few dozen steps of supervised learning on the task's demonstrations (token-mean cross-entropy), so PPO
    starts from a policy that writes short letter strings ending with EOS. Saved with its tokenizer to `out_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.config import DataConfig
    from rlhf.data import collate_sft, records_from_rows, tokenize_records
    from rlhf.losses import aggregate, sft_loss

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir).train()
    records, _ = records_from_rows(sft_rows(256, seed=seed + 1), "sft")
    examples, _ = tokenize_records(records, "sft", tokenizer, DataConfig(max_length=40, max_prompt_length=24))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(examples), (32,), generator=g).tolist()
        batch = collate_sft([examples[i] for i in idx], tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        loss, mask = sft_loss(logits, batch["labels"][:, 1:])
        aggregate(loss, mask).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]
