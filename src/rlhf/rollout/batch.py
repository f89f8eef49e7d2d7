"""A rollout batch from generation to the updates: its sequences, its per-token record, chunks and micro-batches.

* `RolloutBatch` holds the sequences `[left-padded prompt | right-padded response]` (B, P+T) with a typed record
  of per-token tensors (B, T) that the algorithm's loss reads (`tokens`: a NamedTuple such as PPO's old
  log-probs, values, advantages and returns), and selects rows for chunks and minibatches with the padding
  columns every selected row shares trimmed away (left of the longest prompt, right of the longest response).
  Trimming changes no result beyond float rounding: positions come from the attention mask.
* `score_in_chunks` runs a model function over a batch in chunks of rows under `torch.no_grad`, one batched
  forward per model and chunk (PPO: old log-probs and values, and reference log-probs, in one call). Chunks
  group rows of similar length (`chunks_by_length`). A training step's `micro_batches` run padding-free
  (with their `Unpadded` layout) where the models can; otherwise they are also cut where a few long
  responses would pad many short ones (`chunks_by_cost`), so little compute goes to padding.

Shared by the online trainers (PPO, GRPO, RLOO); `rollout.experience` makes the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor

from rlhf.models.forward import Unpadded, prompt_groups
from rlhf.rollout.generation import Rollout

MICRO_BATCH_OVERHEAD_TOKENS = 128
"""The fixed cost of one padded micro-batch's forward and backward, in padded tokens (`chunks_by_cost`; measured
on the CPU PPO benchmark, where splitting off a few long responses pays from about this many tokens)."""

TokenFn = Callable[[Tensor, Tensor, int], Sequence[Tensor | None]]
"""fn(input_ids (b, L), attention_mask (b, L), T) -> tensors (b, T) (or None) for the last T tokens."""

TokensT = TypeVar("TokensT", bound=tuple[Any, ...])
"""The per-token record of a rollout batch: a NamedTuple whose fields are (B, T) tensors (or None), or () for
sequences alone."""


def map_tokens(tokens: TokensT, fn: Callable[[Tensor], Tensor]) -> TokensT:
    """`fn` applied to every tensor field of a per-token record (None fields stay None), same record type."""
    values = [None if t is None else fn(t) for t in tokens]
    make = getattr(type(tokens), "_make", None)  # a NamedTuple; a plain tuple takes the iterable itself
    return make(values) if make is not None else type(tokens)(values)  # type: ignore[return-value]


@dataclass
class RolloutBatch(Generic[TokensT]):
    """A rollout's sequences (B, P+T), its response mask (B, T) and the per-token record its loss reads."""

    input_ids: Tensor  # (B, P+T) left-padded prompt, right-padded response
    attention_mask: Tensor  # (B, P+T) long; 0 on padding and after each response's first EOS
    response_mask: Tensor  # (B, T) float, 1.0 up to and including the first EOS
    tokens: TokensT  # per-token tensors (B, T), e.g. `trainers.ppo.PPOTokens`; () for sequences alone
    rows: Tensor | None = None  # row indices into the batch this one was selected from, when it was
    flat: Unpadded | None = None  # its padding-free layout, when it runs padding-free (`micro_batches`)

    @classmethod
    def from_rollout(cls, rollout: Rollout) -> RolloutBatch[tuple[()]]:
        return RolloutBatch(rollout.input_ids, rollout.attention_mask, rollout.response_mask, ())

    def with_tokens(self, tokens: Any) -> RolloutBatch[Any]:
        """The same sequences with a per-token record (B, T) attached."""
        return RolloutBatch(self.input_ids, self.attention_mask, self.response_mask, tokens)

    @property
    def response_len(self) -> int:
        return self.response_mask.shape[1]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: Sequence[int] | Tensor | slice) -> RolloutBatch[TokensT]:
        """The given rows, with the padding columns they all share trimmed away (left and right)."""
        if not isinstance(rows, slice):
            rows = torch.as_tensor(rows, dtype=torch.long).to(self.input_ids.device)
        ids, mask, resp = self.input_ids[rows], self.attention_mask[rows], self.response_mask[rows]
        prompt_len = ids.shape[1] - resp.shape[1]
        attended = mask[:, :prompt_len].any(0)  # (P,)
        start = int(attended.float().argmax()) if bool(attended.any()) else prompt_len
        keep = max(int(resp.sum(-1).max()), 1) if resp.numel() else 0  # longest response in these rows
        end = prompt_len + keep
        return RolloutBatch(
            ids[:, start:end], mask[:, start:end], resp[:, :keep], map_tokens(self.tokens, lambda t: t[rows][:, :keep])
        )

    def chunks_by_length(self, rows: Sequence[int] | Tensor, size: int) -> list[RolloutBatch[TokensT]]:
        """`rows` split into chunks of at most `size`, longest sequences first, each chunk trimmed: grouping rows
        of similar length keeps the padding (and so the compute) of every chunk small. Rows with the same prompt
        (a GRPO group) stay next to each other, in the place of their longest, so that a chunk's flat layout runs
        their prompt once (`Unpadded.of`). It is a partition of the rows, so an accumulated gradient does not
        depend on it (up to float rounding). Each chunk's `rows` holds its row indices into this batch."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        if not len(rows):
            return []
        lengths = self.attention_mask.sum(-1).cpu()[rows]
        P = self.input_ids.shape[1] - self.response_len
        group, first = prompt_groups(self.input_ids[:, :P].cpu()[rows], self.attention_mask[:, :P].cpu()[rows])
        longest = torch.zeros(len(first), dtype=lengths.dtype).scatter_reduce(0, group, lengths, "amax")  # (G,)
        n, G = len(rows), len(first)
        shorter = int(longest.max()) - longest[group]  # (n,) >= 0: 0 for the longest group
        order = rows[torch.argsort((shorter * G + group) * n + torch.arange(n))]  # by length, then first place
        chunks = []
        for start in range(0, len(order), size):
            chunk = self.select(order[start : start + size])
            chunk.rows = order[start : start + size]
            chunks.append(chunk)
        return chunks

    def chunks_by_cost(
        self, rows: Sequence[int] | Tensor, size: int, overhead_tokens: int
    ) -> list[RolloutBatch[TokensT]]:
        """`rows` split into chunks of at most `size` rows that minimise the estimated compute: a forward costs
        `overhead_tokens` plus the trimmed chunk's area (rows x (longest prompt + longest response)). Rows are
        ordered by response length, then prompt length (both descending), and cut where it pays (dynamic
        programming over the cut points), so a few long responses get a chunk of their own instead of padding
        the short ones. Like `chunks_by_length` it is a partition of the rows, so an accumulated gradient does
        not depend on it (up to float rounding); each chunk's `rows` holds its row indices into this batch."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        P = self.input_ids.shape[1] - self.response_len
        resp = self.response_mask.sum(-1).cpu().long()[rows]
        prompt = self.attention_mask[:, :P].sum(-1).cpu().long()[rows]
        order = torch.argsort(resp * (P + 1) + prompt, descending=True, stable=True)
        r, p, order = resp[order].tolist(), prompt[order].tolist(), rows[order]
        n = len(r)
        best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
        for end in range(1, n + 1):
            max_p = 0
            for start in range(end - 1, max(end - size, 0) - 1, -1):
                max_p = max(max_p, p[start])
                cost = best[start] + overhead_tokens + (end - start) * (max_p + max(r[start], 1))
                if cost < best[end]:
                    best[end], cut[end] = cost, start
        bounds, end = [], n
        while end > 0:
            bounds.append((cut[end], end))
            end = cut[end]
        chunks = []
        for start, end in reversed(bounds):
            chunk = self.select(order[start:end])
            chunk.rows = order[start:end]
            chunks.append(chunk)
        return chunks

    def micro_batches(self, rows: Sequence[int] | Tensor, size: int, *, flat: bool) -> list[RolloutBatch[TokensT]]:
        """A minibatch's `rows` as the micro-batches of a training step, at most `size` rows each.

        Padding-free (`flat`): rows of similar length (`chunks_by_length`), each with its layout attached; its
        attention blocks already group the lengths, so a long response costs the others nothing. Padded: cut
        where that saves padded compute (`chunks_by_cost`). Either way a partition of the rows, so the step's
        gradient does not depend on it (up to float rounding).
        """
        if not flat:
            return self.chunks_by_cost(rows, size, MICRO_BATCH_OVERHEAD_TOKENS)
        chunks = self.chunks_by_length(rows, size)
        for chunk in chunks:  # reads the batch on the host: built before the step
            chunk.flat = Unpadded.of(
                chunk.attention_mask, chunk.input_ids, chunk.input_ids.shape[1] - chunk.response_len
            )
        return chunks

    def to(self, device: torch.device) -> RolloutBatch[TokensT]:
        return RolloutBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.response_mask.to(device),
            map_tokens(self.tokens, lambda t: t.to(device)),
        )


@torch.no_grad()
def score_in_chunks(fn: TokenFn, batch: RolloutBatch[Any], chunk_size: int) -> list[Tensor | None]:
    """`fn` over the batch in chunks of at most `chunk_size` rows grouped by length (`chunks_by_length`), outputs
    put back in row order and padded to (B, T) with 0. One (B, T) tensor per output of `fn` (None where `fn`
    returned None)."""
    B, T = len(batch), batch.response_len
    chunks = batch.chunks_by_length(torch.arange(B), chunk_size)
    outputs = [list(fn(c.input_ids, c.attention_mask, c.response_len)) for c in chunks]
    rows = [c.rows for c in chunks]
    merged: list[Tensor | None] = []
    for parts in zip(*outputs, strict=True):
        if any(p is None for p in parts):
            merged.append(None)
            continue
        full = torch.zeros(B, T, dtype=parts[0].dtype, device=parts[0].device)  # type: ignore[union-attr]
        for idx, p in zip(rows, parts, strict=True):
            assert p is not None
            full[idx.to(full.device), : p.shape[1]] = p
        merged.append(full)
    return merged
