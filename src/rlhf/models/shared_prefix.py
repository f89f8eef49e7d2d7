"""Decoding attention over a prompt that several rows continue (a GRPO group's), its keys and values kept once.

When k rows sample from one prompt, a KV cache copied to every row holds the prompt k times, and every decoding
step reads it k times: at hidden 512 with 128 rows continuing 16 prompts of ~100 tokens, the prompt's keys and
values are most of what a step reads from memory. Here the prompt's cache stays one per prompt (G, Hkv, P, d), a
row's cache holds only the tokens it generated (b, Hkv, t, d), and each step's attention of a row's query q
joins the two parts by their softmax statistics (the split that cascade attention makes):

    s_p = scale q K_p^T (masked at the prompt's pads),  m_p = max s_p,  l_p = sum exp(s_p - m_p),
    o_p = exp(s_p - m_p) V_p;  s_o, m_o, l_o, o_o likewise over the row's own keys K_o, V_o
    m = max(m_p, m_o),  out = (o_p e^(m_p - m) + o_o e^(m_o - m)) / (l_p e^(m_p - m) + l_o e^(m_o - m))

which is softmax(scale q [K_p | K_o]^T) [V_p | V_o] exactly, up to float summation order. The prompt part runs
one product per prompt over the queries of its rows still going (laid out in `group_size` slots), so its keys
and values are read once per step. `rollout.generation.decode` uses it through `padding_free.attention`, whose
layers get it as the keyword argument `PREFIX_KWARG`, where it saves enough reads to pay for its extra ops
(`SHARED_PREFIX_MIN_REREAD`).

That is only right where each attention layer attends to exactly its own cache layer's keys and values: not in
models that transform them after the cache (DiffLlama attends to each half of the values in turn) or index their
cache layers otherwise (HRM's recurrent cycles). So the prefill that fills the prompts' cache carries a
`CacheCheck` (`CHECK_KWARG`) that sees every attention call, and the rows get a copy of the cache instead where
it finds otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

PREFIX_KWARG = "shared_prefix"
CHECK_KWARG = "shared_prefix_check"


@dataclass
class CacheCheck:
    """Whether every attention layer of a forward attended to exactly the keys and values of the cache layer its
    `layer_idx` names (the same tensors, by storage, shape and strides), and every cache layer was attended to."""

    cache: Any  # the forward's `transformers` cache
    seen: set[int] = field(default_factory=set)
    holds: bool = True

    def see(self, layer_idx: int | None, key: Tensor, value: Tensor) -> None:
        """One attention call of the layer `layer_idx`, with these keys and values."""
        layers = self.cache.layers
        if layer_idx is None or not 0 <= layer_idx < len(layers):
            self.holds = False
            return
        layer = layers[layer_idx]
        self.holds &= _same(key, getattr(layer, "keys", None)) and _same(value, getattr(layer, "values", None))
        self.seen.add(layer_idx)

    @property
    def passed(self) -> bool:
        return self.holds and self.seen == set(range(len(self.cache.layers)))


def _same(a: Tensor, b: Tensor | None) -> bool:
    return b is not None and a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


@dataclass
class SharedPrefix:
    """The prompts' caches, one per prompt, and which prompt each row of the decoding batch continues."""

    keys: list[Tensor]  # per layer (G, Hkv, P, d)
    values: list[Tensor]  # per layer (G, Hkv, P, d)
    mask: Tensor  # (G, P) bool: the prompt's own positions (False on its left padding)
    group: Tensor  # (b,) each row's prompt, an index into G
    slot: Tensor  # (b,) each row's place among the rows of its prompt
    slots: int  # the most rows of one prompt

    @classmethod
    def of(cls, keys: list[Tensor], values: list[Tensor], mask: Tensor, group: Tensor) -> SharedPrefix:
        """`group` (b,): the prompt each row continues; slots numbered in row order within each prompt."""
        counts = torch.bincount(group, minlength=mask.shape[0])
        order = torch.argsort(group, stable=True)
        starts = counts.cumsum(0) - counts
        slot = torch.empty_like(group)
        slot[order] = torch.arange(len(group), device=group.device) - starts[group[order]]
        return cls(keys, values, mask.bool(), group, slot, int(counts.max()))

    def rows(self, kept: Tensor) -> SharedPrefix:
        """The same prompts for the rows `kept` (indices into this batch) that go on decoding."""
        return SharedPrefix.of(self.keys, self.values, self.mask, self.group[kept])

    def attend(self, layer: int, query: Tensor, key: Tensor, value: Tensor, scaling: float | None) -> Tensor:
        """Attention of one decoding step: query (b, H, 1, d), key/value (b, Hkv, t, d) the rows' own positions
        (this step's included) -> (b, 1, H, d), as `transformers`' sdpa attention returns it."""
        b, H, q_len, d = query.shape
        if q_len != 1:
            raise ValueError(f"a shared prefix serves one query position a step, got {q_len}")
        keys_p, values_p = self.keys[layer], self.values[layer]
        G, Hkv, P, _ = keys_p.shape
        n = H // Hkv  # query heads per key head
        scale = scaling if scaling is not None else d**-0.5
        q = query.reshape(b, Hkv, n, d)
        # the prompt part: each prompt's rows in its slots, (G, Hkv, slots * n, d) against (G, Hkv, P, d)
        q_p = q.new_zeros(G, self.slots, Hkv, n, d)
        q_p[self.group, self.slot] = q
        q_p = q_p.permute(0, 2, 1, 3, 4).reshape(G, Hkv, self.slots * n, d)
        s_p = torch.matmul(q_p, keys_p.transpose(-1, -2)).float().mul_(scale)
        s_p.masked_fill_(~self.mask[:, None, None, :], float("-inf"))
        m_p, l_p, o_p = _partial_softmax(s_p, values_p)  # (G, Hkv, slots * n, ...)
        m_p, l_p, o_p = (x.view(G, Hkv, self.slots, n, -1)[self.group, :, self.slot] for x in (m_p, l_p, o_p))
        # the rows' own part: (b, Hkv, n, d) against (b, Hkv, t, d)
        s_o = torch.matmul(q, key.transpose(-1, -2)).float().mul_(scale)
        m_o, l_o, o_o = _partial_softmax(s_o, value)  # (b, Hkv, n, ...)
        m = torch.maximum(m_p, m_o)
        w_p, w_o = torch.exp(m_p - m), torch.exp(m_o - m)
        out = (o_p * w_p + o_o * w_o) / (l_p * w_p + l_o * w_o)  # (b, Hkv, n, d)
        return out.to(query.dtype).view(b, 1, H, d)


def _partial_softmax(scores: Tensor, values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(max, sum of exp(scores - max), exp(scores - max) @ values) over the last dimension of float32 `scores`;
    the max and sum keep a trailing dimension of 1. Where every score is -inf (a prompt of pads alone) the max is
    taken as 0, so the part weighs nothing instead of giving NaN."""
    m = scores.amax(-1, keepdim=True).nan_to_num(neginf=0.0)
    e = torch.exp(scores - m)
    return m, e.sum(-1, keepdim=True), torch.matmul(e.to(values.dtype), values).float()
