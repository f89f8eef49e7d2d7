"""Decoding attention over shared prompts: the cascade of a prompt part and a row's own part against plain softmax
attention over the row's whole sequence."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.models.shared_prefix import SharedPrefix


def plain_attention(q, k, v, scale):
    """softmax(scale q k^T) v for one query: q (H, d), k/v (S, H, d) -> (H, d), in float64."""
    s = torch.einsum("hd,shd->hs", q.double(), k.double()) * scale
    return torch.einsum("hs,shd->hd", s.softmax(-1), v.double())


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_a_rows_attention_is_softmax_over_its_prompt_and_its_own_tokens(heads, kv_heads):
    """3 prompts (widths 5, 3, 7 in 7 columns, left-padded) continued by rows [0, 0, 2, 1, 2, 2] with 4 own
    positions each: every row's output equals plain attention over [its prompt's real positions | its own], for
    any number of query heads per key head; the same after rows leave (`rows`)."""
    torch.manual_seed(0)
    G, P, t, d = 3, 7, 4, 8
    widths = [5, 3, 7]
    mask = torch.tensor([[c >= P - w for c in range(P)] for w in widths])
    keys, values = torch.randn(G, kv_heads, P, d), torch.randn(G, kv_heads, P, d)
    keys[~mask[:, None, :, None].expand_as(keys)] = 1e3  # pads that would dominate were they not masked
    group = torch.tensor([0, 0, 2, 1, 2, 2])
    b = len(group)
    query, own_k, own_v = torch.randn(b, heads, 1, d), torch.randn(b, kv_heads, t, d), torch.randn(b, kv_heads, t, d)
    prefix = SharedPrefix.of([keys], [values], mask, group)
    assert prefix.slot.tolist() == [0, 1, 0, 0, 1, 2] and prefix.slots == 3
    scale = 0.3
    out = prefix.attend(0, query, own_k, own_v, scale)
    assert out.shape == (b, 1, heads, d)
    per_kv = heads // kv_heads

    def expected(r, g):
        real = mask[g]
        k = torch.cat([keys[g][:, real], own_k[r]], dim=1).transpose(0, 1)  # (S, Hkv, d)
        v = torch.cat([values[g][:, real], own_v[r]], dim=1).transpose(0, 1)
        k, v = k.repeat_interleave(per_kv, 1), v.repeat_interleave(per_kv, 1)
        return plain_attention(query[r, :, 0], k, v, scale)

    for r, g in enumerate(group.tolist()):
        torch.testing.assert_close(out[r, 0].double(), expected(r, g), rtol=1e-5, atol=1e-6)
    kept = torch.tensor([1, 2, 5])  # rows 0, 3 and 4 ended
    fewer = prefix.rows(kept)
    assert fewer.group.tolist() == [0, 2, 2] and fewer.slot.tolist() == [0, 0, 1] and fewer.slots == 2
    out = fewer.attend(0, query[kept], own_k[kept], own_v[kept], scale)
    for i, r in enumerate(kept.tolist()):
        torch.testing.assert_close(out[i, 0].double(), expected(r, int(group[r])), rtol=1e-5, atol=1e-6)


def test_the_default_scale_is_one_over_the_square_root_of_the_head_size():
    torch.manual_seed(1)
    keys, values = torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4)
    query, own_k, own_v = torch.randn(1, 1, 1, 4), torch.randn(1, 1, 1, 4), torch.randn(1, 1, 1, 4)
    prefix = SharedPrefix.of([keys], [values], torch.ones(1, 2, dtype=torch.bool), torch.tensor([0]))
    got = prefix.attend(0, query, own_k, own_v, None)
    k, v = torch.cat([keys[0, 0], own_k[0, 0]]), torch.cat([values[0, 0], own_v[0, 0]])
    want = plain_attention(query[0, :, 0], k[:, None], v[:, None], 1 / math.sqrt(4))
    torch.testing.assert_close(got[0, 0].double(), want, rtol=1e-5, atol=1e-6)


def test_a_prompt_of_pads_alone_leaves_the_rows_own_attention():
    """A prompt with no real position contributes nothing (no NaN): the output is attention over the own part."""
    torch.manual_seed(2)
    keys, values = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    query, own_k, own_v = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 2, 4), torch.randn(2, 2, 2, 4)
    prefix = SharedPrefix.of([keys], [values], torch.zeros(1, 3, dtype=torch.bool), torch.tensor([0, 0]))
    got = prefix.attend(0, query, own_k, own_v, 0.5)
    for r in range(2):
        want = plain_attention(query[r, :, 0], own_k[r].transpose(0, 1), own_v[r].transpose(0, 1), 0.5)
        torch.testing.assert_close(got[r, 0].double(), want, rtol=1e-5, atol=1e-6)
