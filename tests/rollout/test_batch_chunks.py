"""PPO micro-batches cut by estimated cost: a partition of the rows, never over size, padding reduced."""

from __future__ import annotations

import random
from typing import NamedTuple

import pytest
import torch

from rlhf.rollout.batch import RolloutBatch


class Tokens(NamedTuple):
    adv: torch.Tensor  # (B, T)


def _batch(prompt_lens: list[int], resp_lens: list[int], P: int = 8, T: int = 12) -> RolloutBatch:
    ids = torch.zeros(len(prompt_lens), P + T, dtype=torch.long)
    att = torch.zeros_like(ids)
    resp = torch.zeros(len(prompt_lens), T)
    for i, (p, r) in enumerate(zip(prompt_lens, resp_lens, strict=True)):
        att[i, P - p : P + r] = 1
        ids[i, P - p : P + r] = torch.arange(1, p + r + 1) + 100 * i  # unique ids locate each row's tokens
        resp[i, :r] = 1.0
    return RolloutBatch(ids, att, resp, Tokens(resp * torch.arange(len(prompt_lens))[:, None]))


@pytest.mark.parametrize("seed", range(20))
def test_chunks_partition_the_rows_within_size_and_keep_every_real_token(seed: int) -> None:
    rng = random.Random(seed)
    n, size = rng.randint(1, 17), rng.randint(1, 6)
    prompts = [rng.randint(1, 8) for _ in range(n)]
    resps = [rng.choice([rng.randint(1, 3), 12]) for _ in range(n)]  # mostly short, a few at the limit
    batch = _batch(prompts, resps)
    rows = list(range(n))
    chunks = batch.chunks_by_cost(rows, size, overhead_tokens=rng.choice([0, 16, 128]))
    seen = [int(r) for c in chunks for r in c.rows]
    assert sorted(seen) == rows  # every row exactly once
    assert all(1 <= len(c) <= size for c in chunks)
    for c in chunks:
        for j, r in enumerate(c.rows.tolist()):
            assert c.attention_mask[j].sum() == prompts[r] + resps[r]  # no real token trimmed
            want = batch.input_ids[r][batch.attention_mask[r].bool()]
            assert torch.equal(c.input_ids[j][c.attention_mask[j].bool()], want)
            assert torch.equal(c.tokens.adv[j, : resps[r]], torch.full((resps[r],), float(r)))


def test_one_long_response_gets_its_own_chunk_instead_of_padding_the_rest() -> None:
    """Seven rows of response 1 and one of response 12 (prompts 2), size 8, overhead 16 per forward:
    together 16 + 8 x 14 = 128; the long row apart (16 + 14) + (16 + 7 x 3) = 67; every row apart
    8 x 16 + 14 + 7 x 3 = 163; three chunks at best (16 + 14) + (16 + 3 x 3) + (16 + 4 x 3) = 83."""
    batch = _batch([2] * 8, [1] * 7 + [12])
    chunks = batch.chunks_by_cost(list(range(8)), 8, overhead_tokens=16)
    assert sorted(len(c) for c in chunks) == [1, 7]
    assert [c.rows.tolist() for c in chunks if len(c) == 1] == [[7]]


def test_rows_of_one_prompt_stay_together_in_the_place_of_their_longest() -> None:
    """Two prompts x 3 rows, interleaved, and a lone prompt: chunks of 3 rows follow the groups (the group with the
    longest row first, ties in the order of first rows), each chunk's layout runs its prompt once; distinct prompts
    alone are ordered by length, as before."""
    batch = _batch([4, 3, 4, 3, 4, 3, 2], [2, 5, 1, 2, 3, 1, 9])
    batch.input_ids[:, :8] = torch.tensor([[0] * 4 + [7, 8, 9, 10], [0] * 5 + [11, 12, 13]] * 3 + [[0] * 6 + [3, 4]])
    chunks = batch.chunks_by_length(range(7), 3)
    assert [c.rows.tolist() for c in chunks] == [[6, 1, 3], [5, 0, 2], [4]]  # 11 tokens; group B's 8; group A's 7
    chunks = batch.chunks_by_length([1, 0, 2, 3, 5, 4], 3)  # a minibatch's shuffled rows: group B first (its 8)
    assert [c.rows.tolist() for c in chunks] == [[1, 3, 5], [0, 2, 4]]
    spans = [c.flat.spans for c in batch.micro_batches([1, 0, 2, 3, 5, 4], 3, flat=True)]
    assert spans == [((3, 5, 2, 1),), ((4, 2, 1, 3),)]  # one flat sequence each: [prompt | 3 responses]
    singles = _batch([1, 2, 3], [1, 1, 1])
    assert [c.rows.tolist() for c in singles.chunks_by_length([0, 1, 2], 3)] == [[2, 1, 0]]
