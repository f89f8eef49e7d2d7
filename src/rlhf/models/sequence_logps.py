"""Response log-probs of the direct preference trainers (DPO family, SimPO, ORPO, KTO) and of their reference.

`response_logps`: the summed and the length-averaged log-prob of each row's response tokens, from ONE forward
pass over a right-padded prompt+response batch. For pairs, `rlhf.data.collate_responses` lays chosen and
rejected out as 2B rows of one batch, so both responses go through the model together. Positions that are prompt
in every row never reach the LM head (`logits_to_keep`), which for short answers to long prompts is most of the
vocabulary projection and log-softmax saved. With a shared prompt, the prompt runs once and its KV cache serves
every response (`shared_prompt_logits`). Padding-free (`collate_flat`, for models on our attention): every
example as one sequence [prompt | response 1 | ... | response k] under a tree mask, the sequences back to back
in one row, and only the positions that predict a response token through the LM head: no pads, no cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from rlhf.data.collate import tree_rows
from rlhf.losses.logprobs import token_logprobs
from rlhf.losses.reduce import masked_sum
from rlhf.models import padding_free
from rlhf.models.forward import causal_lm_logprobs, position_ids_from_mask


@dataclass
class ResponseLogps:
    """Per-row response log-probs of one forward pass. Each field is (N,) float32 (rows in batch order)."""

    sum: Tensor  # sum over response tokens of log p(token | prefix)
    avg: Tensor  # sum / number of response tokens (0 for a row without response tokens)
    tokens: Tensor  # number of response tokens

    def chunk(self) -> tuple[ResponseLogps, ResponseLogps]:
        """Split 2B rows laid out as [chosen; rejected] into (chosen, rejected), B rows each."""
        halves = [t.chunk(2) for t in (self.sum, self.avg, self.tokens)]
        return ResponseLogps(*(h[0] for h in halves)), ResponseLogps(*(h[1] for h in halves))


def response_logps(model: nn.Module, batch: dict[str, Any]) -> ResponseLogps:
    """Summed and averaged log-probs of the response tokens of a batch, in row order.

    Three batch layouts (see `collate_responses` and `collate_flat`):
      * shared prompt (`prompt_ids` present): each prompt once, left padded (B, P); its k responses right
        padded (k*B, R) as k blocks of B rows. One forward over the prompts fills a KV cache, which is
        repeated k times; one forward over all k*B responses continues from it. Gradients flow through the
        cache into the prompt pass, so this is the same function of the weights as scoring every
        prompt+response row in full, with the prompt computed once instead of k times.
      * concatenated (`input_ids`): every prompt+response row right padded (N, L), one forward; with
        `response_start`, the first column holding a response token in any row, only the logits from that
        column on are computed. Token t is scored by the logits at t - 1.
      * flat (`predict_at`, from `collate_flat`): one padding-free forward over tree sequences; the LM head runs
        on the `predict_at` positions only, and each log-prob is summed into its row (`token_rows`).
    """
    if "predict_at" in batch:
        return _flat_response_logps(model, batch)
    if "prompt_ids" in batch:
        logits = shared_prompt_logits(model, batch)  # (k*B, R, V): position t predicts response token t
        logprobs = token_logprobs(logits, batch["response_ids"])
        resp = batch["response_mask"]  # (k*B, R)
    else:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        start = max(1, int(batch.get("response_start", 1)))
        logprobs = causal_lm_logprobs(model, ids, mask, response_len=ids.shape[1] - start).logprobs  # (N, L - start)
        resp = batch["response_mask"][:, start:]  # (N, L - start)
    total = masked_sum(logprobs, resp, dim=-1).float()  # (N,)
    tokens = resp.sum(-1).float()  # (N,)
    return ResponseLogps(total, total / tokens.clamp(min=1.0), tokens)


def shared_prompt_logits(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """Logits predicting each response token, (k*B, R, V), from one prompt pass and one response pass.

    The prompt pass keeps only its last position's logits (they predict the first response token) and the
    KV cache; `reorder_cache` repeats the cache rows as [0..B-1] k times, matching the response blocks.
    Response positions continue each prompt's own positions (prompt length + t), as in generation.
    """
    prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"]  # (B, P)
    n_prompts, n_rows = prompt_ids.shape[0], batch["response_ids"].shape[0]
    out = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=position_ids_from_mask(prompt_mask),
        use_cache=True,
        logits_to_keep=1,
    )
    rows = torch.arange(n_prompts, device=prompt_ids.device).repeat(n_rows // n_prompts)  # (k*B,)
    cache = out.cache
    cache.reorder_cache(rows)
    response_attn = (batch["response_mask"] > 0).long()  # (k*B, R), right padded
    steps = torch.arange(response_attn.shape[1], device=prompt_ids.device)
    positions = prompt_mask.sum(-1)[rows, None] + steps[None, :]  # (k*B, R)
    attention = torch.cat([prompt_mask[rows], response_attn], dim=1)  # (k*B, P + R)
    out2 = model(
        input_ids=batch["response_ids"],
        attention_mask=attention,
        position_ids=positions,
        cache=cache,
        use_cache=True,
    )
    return torch.cat([out.logits[rows, -1:], out2.logits[:, :-1]], dim=1)  # (k*B, R, V)


FLAT_KEYS = ("input_ids", "position_ids", "attention_mask", padding_free.LAYOUT_KWARG)


def collate_flat(
    examples: Sequence[dict[str, Any]], pad_id: int, response_keys: Sequence[str], round_to: int = 1
) -> dict[str, Any]:
    """`collate_responses`' rows without padding and with each prompt once: example i as one sequence
    [prompt | response 1 | ... | response k] (`tree_rows`: every response continues the prompt, none sees
    another), the sequences back to back in one row (`padding_free.flat_tree_inputs`, filled up to a multiple of
    `round_to`).

    Response j of example i is row j*B + i, as in `collate_responses`. For each response token, in row order:
    `predict_at` (N,), the flat position whose logits score it (the prompt's last position for a response's
    first token, else the token before it; a first token after an empty prompt is not scored), `targets` (N,)
    the token, `token_rows` (N,) its row; `response_tokens` (k*B,) float, each row's response length.
    """
    spans, rows, _ = tree_rows(examples, response_keys)
    n = len(examples)
    predict_at, targets, token_rows = [], [], []
    start = 0
    for i, (ex, span) in enumerate(zip(examples, spans, strict=True)):
        prompt_end = start + span[0]  # flat index after the prompt
        offset = prompt_end
        for j, key in enumerate(response_keys):
            response = ex[key]
            at = [prompt_end - 1, *range(offset, offset + len(response) - 1)][: len(response)]
            first = 0 if span[0] > 0 else 1  # no position predicts a first token without a prompt
            predict_at += at[first:]
            targets += response[first:]
            token_rows += [j * n + i] * (len(response) - first)
            offset += len(response)
        start += sum(span)
    return {
        **padding_free.flat_tree_inputs(spans, rows, pad_id, round_to),
        "predict_at": torch.tensor(predict_at, dtype=torch.long),  # (N,)
        "targets": torch.tensor(targets, dtype=torch.long),  # (N,)
        "token_rows": torch.tensor(token_rows, dtype=torch.long),  # (N,)
        "response_tokens": torch.tensor([float(len(ex[key])) for key in response_keys for ex in examples]),
    }


def _flat_response_logps(model: nn.Module, batch: dict[str, Any]) -> ResponseLogps:
    """`response_logps` of a `collate_flat` batch: log-probs at the `predict_at` positions, summed per row."""
    if not padding_free.enabled(model):
        raise ValueError(
            f"{type(model).__name__} is not on padding-free attention, so it cannot score a padding-free batch; "
            "set data.padding_free: false"
        )
    out = model(**{k: batch[k] for k in FLAT_KEYS}, logits_to_keep=batch["predict_at"], use_cache=False)
    logprobs = token_logprobs(out.logits, batch["targets"][None])[0].float()  # (N,)
    tokens = batch["response_tokens"]  # (k*B,)
    total = torch.zeros_like(tokens).index_add(0, batch["token_rows"], logprobs)  # (k*B,)
    return ResponseLogps(total, total / tokens.clamp(min=1.0), tokens)
