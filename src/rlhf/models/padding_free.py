"""Padding-free batches: a batch's sequences concatenated into one row, with attention kept inside each.

A padded batch of B sequences spends the linear layers, norms and MLPs (nearly all of a small model's
compute) on every pad position. Here the B sequences are concatenated into one flat row of T real tokens
(`position_ids` restart at 0 for each), so everything token-wise runs on real tokens only. Attention alone
needs the sequences apart: our attention function gathers the flat queries, keys and values into a
right-padded (B, H, L, d) block (L the longest sequence), runs causal `sdpa` on it without a mask, and
scatters the outputs back to the flat row. Right padding under a causal mask is exact: no real query ever
sees a later (pad) position, and the pad outputs are dropped, so they get no gradient either. The result
equals the padded forward up to float summation order.

`enable(model)` registers the function under `ATTENTION` and switches the model to it. Calls without a
layout (generation, evaluation, any padded batch) go to `sdpa` unchanged, with `sdpa`'s own masks, so the
switch is safe for every other use of the model, gradient-checkpointing recomputation included (it replays
the layer with the same keyword arguments). Only models on `sdpa` that route attention through
`transformers`' attention interface (every model shipped in `transformers` v5) can do this; `enable`
returns False for others (remote code, eager, flash-attention), and callers keep padded batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

ATTENTION = "rlhf_padding_free"
LAYOUT_KWARG = "flat_layout"


@dataclass(frozen=True)
class FlatLayout:
    """Where each sequence's tokens lie in the flat row (length T) and in the padded attention block (B, L).

    gather:  (B * L,) flat index of each block position; pads point at token 0 (never attended, see above).
    scatter: (T,) block index (b * L + j) of each flat token.
    """

    gather: Tensor
    scatter: Tensor
    rows: int
    length: int

    def to(self, device: torch.device | str) -> FlatLayout:
        return FlatLayout(self.gather.to(device), self.scatter.to(device), self.rows, self.length)


def flat_layout(lengths: Sequence[int]) -> FlatLayout:
    """The layout of sequences of these lengths (each >= 1), concatenated in order."""
    if not lengths or min(lengths) < 1:
        raise ValueError(f"padding-free layout needs sequences of at least one token, got lengths {list(lengths)}")
    n = torch.tensor(lengths)  # (B,)
    starts = torch.cumsum(n, 0) - n  # (B,)
    length = int(n.max())
    j = torch.arange(length)  # (L,)
    gather = torch.where(j[None] < n[:, None], starts[:, None] + j[None], 0).flatten()  # (B * L,)
    row = torch.arange(len(lengths)).repeat_interleave(n)  # (T,) the sequence of each flat token
    scatter = row * length + torch.arange(len(row)) - starts[row]  # (T,)
    return FlatLayout(gather, scatter, len(lengths), length)


def flat_position_ids(lengths: Sequence[int]) -> Tensor:
    """(1, T) positions restarting at 0 for every sequence."""
    return torch.cat([torch.arange(n) for n in lengths])[None]


def flat_inputs(lengths: Sequence[int]) -> dict[str, Any]:
    """The keyword arguments, besides `input_ids` (1, T), of the flat forward of sequences of these lengths:
    `position_ids` (1, T), the layout, and an all-ones `attention_mask` (1, T).

    The flat row has no padding, so the mask says nothing; it is there so that `transformers` builds none.
    Without a mask it finds the sequences from the restarting positions and materialises a (T, T)
    block-diagonal mask for them (quadratic in the tokens of the whole batch: ~4 ms of a 12 ms forward of the
    tiny benchmark model at T = 1400), which our attention never reads. With an all-ones mask its sdpa path
    returns no mask at all.
    """
    return {
        "position_ids": flat_position_ids(lengths),
        "attention_mask": torch.ones(1, sum(lengths), dtype=torch.long),
        LAYOUT_KWARG: flat_layout(lengths),
    }


def attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """`transformers` attention function: padding-free when the forward got `flat_layout=`, else plain sdpa.

    query (1, H, T, d), key/value (1, Hkv, T, d) -> output (1, T, H, d), as `sdpa_attention_forward` returns.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layout: FlatLayout | None = kwargs.pop(LAYOUT_KWARG, None)
    if layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    window = kwargs.get("sliding_window")
    if window is not None and layout.length > window:
        raise ValueError(f"padding-free attention has no sliding window: a sequence of {layout.length} > {window}")
    kwargs.pop("is_causal", None)

    def block(x: Tensor) -> Tensor:  # (1, H, T, d) -> (B, H, L, d)
        x = x[0].transpose(0, 1).index_select(0, layout.gather)  # (B * L, H, d)
        return x.view(layout.rows, layout.length, *x.shape[1:]).transpose(1, 2)

    out, _ = sdpa_attention_forward(module, block(query), block(key), block(value), None, is_causal=True, **kwargs)
    out = out.reshape(layout.rows * layout.length, *out.shape[2:]).index_select(0, layout.scatter)  # (T, H, d)
    return out[None], None


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # peft


def enabled(model: nn.Module) -> bool:
    """Whether `enable(model)` switched the model to padding-free attention."""
    return getattr(getattr(_base(model), "config", None), "_attn_implementation", None) == ATTENTION


def enable(model: nn.Module) -> bool:
    """Route the model's attention through `attention` (registered once); False if the model cannot use it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    base = _base(model)
    config = getattr(base, "config", None)
    if config is None or not type(base).__module__.startswith("transformers."):
        return False
    if getattr(config, "_attn_implementation", None) not in ("sdpa", ATTENTION):
        return False  # eager (often chosen for what sdpa lacks, e.g. soft-capping) and flash-attention stay as they are
    AttentionInterface.register(ATTENTION, attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    config._attn_implementation = ATTENTION
    return True
