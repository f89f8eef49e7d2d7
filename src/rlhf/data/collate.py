"""Batches from tokenized examples: right padding for training, left padding for generation, SFT packing.

Masks are built from lengths, never from token ids: a tokenizer whose pad token is its EOS (GPT-2 style)
keeps EOS in the loss, because a real EOS is never mistaken for padding here.

Masks line up with `input_ids` (not shifted): `response_mask[b, t] = 1.0` when `input_ids[b, t]` is a
response token. The log-prob of token t comes from the logits at t - 1, so a trainer pairs
`logits[:, :-1]` with `input_ids[:, 1:]` and `response_mask[:, 1:]` (the same shift the SFT loss applies to
`labels`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from rlhf.data.tokenize import IGNORE_INDEX

Collate = Callable[[Sequence[dict[str, Any]]], dict[str, Any]]
"""Tokenized examples -> one batch (a trainer's collate function with its settings bound)."""


def pad_sequences(
    seqs: Sequence[Sequence[float]], value: float, *, left: bool = False, dtype: torch.dtype = torch.long
) -> torch.Tensor:
    """Stack variable-length sequences into a (B, L) tensor, L the longest, padded on the right (or left)."""
    if not seqs:
        raise ValueError("cannot collate an empty batch")
    length = max(len(s) for s in seqs)
    out = torch.full((len(seqs), length), value, dtype=dtype)
    for i, s in enumerate(seqs):
        if len(s):
            row = torch.tensor(list(s), dtype=dtype)
            if left:
                out[i, length - len(s) :] = row
            else:
                out[i, : len(s)] = row
    return out


def _attention(seqs: Sequence[Sequence[int]], *, left: bool = False) -> torch.Tensor:
    return pad_sequences([[1] * len(s) for s in seqs], 0, left=left)


def collate_sft(examples: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` (long, (B, L)) and `labels` ((B, L), -100 on prompt and pads).

    Packed examples (from `pack_sft`) also give `position_ids` ((B, L), 0 on pads).
    """
    ids = [ex["input_ids"] for ex in examples]
    batch = {
        "input_ids": pad_sequences(ids, pad_id),  # (B, L)
        "attention_mask": _attention(ids),  # (B, L)
        "labels": pad_sequences([ex["labels"] for ex in examples], IGNORE_INDEX),  # (B, L)
    }
    if all("position_ids" in ex for ex in examples):
        batch["position_ids"] = pad_sequences([ex["position_ids"] for ex in examples], 0)
    return batch


def pack_sft(examples: Sequence[dict[str, Any]], max_length: int) -> list[dict[str, Any]]:
    """Greedy packing, in order: append examples to the current sequence until the next would exceed
    `max_length`, then start a new one. Each packed sequence has `input_ids`, `labels`, `position_ids`
    (restarting at 0 for every example) and `seq_lens`.

    The label of each example's first token is masked, so no loss is taken for predicting one example from
    the end of the previous one. Attention is kept within each example when the model finds sequence
    boundaries from `position_ids`: `transformers` v5 does this when the forward gets `position_ids` and no
    attention mask (as the SFT trainer calls it; tested there to equal the unpacked loss). A model or call
    that does not (an attention mask passed, older versions, custom code) lets a token attend to earlier
    examples of its pack: cross-contamination, and no longer exactly the unpacked loss.
    """
    packs: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    for ex in examples:
        n = len(ex["input_ids"])
        if n > max_length:
            raise ValueError(f"an example of {n} tokens does not fit max_length {max_length}; tokenize with it first")
        if current is None or len(current["input_ids"]) + n > max_length:
            current = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []}
            packs.append(current)
        current["input_ids"] += list(ex["input_ids"])
        current["labels"] += [IGNORE_INDEX, *ex["labels"][1:]] if n else []
        current["position_ids"] += list(range(n))
        current["seq_lens"].append(n)
    return packs


def collate_pairs(examples: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """One batch for a single forward over both responses (reward model, DPO family).

    Rows 0..B-1 are prompt + chosen, rows B..2B-1 prompt + rejected, right padded: `input_ids` and
    `attention_mask` (long, (2B, L)), `response_mask` (float, (2B, L), 1.0 on response tokens). When any
    example has a margin, `margin` is a float (B,) tensor (0.0 where missing).
    """
    chosen = [(ex["prompt_ids"], ex["chosen_ids"]) for ex in examples]
    rejected = [(ex["prompt_ids"], ex["rejected_ids"]) for ex in examples]
    return add_margins(_prompt_response_batch(chosen + rejected, pad_id), examples)


def tree_rows(
    examples: Sequence[dict[str, Any]], response_keys: Sequence[str]
) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """Each example as one sequence [prompt | response 1 | ... | response k]: per example its lengths
    [P, R_1, ..., R_k], its token ids, and its positions (0..P-1, then P..P+R_j-1 for every response j: each
    response starts where the prompt ends, as in a row of its own). Attention over such a row needs a tree mask
    (`rlhf.models.padding_free.tree_mask`): no response sees another."""
    spans, rows, positions = [], [], []
    for ex in examples:
        prompt, responses = ex["prompt_ids"], [ex[key] for key in response_keys]
        spans.append([len(prompt), *(len(r) for r in responses)])
        rows.append([*prompt, *(t for r in responses for t in r)])
        positions.append(tree_positions(spans[-1]))
    return spans, rows, positions


def tree_positions(span: Sequence[int]) -> list[int]:
    """Positions of a sequence [prompt | response 1 | ... | response k] of these lengths: 0..P-1, then P..P+R_j-1
    for every response j."""
    prompt, *responses = span
    return [*range(prompt), *(i for r in responses for i in range(prompt, prompt + r))]


def add_margins(batch: dict[str, Any], examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """`batch` with `margin`, a float (B,) tensor of the pairs' margins (0.0 where missing), when any has one."""
    margins = [ex.get("margin") for ex in examples]
    if any(m is not None for m in margins):
        batch["margin"] = torch.tensor([0.0 if m is None else float(m) for m in margins])  # (B,)
    return batch


def collate_unpaired(examples: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """KTO batch: prompt + completion right padded, as in `collate_pairs` but (B, L), plus `label` (B,) bool.

    KTO's KL reference batch (mismatched prompt/completion pairs) is built by the trainer from these examples.
    """
    batch = _prompt_response_batch([(ex["prompt_ids"], ex["completion_ids"]) for ex in examples], pad_id)
    batch["label"] = torch.tensor([bool(ex["label"]) for ex in examples], dtype=torch.bool)  # (B,)
    return batch


def collate_prompts(examples: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """LEFT-padded `input_ids` and `attention_mask` (long, (B, P)), so every prompt ends at the last column
    and generation continues all rows from the same position."""
    ids = [ex["prompt_ids"] for ex in examples]
    return {"input_ids": pad_sequences(ids, pad_id, left=True), "attention_mask": _attention(ids, left=True)}


def _prompt_response_batch(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int
) -> dict[str, torch.Tensor]:
    seqs = [[*p, *r] for p, r in pairs]
    response = [[0.0] * len(p) + [1.0] * len(r) for p, r in pairs]
    return {
        "input_ids": pad_sequences(seqs, pad_id),  # (N, L)
        "attention_mask": _attention(seqs),  # (N, L)
        "response_mask": pad_sequences(response, 0.0, dtype=torch.float),  # (N, L)
    }


def collate_responses(
    examples: Sequence[dict[str, Any]], pad_id: int, response_keys: Sequence[str], *, share_prompt: bool
) -> dict[str, Any]:
    """A batch of len(response_keys) responses per example, as blocks [key 0 rows; key 1 rows; ...].

    `share_prompt`: prompts once, left padded (`prompt_ids`, `prompt_mask` (B, P)) and responses right padded
    (`response_ids` (k*B, R), `response_mask` float); else every prompt+response row in full, right padded
    (`input_ids`, `attention_mask`, `response_mask` (k*B, L), unshifted) with `response_start`.
    """
    prompts = [ex["prompt_ids"] for ex in examples]
    responses = [ex[key] for key in response_keys for ex in examples]
    if share_prompt:
        return {
            "prompt_ids": pad_sequences(prompts, pad_id, left=True),  # (B, P)
            "prompt_mask": pad_sequences([[1] * len(p) for p in prompts], 0, left=True),  # (B, P)
            "response_ids": pad_sequences(responses, pad_id),  # (k*B, R)
            "response_mask": pad_sequences([[1.0] * len(r) for r in responses], 0.0, dtype=torch.float),
        }
    rows = [[*p, *r] for p, r in zip(prompts * len(response_keys), responses, strict=True)]
    return {
        "input_ids": pad_sequences(rows, pad_id),  # (k*B, L)
        "attention_mask": pad_sequences([[1] * len(r) for r in rows], 0),  # (k*B, L)
        "response_mask": pad_sequences(
            [[0.0] * len(p) + [1.0] * len(r) for p, r in zip(prompts * len(response_keys), responses, strict=True)],
            0.0,
            dtype=torch.float,
        ),
        "response_start": min(len(p) for p in prompts),
    }


def to_device(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    """The batch with every value that has a `.to` (tensors, padding-free layouts) moved to `device`; the
    others (ints, lists) as they are."""
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
