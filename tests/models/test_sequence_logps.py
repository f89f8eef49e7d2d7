"""Response log-probs of the direct trainers: the padding-free tree layout by hand, and its log-probs and
gradients against one plain row per (prompt, response)."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf.data import collate_responses
from rlhf.models import padding_free
from rlhf.models.sequence_logps import collate_flat, response_logps

KEYS = ("chosen_ids", "rejected_ids")
EXAMPLES = [
    {"prompt_ids": [5, 6, 7], "chosen_ids": [40, 41], "rejected_ids": [50, 51, 52, 2]},
    {"prompt_ids": [5, 8], "chosen_ids": [60, 61, 62, 2], "rejected_ids": [70]},
    {"prompt_ids": [5, 9, 10, 11, 12], "chosen_ids": [80, 2], "rejected_ids": [90, 91, 92]},
]


def test_tree_mask_is_trunk_or_own_branch_and_causal() -> None:
    """Against the rule written per (query, key), for spans with an empty branch and with pads."""
    spans = torch.tensor([[2, 1, 2, 1], [1, 0, 2, 0], [3, 1, 0, 1]])  # (B, 1 + k)
    width = 7
    mask = padding_free.tree_mask(spans, width)
    assert mask.shape == (3, 1, width, width)
    for b in range(3):
        part = [p for p, n in enumerate(spans[b].tolist()) for _ in range(n)]  # part of each real position
        for q, k in itertools.product(range(width), range(width)):
            real = q < len(part)  # a pad sees only itself
            want = k <= q and (part[k] == 0 or part[k] == part[q]) if real else k == q
            assert bool(mask[b, 0, q, k]) == want, (b, q, k)


def test_flat_layout_by_hand() -> None:
    """Two pairs [5 6 | 40 | 50 51] and [7 | 60 61 | 70]: positions restart after the prompt for each response;
    a response's first token is scored by the prompt's last position, the others by the token before them."""
    exs = [
        {"prompt_ids": [5, 6], "chosen_ids": [40], "rejected_ids": [50, 51]},
        {"prompt_ids": [7], "chosen_ids": [60, 61], "rejected_ids": [70]},
    ]
    batch = collate_flat(exs, pad_id=0, response_keys=KEYS)
    assert batch["input_ids"].tolist() == [[5, 6, 40, 50, 51, 7, 60, 61, 70]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 2, 3, 0, 1, 2, 1]]
    # rows: 0 chosen of pair 0, 1 chosen of pair 1, 2 rejected of pair 0, 3 rejected of pair 1
    assert batch["predict_at"].tolist() == [1, 1, 3, 5, 6, 5]
    assert batch["targets"].tolist() == [40, 50, 51, 60, 61, 70]
    assert batch["token_rows"].tolist() == [0, 2, 2, 1, 1, 3]
    assert batch["response_tokens"].tolist() == [1.0, 2.0, 2.0, 1.0]
    filled = collate_flat(exs, pad_id=0, response_keys=KEYS, round_to=4)
    assert filled["input_ids"].tolist() == [[5, 6, 40, 50, 51, 7, 60, 61, 70, 0, 0, 0]]
    assert filled["position_ids"][0, -3:].tolist() == [0, 1, 2]
    assert filled["predict_at"].tolist() == batch["predict_at"].tolist()


def _plain_logps(model: torch.nn.Module, keys: tuple[str, ...]) -> torch.Tensor:
    """Summed response log-probs, one unpadded row per (prompt, response), rows as [key 0 rows; key 1 rows]."""
    out = []
    for key in keys:
        for ex in EXAMPLES:
            ids = torch.tensor([ex["prompt_ids"] + ex[key]])  # (1, L)
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)  # (L-1, V)
            logp = logp.gather(-1, ids[0, 1:, None]).squeeze(-1)
            out.append(logp[len(ex["prompt_ids"]) - 1 :].sum())
    return torch.stack(out)


def _grads(model: torch.nn.Module, value: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad()
    value.backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("style", ["llama", "gpt2"])
@pytest.mark.parametrize(("keys", "round_to"), [(KEYS, 1), (KEYS, 16), (("chosen_ids",), 1)])
def test_flat_log_probs_and_gradients_equal_plain_rows(
    tiny_dirs: dict[str, str], style: str, keys: tuple[str, ...], round_to: int
) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[style], attn_implementation="sdpa").float()
    weights = torch.linspace(0.5, 1.5, len(keys) * len(EXAMPLES))  # a weighted sum: every row's gradient counts
    want = _plain_logps(model, keys)
    want_grads = _grads(model, (want * weights).sum())

    assert padding_free.enable(model)
    got = response_logps(model, collate_flat(EXAMPLES, pad_id=0, response_keys=keys, round_to=round_to))
    torch.testing.assert_close(got.sum, want.detach(), rtol=1e-5, atol=1e-5)
    lengths = torch.tensor([float(len(ex[k])) for k in keys for ex in EXAMPLES])
    torch.testing.assert_close(got.tokens, lengths)
    torch.testing.assert_close(got.avg, want.detach() / lengths, rtol=1e-5, atol=1e-5)
    for g, w in zip(_grads(model, (got.sum * weights).sum()), want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)

    padded = response_logps(model, collate_responses(EXAMPLES, 0, keys, share_prompt=True))  # the KV-cache path
    torch.testing.assert_close(got.sum, padded.sum, rtol=1e-5, atol=1e-5)


def test_a_model_off_padding_free_attention_refuses_a_flat_batch(tiny_dirs: dict[str, str]) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], attn_implementation="eager")
    with pytest.raises(ValueError, match="data.padding_free: false"):
        response_logps(model, collate_flat(EXAMPLES, pad_id=0, response_keys=KEYS))
