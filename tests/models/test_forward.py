"""Forward helpers against a plain per-row computation with no padding at all."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf.config import ModelConfig
from rlhf.models import padding_free
from rlhf.models.forward import (
    Unpadded,
    causal_lm_logprobs,
    position_ids_from_mask,
    prompt_groups,
    score_index,
    sequence_scores,
    token_scores,
)
from rlhf.models.loading import load_scalar_model
from rlhf.models.value import PolicyWithValue


def _plain_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(x_t | x_<t) for one unpadded row, straight from log_softmax."""
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    return torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_left_padded_response_logprobs_match_unpadded_rows(tiny_dirs, style):
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[style]).eval()
    pad = 0
    prompts = [[5, 70, 71, 72], [5, 80]]
    responses = [[90, 91, 2], [93, 2, pad]]  # second response is one token shorter (right-padded)
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p + r for p, r in zip(prompts, responses, strict=True)])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) + [1, 1, 1] for p in prompts])
    mask[1, -1] = 0
    with torch.no_grad():
        got, entropy, _ = causal_lm_logprobs(model, ids, mask, response_len=3, with_entropy=True)
        assert got.shape == (2, 3) and entropy is not None and entropy.shape == (2, 3)
        for row, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            n = 3 if row == 0 else 2
            want = _plain_logprobs(model, p + r[:n])[-n:]
            torch.testing.assert_close(got[row, :n], want, atol=1e-5, rtol=1e-5)


def test_full_sequence_logprobs_shape_and_values(tiny_dirs):
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).eval()
    ids = [1, 5, 70, 71, 6, 90, 2]
    with torch.no_grad():
        got, entropy, _ = causal_lm_logprobs(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
        assert entropy is None
        torch.testing.assert_close(got[0], _plain_logprobs(model, ids), atol=1e-5, rtol=1e-5)


def test_score_index_is_the_rightmost_non_pad_token_either_padding_side():
    """Rows [5 6 7 . .], [. . 5 6 7], [5 6 2 2 2] (pad 0 shown as ".", padding masked): 2, 4, 4; with pad id 2 (pad
    == eos) the last row is read at its last non-pad token, 1; a row of pad ids only at its last token."""
    ids = torch.tensor([[5, 6, 7, 0, 0], [0, 0, 5, 6, 7], [5, 6, 2, 2, 2], [2, 2, 2, 2, 2]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert score_index(ids, mask, 0).tolist() == [2, 4, 4, 4]
    assert score_index(ids, mask, 2).tolist() == [2, 4, 1, 4]
    assert score_index(ids, mask, None).tolist() == [2, 4, 4, 4]


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_sequence_score_read_where_transformers_reads_it_whatever_padding(tiny_dirs, style):
    """Right- and left-padded batches give the score of the unpadded row, read as `transformers`' own pooling reads
    it: at the EOS (llama), at the token before it when EOS is the pad id (gpt2)."""
    model = load_scalar_model(ModelConfig(path=tiny_dirs[style]), trainable=False)
    tok = AutoTokenizer.from_pretrained(tiny_dirs[style])
    eos, pad = tok.eos_token_id, tok.pad_token_id
    long_row, short_row = [5, 70, 71, 72, 73, eos], [5, 80, eos]
    with torch.no_grad():
        alone = [
            sequence_scores(model, torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long))
            for r in (long_row, short_row)
        ]
        right = sequence_scores(
            model, torch.tensor([long_row, short_row + [pad] * 3]), torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
        )
        left = sequence_scores(
            model, torch.tensor([long_row, [pad] * 3 + short_row]), torch.tensor([[1] * 6, [0] * 3 + [1] * 3])
        )
        without_eos = sequence_scores(model, torch.tensor([short_row[:-1]]), torch.ones(1, 2, dtype=torch.long))
        native = model(input_ids=torch.tensor([short_row])).logits[0]
    want = torch.cat(alone)
    torch.testing.assert_close(right, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(left, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone[1], native, atol=1e-5, rtol=1e-5)
    assert torch.allclose(without_eos, alone[1]) == (pad == eos)  # pad == eos: the EOS is not what is read


# ---------------------------------------------------------------- padding-free passes of padded batches


def _rollout_like_batch(pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[left-padded prompt | response padded after EOS]: rows of 4+3, 2+1 and 3+2 attended tokens, width 4+3."""
    ids = torch.tensor([[5, 70, 71, 72, 90, 91, 2], [pad, pad, 5, 80, 2, pad, pad], [pad, 5, 81, 82, 93, 2, pad]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 0]])
    return ids, mask


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_padding_free_logprobs_equal_the_padded_pass(tiny_dirs, style):
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[style])
    ids, mask = _rollout_like_batch()
    want = causal_lm_logprobs(model, ids, mask, response_len=3, with_entropy=True, hidden=True)
    assert padding_free.enable(model)
    flat = Unpadded.of(mask)
    assert flat.index.tolist() == [[0, 1, 2, 3, 4, 5, 6], [-1, -1, 7, 8, 9, -1, -1], [-1, 10, 11, 12, 13, 14, -1]]
    got = causal_lm_logprobs(model, ids, mask, response_len=3, with_entropy=True, flat=flat, hidden=True)
    attended = mask[:, -3:].bool()
    from_pad = ~mask[:, -4:-1].bool()  # row 1's last response token is predicted from a pad (after its EOS)
    assert from_pad.tolist() == [[False] * 3, [False, False, True], [False] * 3]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a[attended], b[attended], atol=1e-5, rtol=1e-5)
        assert (a[from_pad] == 0).all() and (a[~from_pad] != 0).any(-1).all()
    full = causal_lm_logprobs(model, ids, mask, flat=flat).logprobs  # every position (B, L-1)
    both = mask[:, 1:].bool() & mask[:, :-1].bool()
    torch.testing.assert_close(full[both], causal_lm_logprobs(model, ids, mask).logprobs[both], atol=1e-5, rtol=1e-5)
    assert (full[~mask[:, :-1].bool()] == 0).all()  # predicted from a pad


def test_padding_free_scores_and_values_equal_the_padded_pass(tiny_dirs):
    """Sequence scores, per-token critic values and an actor-critic pass (value head and separate critic)."""
    ids, mask = _rollout_like_batch()
    flat = Unpadded.of(mask)
    rm = load_scalar_model(ModelConfig(path=tiny_dirs["llama"]), trainable=False)
    want_seq, want_tok = sequence_scores(rm, ids, mask), token_scores(rm, ids, mask)
    assert padding_free.enable(rm)
    torch.testing.assert_close(sequence_scores(rm, ids, mask, flat=flat), want_seq, atol=1e-5, rtol=1e-5)
    got_tok = token_scores(rm, ids, mask, flat=flat)
    torch.testing.assert_close(got_tok[mask.bool()], want_tok[mask.bool()], atol=1e-5, rtol=1e-5)
    assert (got_tok[~mask.bool()] == 0).all()

    policy = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])
    for actor_critic in (PolicyWithValue(policy, value_head=True), PolicyWithValue(policy, rm)):
        if actor_critic.value_head is not None:
            torch.nn.init.normal_(actor_critic.value_head.weight)  # zero-initialised: make the values non-trivial
        padding_free.enable(policy)
        want = actor_critic(ids, mask, response_len=3)  # padded: no layout given
        got = actor_critic(ids, mask, response_len=3, flat=flat)
        attended = mask[:, -3:].bool()
        for a, b in ((got.logprobs, want.logprobs), (got.values, want.values)):
            torch.testing.assert_close(a[attended], b[attended], atol=1e-5, rtol=1e-5)


def _group_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two groups as GRPO lays them out: prompt [5, 70, 71] three times (responses of 2, 3 and 1 tokens), then
    prompt [5, 80] twice (responses of 3 and 2 tokens); left-padded prompts of width 3, responses of width 3."""
    ids = torch.tensor([[5, 70, 71, 90, 2, 0], [5, 70, 71, 91, 92, 2], [5, 70, 71, 2, 0, 0],
                        [0, 5, 80, 93, 94, 2], [0, 5, 80, 95, 2, 0]])  # fmt: skip
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0],
                         [0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0]])  # fmt: skip
    return ids, mask


def test_rows_that_share_a_prompt_run_it_once_with_the_same_results(tiny_dirs):
    """The shared layout: one flat sequence per prompt, [prompt | response 1 | ... | response k] (15 tokens for
    the batch's 23), every row's prompt positions pointing at the one prompt. Log-probs, entropy, hidden states,
    critic values and the gradients of their sum equal the padded pass's."""
    ids, mask = _group_batch()
    flat = Unpadded.of(mask, ids, prompt_len=3)
    assert flat.spans == ((3, 2, 3, 1), (2, 3, 2)) and flat.lengths == (9, 7)
    assert flat.index.tolist() == [[0, 1, 2, 3, 4, -1], [0, 1, 2, 5, 6, 7], [0, 1, 2, 8, -1, -1],
                                   [-1, 9, 10, 11, 12, 13], [-1, 9, 10, 14, 15, -1]]  # fmt: skip
    assert ids.flatten()[flat.tokens].tolist() == [5, 70, 71, 90, 2, 91, 92, 2, 2, 5, 80, 93, 94, 2, 95, 2]
    assert flat.kwargs(ids, torch.nn.Linear(1, 1))["position_ids"].tolist() == [
        [0, 1, 2, 3, 4, 3, 4, 5, 3, 0, 1, 2, 3, 4, 2, 3]]  # fmt: skip
    assert Unpadded.of(mask[[0, 3]], ids[[0, 3]], prompt_len=3).spans is None  # no prompt twice: one row each

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])
    attended = mask[:, -3:].bool()
    want = causal_lm_logprobs(model, ids, mask, response_len=3, with_entropy=True, hidden=True)
    (want.logprobs[attended].sum() + want.hidden[attended].sum()).backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    assert padding_free.enable(model)
    got = causal_lm_logprobs(model, ids, mask, response_len=3, with_entropy=True, hidden=True, flat=flat)
    from_pad = ~mask[:, -4:-1].bool()  # predicted from a pad (after the row's EOS): 0
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a[~from_pad], b[~from_pad], atol=1e-5, rtol=1e-5)
        assert (a[from_pad] == 0).all()
    (got.logprobs[attended].sum() + got.hidden[attended].sum()).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want_grads[n], atol=1e-5, rtol=1e-4)

    ids4, mask4 = ids[:4], mask[:4]  # 14 tokens shared: filled to 16 under bf16 autocast, which changes nothing
    flat4 = Unpadded.of(mask4, ids4, prompt_len=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        filled = flat4.kwargs(ids4, model)
        assert filled["input_ids"].shape == (1, 16) and filled["position_ids"][0, -2:].tolist() == [0, 1]
        bf16 = causal_lm_logprobs(model, ids4, mask4, response_len=3, flat=flat4).logprobs
        unshared = causal_lm_logprobs(model, ids4, mask4, response_len=3, flat=Unpadded.of(mask4)).logprobs
    torch.testing.assert_close(bf16[~from_pad[:4]], unshared[~from_pad[:4]], atol=0.05, rtol=0.02)

    critic = load_scalar_model(ModelConfig(path=tiny_dirs["llama"]), trainable=False)
    want_values = token_scores(critic, ids, mask)
    assert padding_free.enable(critic)
    got_values = token_scores(critic, ids, mask, flat=flat)
    torch.testing.assert_close(got_values[mask.bool()], want_values[mask.bool()], atol=1e-5, rtol=1e-5)
    assert (got_values[~mask.bool()] == 0).all()


def test_prompt_groups_by_hand():
    """Rows 0 and 2 hold the same prompt (its pads differ in id, not in the mask); row 3 the same tokens as row 1 but
    one fewer attended: groups numbered by their first rows, 0 1 0 2, first rows 0 1 3."""
    ids = torch.tensor([[0, 5, 6], [5, 6, 7], [9, 5, 6], [5, 6, 7]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 1, 1], [0, 1, 1]])
    group, first = prompt_groups(ids, mask)
    assert group.tolist() == [0, 1, 0, 2] and first.tolist() == [0, 1, 3]


def test_a_shuffled_batch_of_groups_shares_each_prompt_once():
    """Property, on 6 prompts x 4 rows shuffled (as an update's minibatch): every attended position of every row
    reads its own token id at its own position from the flat row, each prompt's tokens appear once in it, and the
    rows of one prompt point at the same tokens for it."""
    gen = torch.Generator().manual_seed(0)
    B, P, R = 24, 9, 5
    prompt_len = torch.randint(3, P + 1, (6,), generator=gen).repeat_interleave(4)
    prompts = torch.randint(10, 200, (6, P), generator=gen).repeat_interleave(4, 0)
    response_len = torch.randint(1, R + 1, (B,), generator=gen)
    cols = torch.arange(P + R)
    mask = torch.cat([cols[None, :P] >= P - prompt_len[:, None], cols[None, :R] < response_len[:, None]], 1).long()
    ids = torch.cat([prompts, torch.randint(10, 200, (B, R), generator=gen)], 1) * mask
    want_tokens = int(prompt_len[::4].sum() + response_len.sum())  # each prompt once, every response
    perm = torch.randperm(B, generator=gen)
    ids, mask = ids[perm], mask[perm]
    flat = Unpadded.of(mask, ids, prompt_len=P)
    assert len(flat.tokens) == want_tokens and len(flat.spans) == 6
    real = mask.bool()
    inputs = flat.kwargs(ids, torch.nn.Linear(1, 1))
    flat_ids, flat_positions = inputs["input_ids"][0], inputs["position_ids"][0]
    assert torch.equal(flat_ids[flat.index[real]], ids[real])
    assert torch.equal(flat_positions[flat.index[real]], position_ids_from_mask(mask)[real])
    for a in range(B):
        for b in range(B):
            if torch.equal(ids[a, :P], ids[b, :P]):
                assert torch.equal(flat.index[a, :P], flat.index[b, :P])


def test_a_layout_for_a_model_that_cannot_run_padding_free_is_ignored(tiny_dirs):
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], attn_implementation="eager")
    ids, mask = _rollout_like_batch()
    want = causal_lm_logprobs(model, ids, mask, response_len=3)
    got = causal_lm_logprobs(model, ids, mask, response_len=3, flat=Unpadded.of(mask))
    torch.testing.assert_close(got, want)


def test_flat_rows_are_filled_where_matmuls_run_in_bf16_on_the_cpu(tiny_dirs, monkeypatch):
    """15 attended tokens: one flat row of 15 in fp32; under bf16 autocast, or with bf16 weights, of 16 (a filler
    of 1 token: `padding_free.ROW_MULTIPLE`), which changes no real token's log-prob or score."""
    ids, mask = _rollout_like_batch()
    policy = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])
    rm = load_scalar_model(ModelConfig(path=tiny_dirs["llama"], dtype="bfloat16"), trainable=False)
    assert padding_free.enable(policy) and padding_free.enable(rm)
    flat = Unpadded.of(mask)
    assert flat.kwargs(ids, policy)["input_ids"].shape == (1, 15)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        filled = flat.kwargs(ids, policy)
        assert filled["input_ids"].shape == (1, 16) and filled["position_ids"][0, -1] == 0
        logprobs = causal_lm_logprobs(policy, ids, mask, response_len=3, flat=flat).logprobs
    assert flat.kwargs(ids, rm)["input_ids"].shape == (1, 16)
    scores = token_scores(rm, ids, mask, flat=flat)
    monkeypatch.setattr(padding_free, "ROW_MULTIPLE", 1)  # the same passes on the unfilled row
    unfilled = Unpadded.of(mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert unfilled.kwargs(ids, policy)["input_ids"].shape == (1, 15)
        want_logprobs = causal_lm_logprobs(policy, ids, mask, response_len=3, flat=unfilled).logprobs
    want_scores = token_scores(rm, ids, mask, flat=unfilled)
    torch.testing.assert_close(logprobs, want_logprobs, atol=0, rtol=0)
    torch.testing.assert_close(scores, want_scores, atol=0, rtol=0)
