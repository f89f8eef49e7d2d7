"""Padding-free batches: a batch's sequences concatenated into one row, with attention kept inside each.

A padded batch of B sequences spends the linear layers, norms and MLPs (nearly all of a small model's
compute) on every pad position. Here the B sequences are concatenated into one flat row of T real tokens
(`position_ids` restart at 0 for each), so everything token-wise runs on real tokens only. Attention alone
needs the sequences apart: our attention function gathers the flat queries, keys and values into
right-padded (rows, H, length, d) blocks of sequences of similar length (`flat_layout`), runs causal `sdpa`
on each without a mask, and scatters the outputs back to the flat row. Right padding under a causal mask is
exact: no real query ever sees a later (pad) position, and the pad outputs are dropped, so they get no
gradient either. The result equals the padded forward up to float summation order. On a CUDA GPU that has
torch's variable-length flash attention (`torch.nn.attention.varlen`, sm80 and newer), half-precision layouts
skip the blocks: one `varlen_attn` call per layer over the flat row (`varlen_applies`), no gathers for causal
sequences; tree sequences (a shared prompt and its continuations) gather each branch's keys after its trunk's
(`VarlenTree`), where a check on the device found its kernel aligns causal attention as they need. A
sliding-window layer (Mistral's, Gemma 3's local ones) whose window is shorter than a sequence runs the blocks with
masks narrowed to the window by position (`FlatLayout.windowed`).

`enable(model)` registers the function under `ATTENTION` and switches the model to it; every model loaded
through `rlhf.models.loading` is switched. Calls without a layout (generation, evaluation, any padded batch)
go to `sdpa` unchanged, with `sdpa`'s own masks (short half-precision attention on the CPU runs in fp32:
`UPCAST_BELOW`), so the switch is safe for every other use of the model, gradient-checkpointing recomputation
included (it replays the layer with the same keyword arguments). Only models on `sdpa` whose layers pass the
layout down to `transformers`' attention interface and mix tokens by attention alone can do this: `enable` checks
a model by a flat forward of two short sequences (`_keeps_sequences_apart`) and returns False for others (remote
code, eager, flash-attention, state-space and convolution layers, layers that drop keyword arguments), whose
callers keep padded batches.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from rlhf.data.collate import tree_positions
from rlhf.models import cpu_linear, precision
from rlhf.models.shared_prefix import CHECK_KWARG, PREFIX_KWARG, CacheCheck, SharedPrefix
from rlhf.models.unwrap import base_model

logger = logging.getLogger(__name__)

ATTENTION = "rlhf_padding_free"
LAYOUT_KWARG = "flat_layout"


BLOCK_OVERHEAD_POSITIONS = 128
"""The fixed cost of one attention block (its gathers and one sdpa call) in block positions. Measured on the CPU
(4 heads of 16, 1 thread), a block's forward costs ~38 us + ~0.3 us per position (rows x length) + ~0.004 us
per position x length; with the backward, ~117 us + 0.57 us + 0.013 us: the cost model in `flat_layout`."""


@dataclass(frozen=True)
class Block:
    """Sequences of similar length as one right-padded (rows, length) attention block.

    mask: None for causal attention; else (rows, 1, length, length) bool, True where a query position may see a
    key position (`flat_layout`'s `mask`: sequences that are trees, such as a reward model's shared prompt).
    """

    rows: int
    length: int
    mask: Tensor | None = None


@dataclass(frozen=True)
class FlatLayout:
    """Where each sequence's tokens lie in the flat row (length T) and in the attention blocks.

    blocks:  sequences grouped by length (`flat_layout`), longest first, laid end to end (P positions in all).
    gather:  (P,) flat index of each block position; pads point at token 0 (never attended, see the module
             docstring).
    scatter: (T,) index of each flat token's position in the blocks.
    pads:    the block positions that are pads.
    starts:  (B + 1,) int32 offset of each sequence in the flat row, then T (`varlen_attn`'s cumulative lengths).
    spans:   (B, 1 + k) lengths of [trunk | branch 1 | ... | branch k] of tree sequences (`tree_inputs`, whose
             blocks carry their `tree_mask`), None for causal ones: `varlen_tree` lays them out for `varlen_attn`.
    positions: (T,) position of each flat token (`flat_inputs`, `tree_inputs`): `windowed` narrows attention by it.
    """

    blocks: tuple[Block, ...]
    gather: Tensor
    scatter: Tensor
    pads: Tensor
    starts: Tensor
    spans: Tensor | None = None
    positions: Tensor | None = None
    _windowed: dict[int, tuple[Tensor | None, ...]] = field(default_factory=dict, compare=False, repr=False)

    @property
    def length(self) -> int:
        """The longest sequence."""
        return self.blocks[0].length

    @property
    def sizes(self) -> list[int]:
        """Positions of each block."""
        return [b.rows * b.length for b in self.blocks]

    def to(self, device: torch.device | str) -> FlatLayout:
        blocks = tuple(Block(b.rows, b.length, None if b.mask is None else b.mask.to(device)) for b in self.blocks)
        indices = (self.gather, self.scatter, self.pads, self.starts)
        positions = None if self.positions is None else self.positions.to(device)
        return FlatLayout(blocks, *(x.to(device) for x in indices), self.spans, positions)

    def windowed(self, window: int) -> tuple[Tensor | None, ...]:
        """Each block's mask for a sliding-window layer, where a query sees only keys fewer than `window` positions
        back (`transformers`' rule: key position > query position - window): the block's own mask (or causal) and
        that, (rows, 1, L, L) bool; None (the block's causal attention as it is) where the block is no longer than
        the window. Built once per layout and window."""
        if window not in self._windowed:
            if self.positions is None:
                raise ValueError("a sliding-window layer needs the layout's positions (flat_inputs or tree_inputs)")
            masks: list[Tensor | None] = []
            for block, gather in zip(self.blocks, self.gather.split(self.sizes), strict=True):
                if block.length <= window:
                    masks.append(block.mask)
                    continue
                p = self.positions[gather].view(block.rows, block.length)  # pads: token 0's, which they see
                near = (p[:, :, None] - p[:, None, :]) < window  # (rows, L, L)
                causal = torch.ones(block.length, block.length, dtype=torch.bool, device=p.device).tril()
                masks.append((block.mask if block.mask is not None else causal) & near[:, None])
            self._windowed[window] = tuple(masks)
        return self._windowed[window]

    @functools.cached_property
    def varlen_tree(self) -> VarlenTree:
        """The tree sequences as `varlen_attn`'s query and key sequences (`VarlenTree`); needs `spans`."""
        assert self.spans is not None
        return VarlenTree.of(self.spans, self.starts)


@dataclass(frozen=True)
class VarlenTree:
    """Tree sequences [trunk | branch 1 | ... | branch k], back to back, as `varlen_attn` takes them: every trunk
    and every branch one query sequence, in the flat row's order (so the queries are the flat row itself); a
    trunk's keys are its own positions, a branch's are its trunk's and then its own (gathered by `keys`). Causal
    attention aligned at the end of the keys (flash attention's rule where a sequence has more keys than
    queries) lets a branch's token see the whole trunk and its own branch up to itself: the tree mask.

    cu_q, cu_k: (S + 1,) int32 cumulative query and key lengths; keys: (K,) flat index of each key position.
    """

    cu_q: Tensor
    cu_k: Tensor
    keys: Tensor
    max_q: int
    max_k: int

    @classmethod
    def of(cls, spans: Tensor, starts: Tensor) -> VarlenTree:
        """Of trees of these (B, 1 + k) `spans` at these (B + 1,) `starts` in the flat row (`FlatLayout`'s)."""
        trunk = spans[:, :1]  # (B, 1)
        key_len = torch.cat([trunk, trunk + spans[:, 1:]], 1).flatten()  # (B * (1 + k),)
        q_len = spans.flatten()
        key_len, q_len = key_len[q_len > 0], q_len[q_len > 0]  # zero-length branches are no sequence
        q_start = torch.cumsum(q_len, 0) - q_len  # each query sequence's offset in the flat row
        owner = torch.repeat_interleave(torch.arange(len(spans)), (spans > 0).sum(1))  # the tree of each query seq
        p, o = trunk[owner, 0], starts[:-1].cpu().long()[owner]
        seq = torch.repeat_interleave(torch.arange(len(key_len)), key_len)  # the query sequence of each key slot
        j = torch.arange(int(key_len.sum())) - torch.repeat_interleave(torch.cumsum(key_len, 0) - key_len, key_len)
        keys = torch.where(j < p[seq], o[seq] + j, q_start[seq] + j - p[seq])  # trunk first, then the branch
        cu = [
            torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(x, 0)]).to(torch.int32) for x in (q_len, key_len)
        ]
        device = starts.device
        return cls(cu[0].to(device), cu[1].to(device), keys.to(device), int(q_len.max()), int(key_len.max()))


MaskFn = Callable[[Tensor, int], Tensor]
"""(sequence indices (rows,), block length L) -> (rows, 1, L, L) bool: who sees whom inside each sequence."""


def flat_layout(lengths: Sequence[int], mask: MaskFn | None = None) -> FlatLayout:
    """The layout of sequences of these lengths (each >= 1), concatenated in order.

    `mask`: attention inside each sequence other than causal, asked once per block for its sequences (a pad
    position must see at least itself, or its softmax is over nothing); None: causal.

    Attention pads every sequence of a block to the block's longest, so one block for a batch with a few long
    sequences wastes most of its work on pads. Sequences sorted by length (longest first) are cut into the
    blocks that minimise the estimated cost, sum over blocks of `BLOCK_OVERHEAD_POSITIONS` + rows x length x
    (1 + length / 64), by dynamic programming over the places where the length changes.
    """
    if not lengths or min(lengths) < 1:
        raise ValueError(f"padding-free layout needs sequences of at least one token, got lengths {list(lengths)}")
    n = torch.tensor(lengths)  # (B,)
    starts = torch.cumsum(n, 0) - n  # (B,)
    order = torch.argsort(n, descending=True, stable=True)
    blocks, gathers, reals = [], [], []
    for first, end in _cuts(n[order].tolist()):
        seqs = order[first:end]
        length = int(n[seqs[0]])
        j = torch.arange(length)  # (L,)
        real = (j[None] < n[seqs, None]).flatten()  # (rows * L,)
        gathers.append(torch.where(real, (starts[seqs, None] + j[None]).flatten(), 0))
        reals.append(real)
        blocks.append(Block(len(seqs), length, None if mask is None else mask(seqs, length)))
    gather, real = torch.cat(gathers), torch.cat(reals)  # (P,)
    scatter = torch.empty(int(n.sum()), dtype=torch.long)
    scatter[gather[real]] = real.nonzero().squeeze(1)
    pads = (~real).nonzero().squeeze(1)
    return FlatLayout(tuple(blocks), gather, scatter, pads, torch.cat([starts, n.sum()[None]]).to(torch.int32))


def _cuts(sorted_lengths: list[int]) -> list[tuple[int, int]]:
    """[first, end) ranges of the cheapest blocks of these lengths (sorted, longest first); cutting inside a run
    of equal lengths only adds a block's overhead, so only the run boundaries are tried."""
    bounds = [0] + [i for i in range(1, len(sorted_lengths)) if sorted_lengths[i] != sorted_lengths[i - 1]]
    bounds.append(len(sorted_lengths))
    best, cut = [0.0] + [float("inf")] * (len(bounds) - 1), [0] * len(bounds)
    for e in range(1, len(bounds)):
        for s in range(e):
            length = sorted_lengths[bounds[s]]
            cost = best[s] + BLOCK_OVERHEAD_POSITIONS + (bounds[e] - bounds[s]) * length * (1 + length / 64)
            if cost < best[e]:
                best[e], cut[e] = cost, s
    ranges, e = [], len(bounds) - 1
    while e > 0:
        ranges.append((bounds[cut[e]], bounds[e]))
        e = cut[e]
    return ranges[::-1]


def tree_mask(spans: Tensor, width: int) -> Tensor:
    """(B, 1, L, L) bool for sequences [trunk | branch 1 | ... | branch k] of `spans` (B, 1 + k) lengths, right
    padded to L: query q sees key j <= q when j is in the trunk or in q's own branch (each branch continues the
    trunk as if the others were not there: a prompt with its responses); a pad position sees only itself."""
    ends = spans.cumsum(1)  # (B, 1 + k)
    pos = torch.arange(width)  # (L,)
    part = (pos[None, :, None] >= ends[:, None, :]).sum(-1)  # (B, L): 0 trunk, then the branches; 1 + k pads
    real = pos[None] < ends[:, -1:]  # (B, L)
    same = (part[:, None, :] == 0) | (part[:, None, :] == part[:, :, None])  # (B, L, L): key in trunk or own branch
    causal = pos[None, :] <= pos[:, None]  # (L, L)
    sees = causal & same & real[:, :, None]
    return (sees | (~real[:, :, None] & torch.eye(width, dtype=torch.bool)))[:, None]


def flat_position_ids(lengths: Sequence[int]) -> Tensor:
    """(1, T) positions restarting at 0 for every sequence (a flat row's position minus its sequence's start: four
    ops, where one `arange` per sequence took ~90 us for 64 sequences)."""
    n = torch.tensor(lengths)
    return (torch.arange(int(n.sum())) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n))[None]


ROW_MULTIPLE = 16
"""Where matmuls run in half precision or through oneDNN on the CPU, flat rows are filled up to a multiple of this
many tokens (`row_multiple`, `filler_length`). oneDNN builds a kernel for every new row count it meets and a flat
row's length changes with every batch: a bf16 (T, 256) @ (256, 768) product took 463 us per call with T drawn from
800-840 against 171 us with T a multiple of 16 in the same range (2 threads, Intel Xeon with AMX); fp32 through
oneDNN keeps each kernel, so unfilled rows also grow the process (`cpu_linear`). fp32 through MKL has no such
cost, so there rows are not filled."""


def row_multiple(model: nn.Module, device: torch.device) -> int:
    """`ROW_MULTIPLE` where the model's matmuls run in half precision on the CPU (under autocast now, under the
    engine's autocast (`precision.mark_autocast`) or with half-precision weights) or through oneDNN in fp32
    (`cpu_linear.enabled`), else 1."""
    if device.type != "cpu":
        return 1
    autocast = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") in precision.HALF
    marked = precision.autocast_dtype(model) is not None
    half = autocast or marked or next(model.parameters()).dtype in precision.HALF
    return ROW_MULTIPLE if half or cpu_linear.enabled(model) else 1


def filler_length(total: int, round_to: int) -> int:
    """Tokens that fill a flat row of `total` tokens up to a multiple of `round_to`."""
    return -total % round_to


def flat_inputs(lengths: Sequence[int], round_to: int = 1) -> dict[str, Any]:
    """The keyword arguments, besides `input_ids` (1, T), of the flat forward of sequences of these lengths:
    `position_ids` (1, T), the layout, and an all-ones `attention_mask` (1, T). With `round_to` > 1, T is the
    next multiple of it: the row ends with a filler sequence of `filler_length` tokens (the caller appends
    that many ids, any), which attends to itself alone and which no loss reads.

    The flat row has no padding, so the mask says nothing; it is there so that `transformers` builds none.
    Without a mask it finds the sequences from the restarting positions and materialises a (T, T)
    block-diagonal mask for them (quadratic in the tokens of the whole batch: ~4 ms of a 12 ms forward of the
    tiny benchmark model at T = 1400), which our attention never reads. With an all-ones mask its sdpa path
    returns no mask at all.
    """
    filler = filler_length(sum(lengths), round_to)
    lengths = [*lengths, filler] if filler else lengths
    positions = flat_position_ids(lengths)  # (1, T)
    return {
        "position_ids": positions,
        "attention_mask": torch.ones(1, sum(lengths), dtype=torch.long),
        LAYOUT_KWARG: dataclasses.replace(flat_layout(lengths), positions=positions[0]),
    }


def flat_tree_inputs(
    spans: Sequence[Sequence[int]], rows: Sequence[Sequence[int]], pad_id: int, round_to: int = 1
) -> dict[str, Any]:
    """The keyword arguments of the flat forward of tree sequences [trunk | branch 1 | ... | branch k]
    (`rlhf.data.collate.tree_rows`: their `spans` lengths and token ids): `input_ids` (1, T) and `tree_inputs`'
    position ids, all-ones mask and layout. With `round_to` > 1 the row ends with a filler of pad ids up to a
    multiple of it, which no loss reads (`filler_length`)."""
    ids = [t for r in rows for t in r]
    filler = filler_length(len(ids), round_to)
    return {"input_ids": torch.tensor(ids + [pad_id] * filler)[None], **tree_inputs(spans, round_to)}  # (1, T)


def tree_inputs(spans: Sequence[Sequence[int]], round_to: int = 1) -> dict[str, Any]:
    """`position_ids` (every branch continuing its trunk, `rlhf.data.collate.tree_positions`), an all-ones
    `attention_mask` (both (1, T)) and the layout of tree sequences [trunk | branch 1 | ... | branch k] of these
    `spans` lengths, back to back (a sequence with fewer branches has zero-length ones): its blocks carry each
    sequence's `tree_mask`, or plain causal attention where no sequence has more than one branch. With `round_to`
    > 1, T is the next multiple of it: the row ends with a trunk-only filler (positions from 0) that the caller fills
    with any ids and no loss reads."""
    width = max(len(s) for s in spans)
    spans_t = torch.tensor([[*s, *[0] * (width - len(s))] for s in spans])  # (B, 1 + k)
    positions = [i for s in spans for i in tree_positions(s)]
    filler = filler_length(len(positions), round_to)
    if filler:
        spans_t = torch.cat([spans_t, torch.tensor([[filler] + [0] * (width - 1)])])
        positions += range(filler)

    def tree(seqs: Tensor, length: int) -> Tensor:  # (rows, 1, L, L)
        return tree_mask(spans_t[seqs], length)

    branched = width > 2 and bool((spans_t[:, 2:] > 0).any())
    layout = flat_layout(spans_t.sum(1).tolist(), tree if branched else None)
    position_ids = torch.tensor(positions)
    return {
        "position_ids": position_ids[None],  # (1, T)
        "attention_mask": torch.ones(1, len(positions), dtype=torch.long),  # says nothing: see `flat_inputs`
        LAYOUT_KWARG: dataclasses.replace(layout, spans=spans_t if branched else None, positions=position_ids),
    }


UPCAST_BELOW = 16384
"""On the CPU, torch's half-precision (flash) attention kernel costs about the same per query position whatever
the length up to 512 (it works on fixed key blocks), while fp32 attention grows with length x head size. So
half-precision attention on the CPU runs in fp32 (q, k, v cast up, the output cast back) where the longer of the
query and key lengths times the head size is below this. Forward + backward of causal attention over ~2048
positions x 4 heads, bf16 time / fp32 time (2 threads, Intel Xeon with AMX):

    head size   length 32   64     128    256    512
    16          6.84        5.59   4.47   1.92   1.51
    64          3.74        2.77   1.68   0.89   0.70
    128         2.00        1.39   1.01   0.60   0.53
    256         1.02        0.75   0.72   0.46   0.42

(`length < 128` whatever the head size, the rule before, ran hidden 1024 / 4 heads at ~125 tokens in fp32 at
1.4x the bf16 time, and hidden 256 / 4 heads at ~130 tokens in bf16 at 1.7x the fp32 time.)"""


def _sdpa(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, **kwargs: Any) -> Any:
    """`transformers`' sdpa attention, in fp32 for short half-precision attention on the CPU (`UPCAST_BELOW`)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dtype = _attention_dtype(value)
    short = max(query.shape[-2], key.shape[-2]) * query.shape[-1] < UPCAST_BELOW
    if not (query.device.type == "cpu" and short and dtype in precision.HALF):
        return sdpa_attention_forward(module, query, key, value, mask, **kwargs)
    if mask is not None and mask.is_floating_point():
        mask = mask.float()
    with torch.autocast("cpu", enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), mask, **kwargs)
    return out.to(dtype), weights


_VARLEN_FAILED: set[torch.device] = set()
"""Devices where a `varlen_attn` call raised: their layouts go back to the blocks (`attention` warns once)."""


@functools.cache
def _flash_varlen(device: torch.device) -> bool:
    """Whether this CUDA device runs torch's variable-length flash attention (torch >= 2.10, sm80 and newer)."""
    try:
        import torch.nn.attention.varlen  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def varlen_applies(query: Tensor, value: Tensor, layout: FlatLayout, kwargs: dict[str, Any]) -> bool:
    """Whether `attention` runs the layout as one variable-length flash-attention call: on a CUDA GPU that has it,
    in half precision (autocast's or the inputs'), causal sequences or trees of `tree_inputs` (where the device's
    kernel gave a tree's attention in `_varlen_trees_agree`), no attention dropout or logit soft-capping, and a head
    size flash attention takes (a multiple of 8, at most 256)."""
    if query.device.type != "cuda" or query.device in _VARLEN_FAILED:
        return False
    if kwargs.get("dropout", 0.0) or kwargs.get("softcap") is not None:
        return False
    head, dtype = query.shape[-1], _attention_dtype(value)
    if not (dtype in precision.HALF and head % 8 == 0 and head <= 256 and _flash_varlen(query.device)):
        return False
    if layout.spans is not None:
        return _varlen_trees_agree(query.device, dtype)
    return all(b.mask is None for b in layout.blocks)


@functools.cache
def _varlen_trees_agree(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `varlen_attn` on this device gives a tree's attention (`VarlenTree`: causal attention aligned at the
    end of the keys): one small tree sequence against sdpa with its `tree_mask`, once per device and precision.
    Where not, tree layouts keep the sdpa blocks (with a warning)."""
    gen = torch.Generator().manual_seed(0)
    spans = [[5, 3, 4]]
    layout = tree_inputs(spans)[LAYOUT_KWARG].to(device)
    q, k, v = (torch.randn(1, 2, 12, 16, generator=gen).to(device) for _ in range(3))
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=tree_mask(torch.tensor(spans), 12).to(device)
    )
    try:
        with torch.autocast(device.type, dtype=dtype):
            got = _varlen(q, k, v, layout, None).float()  # (1, T, H, d)
    except (RuntimeError, NotImplementedError) as exc:
        logger.warning("varlen flash attention failed on a tree on %s (%s): trees use sdpa blocks", device, exc)
        return False
    agree = torch.allclose(got, want.transpose(1, 2), atol=3e-2, rtol=3e-2)
    if not agree:
        logger.warning("varlen flash attention on %s does not give a tree's attention: trees use sdpa blocks", device)
    return agree


def _attention_dtype(value: Tensor) -> torch.dtype:
    """The precision attention runs in: autocast's on the value's device (it casts sdpa's inputs down), else the
    value's own."""
    device = value.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else value.dtype


@functools.cache
def _parameters(fn: Callable[..., Any]) -> frozenset[str]:
    return frozenset(inspect.signature(fn).parameters)


def _varlen(query: Tensor, key: Tensor, value: Tensor, layout: FlatLayout, scaling: float | None) -> Tensor:
    """Causal attention of every sequence of the flat row in one `varlen_attn` call: (1, H, T, d) inputs (key and
    value may have fewer heads) -> (1, T, H, d) in the half precision of `_attention_dtype`. torch 2.10's `varlen_attn`
    takes `is_causal` and neither `scale` nor `enable_gqa`: the scale is then folded into the queries and the key
    and value heads are repeated for their query groups."""
    from torch.nn.attention.varlen import varlen_attn

    dtype = _attention_dtype(value)
    q, k, v = (x[0].transpose(0, 1).to(dtype).contiguous() for x in (query, key, value))  # (T, heads, d)
    params = _parameters(varlen_attn)
    kw: dict[str, Any] = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if "scale" in params:
        kw["scale"] = scaling
    elif scaling is not None:
        q = q * (scaling * q.shape[-1] ** 0.5)  # the kernel's own scale is 1 / sqrt(d)
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    if layout.spans is None:
        return varlen_attn(q, k, v, layout.starts, layout.starts, layout.length, layout.length, **kw)[None]
    tree = layout.varlen_tree  # a branch's keys: its trunk's, then its own
    k, v = k.index_select(0, tree.keys), v.index_select(0, tree.keys)
    return varlen_attn(q, k, v, tree.cu_q, tree.cu_k, tree.max_q, tree.max_k, **kw)[None]


def attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """`transformers` attention function: padding-free when the forward got `flat_layout=`, else plain sdpa (short
    half-precision attention on the CPU in fp32: `UPCAST_BELOW`).

    query (1, H, T, d), key/value (1, Hkv, T, d) -> output (1, T, H, d), as `sdpa_attention_forward` returns.
    A decoding step of rows that continue shared prompts (`shared_prefix.SharedPrefix`) attends to them there; a
    prefill that fills their cache reports each call to its `shared_prefix.CacheCheck`.
    """
    prefix: SharedPrefix | None = kwargs.pop(PREFIX_KWARG, None)
    if prefix is not None:
        if unsupported := [k for k in ("position_bias", "softcap", "s_aux", "sinks") if kwargs.get(k) is not None]:
            raise NotImplementedError(f"decoding over shared prompts does not apply {', '.join(unsupported)}")
        return prefix.attend(module.layer_idx, query, key, value, kwargs.get("scaling")), None
    check: CacheCheck | None = kwargs.pop(CHECK_KWARG, None)
    if check is not None:
        check.see(getattr(module, "layer_idx", None), key, value)
    layout: FlatLayout | None = kwargs.pop(LAYOUT_KWARG, None)
    if layout is None:
        return _sdpa(module, query, key, value, attention_mask, **kwargs)

    window = kwargs.get("sliding_window")
    windowed = window is not None and layout.length > window  # a sliding-window layer whose window matters here
    kwargs.pop("is_causal", None)
    if not windowed and varlen_applies(query, value, layout, kwargs):
        try:
            return _varlen(query, key, value, layout, kwargs.get("scaling")), None
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, NotImplementedError) as exc:  # a build or GPU without the kernel it needs
            _VARLEN_FAILED.add(query.device)
            logger.warning("varlen flash attention failed on %s (%s); using sdpa blocks instead", query.device, exc)

    rows = (x.squeeze(0).transpose(0, 1) for x in (query, key, value))  # (T, H, d) views (x[0]'s gradient zero-fills)
    masks = layout.windowed(window) if windowed else tuple(b.mask for b in layout.blocks)
    outs = []
    for block, mask, q, k, v in zip(layout.blocks, masks, *(_IntoBlocks.apply(x, layout) for x in rows), strict=True):
        q, k, v = (x.view(block.rows, block.length, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
        if mask is None:
            out, _ = _sdpa(module, q, k, v, None, is_causal=True, **kwargs)  # (rows, length, H, d)
        else:
            out, _ = _sdpa(module, q, k, v, mask, is_causal=False, **kwargs)
        outs.append(out.reshape(block.rows * block.length, *out.shape[2:]))
    return _OutOfBlocks.apply(layout, *outs)[None], None  # (1, T, H, d)


class _IntoBlocks(torch.autograd.Function):
    """(T, H, d) flat row -> the blocks' (rows * length, H, d) inputs, pads filled with token 0.

    Between the flat row and the blocks each real token has one block position: `gather` and `scatter` are
    inverse permutations on the real tokens, so each is the other's gradient. The pads are the only rest: going
    into the blocks their gradient is exactly zero (no real query sees a pad key and no loss reads a pad output,
    see the module docstring), so leaving them out loses nothing; coming out of the blocks (`_OutOfBlocks`) they
    are the pad outputs, whose gradient is zero. Autograd's own gradients of `index_select` and of slicing the
    blocks apart zero-fill a whole (T or P, H, d) tensor each and add into it: at hidden 1024 on the CPU those
    fills took ~6% of a bf16 SFT step.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, layout: FlatLayout) -> tuple[Tensor, ...]:
        ctx.layout = layout
        return x.index_select(0, layout.gather).split(layout.sizes)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor, None]:
        grad = grads[0] if len(grads) == 1 else torch.cat(grads)  # (P, H, d)
        return grad.index_select(0, ctx.layout.scatter), None


class _OutOfBlocks(torch.autograd.Function):
    """The blocks' (rows * length, H, d) outputs -> (T, H, d) flat row, pads dropped (gradient: `_IntoBlocks`)."""

    @staticmethod
    def forward(ctx: Any, layout: FlatLayout, *outs: Tensor) -> Tensor:
        ctx.layout = layout
        return (outs[0] if len(outs) == 1 else torch.cat(outs)).index_select(0, layout.scatter)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        layout = ctx.layout
        grad = grad.index_select(0, layout.gather).index_fill_(0, layout.pads, 0)  # (P, H, d)
        return None, *grad.split(layout.sizes)


def enabled(*models: nn.Module | None) -> bool:
    """Whether `enable` switched every one of these models to padding-free attention (a None is skipped: a model
    the caller does not have, such as a cached reference)."""
    return all(
        getattr(getattr(base_model(m), "config", None), "_attn_implementation", None) == ATTENTION
        for m in models
        if m is not None
    )


def enable(model: nn.Module) -> bool:
    """Route the model's attention through `attention` (registered once); False, the model left as it was, if it
    cannot use it: not on sdpa, or its sequences do not stay apart in a flat row (`_keeps_sequences_apart`)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    base = base_model(model)
    config = getattr(base, "config", None)
    if config is None or not type(base).__module__.startswith("transformers."):
        return False
    was = getattr(config, "_attn_implementation", None)
    if was == ATTENTION:
        return True
    if was != "sdpa":
        return False  # eager (often chosen for what sdpa lacks, e.g. soft-capping) and flash-attention stay as they are
    AttentionInterface.register(ATTENTION, attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    config._attn_implementation = ATTENTION
    if _keeps_sequences_apart(base):
        return True
    config._attn_implementation = was
    logger.warning(
        "%s: padding-free batches are off (in one flat row its sequences would see each other, so it runs padded "
        "batches: same results, more compute on pads)",
        type(base).__name__,
    )
    return False


def _keeps_sequences_apart(model: nn.Module) -> bool:
    """Whether the second of two sequences in a flat row gives the last hidden states it gives alone (relative
    difference under 1e-4 in fp32, 8 machine epsilons in half precision), the model in eval mode for the check.

    A padding-free forward is only right where every token-mixing step of the model is attention that gets the
    layout, and positions come from `position_ids`. Not so where a decoder layer drops the keyword arguments it
    should pass down (the layout never reaches attention: `transformers`' StableLM and Nemotron), where a model tests
    for the name "sdpa" instead of calling the attention interface (Falcon), or where layers other than attention
    carry state along the row (Mamba, convolution and linear-attention layers of hybrids such as Qwen3-Next, Qwen3.5,
    Jamba, LFM2). On tiny random models those differ from the sequence alone by 1e-3 to 1 relative, and models that
    keep them apart by under 5e-7."""
    backbone = model.base_model
    weight = next(backbone.parameters(), None)
    if weight is None or weight.device.type == "meta":
        return False
    vocab = backbone.get_input_embeddings().num_embeddings
    first, second = [(i % (vocab - 1)) + 1 for i in range(4)], [(i % (vocab - 1)) + 1 for i in range(4, 7)]
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            ids = torch.tensor([first + second], device=weight.device)
            inputs = {k: v.to(weight.device) for k, v in flat_inputs([len(first), len(second)]).items()}
            flat = backbone(input_ids=ids, **inputs, use_cache=False).last_hidden_state[0, len(first) :].float()
            alone = backbone(input_ids=ids[:, len(first) :], use_cache=False).last_hidden_state[0].float()
    except Exception as exc:  # a model whose forward needs more than token ids
        logger.debug("padding-free check of %s failed: %s", type(model).__name__, exc)
        return False
    finally:
        backbone.train(was_training)
    tolerance = max(1e-4, 8 * torch.finfo(weight.dtype).eps)
    return bool((flat - alone).abs().max() <= tolerance * alone.abs().max())
