"""Padding sides, pair ordering, masks and packing (rlhf.data.collate)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from rlhf.config import DataConfig
from rlhf.data import (
    collate_pairs,
    collate_prompts,
    collate_sft,
    collate_unpaired,
    pack_sft,
    parse_row,
    tokenize_sft,
)

P = -100


def test_collate_sft_right_pads_and_masks_labels_at_pads() -> None:
    examples = [
        {"input_ids": [1, 10, 11, 12, 2], "labels": [P, P, 11, 12, 2]},
        {"input_ids": [1, 20, 2], "labels": [P, 20, 2]},
    ]
    batch = collate_sft(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 10, 11, 12, 2], [1, 20, 2, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[P, P, 11, 12, 2], [P, 20, 2, P, P]]
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["attention_mask"].dtype == torch.long
    assert "position_ids" not in batch


def test_pad_equal_eos_keeps_eos_in_labels(tokenizers: dict[str, Any]) -> None:
    """gpt2: pad id == eos id == 2. Masks come from lengths, so the real EOS keeps its label."""
    tok = tokenizers["gpt2"]
    assert tok.pad_token_id == tok.eos_token_id == 2
    cfg = DataConfig()
    short = tokenize_sft(parse_row({"prompt": "a", "completion": "b"}, "sft"), tok, cfg)
    long = tokenize_sft(parse_row({"prompt": "abc", "completion": "defg"}, "sft"), tok, cfg)
    batch = collate_sft([short, long], pad_id=tok.pad_token_id)
    assert batch["input_ids"].tolist()[0] == [71, 72, 2, 2, 2, 2, 2, 2]  # "a" "b" EOS, then pads (also 2)
    assert batch["labels"].tolist()[0] == [P, 72, 2, P, P, P, P, P]
    assert batch["labels"][1, -1].item() == 2
    assert (batch["labels"] == 2).sum().item() == 2  # one EOS label per row, none on the pads


def test_collate_pairs_chosen_rows_first_then_rejected() -> None:
    examples = [
        {"prompt_ids": [1, 5], "chosen_ids": [10, 2], "rejected_ids": [11, 12, 2], "margin": 0.5},
        {"prompt_ids": [1, 6, 7], "chosen_ids": [20, 2], "rejected_ids": [21, 2], "margin": None},
    ]
    batch = collate_pairs(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [
        [1, 5, 10, 2, 0],  # chosen 0
        [1, 6, 7, 20, 2],  # chosen 1
        [1, 5, 11, 12, 2],  # rejected 0
        [1, 6, 7, 21, 2],  # rejected 1
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert batch["response_mask"].tolist() == [
        [0.0, 0.0, 1.0, 1.0, 0.0],
        [0.0, 0.0, 0.0, 1.0, 1.0],
        [0.0, 0.0, 1.0, 1.0, 1.0],
        [0.0, 0.0, 0.0, 1.0, 1.0],
    ]
    assert batch["response_mask"].dtype == torch.float32 and batch["input_ids"].dtype == torch.long
    assert batch["margin"].tolist() == [0.5, 0.0]
    no_margin = [{**ex, "margin": None} for ex in examples]
    assert "margin" not in collate_pairs(no_margin, pad_id=0)


def test_collate_unpaired() -> None:
    examples = [
        {"prompt_ids": [1, 5], "completion_ids": [10, 2], "label": True},
        {"prompt_ids": [1], "completion_ids": [20, 2], "label": False},
    ]
    batch = collate_unpaired(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 10, 2], [1, 20, 2, 0]]
    assert batch["response_mask"].tolist() == [[0.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]]
    assert batch["label"].tolist() == [True, False] and batch["label"].dtype == torch.bool


def test_collate_prompts_left_pads() -> None:
    batch = collate_prompts([{"prompt_ids": [1, 5, 6]}, {"prompt_ids": [1, 6]}, {"prompt_ids": [9]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6], [0, 1, 6], [0, 0, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1], [0, 0, 1]]
    assert batch["input_ids"][:, -1].tolist() == [6, 6, 9]  # every prompt ends at the last column


def test_empty_batch_is_an_error() -> None:
    with pytest.raises(ValueError, match="empty batch"):
        collate_prompts([], pad_id=0)


def _example(start: int, n: int, prompt: int = 1) -> dict[str, Any]:
    ids = list(range(start, start + n))
    return {"input_ids": ids, "labels": [P] * prompt + ids[prompt:], "prompt_len": prompt}


def test_pack_sft_greedy_boundaries_positions_and_labels() -> None:
    examples = [_example(10, 5), _example(20, 4, prompt=0), _example(30, 3), _example(40, 6)]
    packs = pack_sft(examples, max_length=10)
    assert [p["seq_lens"] for p in packs] == [[5, 4], [3, 6]]
    first = packs[0]
    assert first["input_ids"] == [10, 11, 12, 13, 14, 20, 21, 22, 23]
    assert first["position_ids"] == [0, 1, 2, 3, 4, 0, 1, 2, 3]
    # the label of each example's first token is masked (here 20, which was a loss token), so nothing is
    # learned across the boundary from 14 to 20
    assert first["labels"] == [P, 11, 12, 13, 14, P, 21, 22, 23]
    assert packs[1]["position_ids"] == [0, 1, 2, 0, 1, 2, 3, 4, 5]
    batch = collate_sft(packs, pad_id=0)
    assert batch["input_ids"].shape == (2, 9)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3], [0, 1, 2, 0, 1, 2, 3, 4, 5]]
    assert sum(len(p["input_ids"]) for p in packs) == 18  # nothing lost


def test_pack_sft_rejects_examples_longer_than_max_length() -> None:
    with pytest.raises(ValueError, match="an example of 12 tokens does not fit max_length 10"):
        pack_sft([_example(0, 12)], max_length=10)


def test_import_rlhf_data_is_light() -> None:
    """`rlhf data check` without a tokenizer must not pay for torch, transformers, datasets or pyarrow."""
    import subprocess
    import sys

    heavy = "('torch', 'transformers', 'datasets', 'pyarrow')"
    code = f"import sys, rlhf.data; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
