"""Rollout masking and sampling."""

from __future__ import annotations

import functools
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

import rlhf.rollout.generation as generation
from rlhf.models import padding_free
from rlhf.models.shared_prefix import CacheCheck, SharedPrefix
from rlhf.rollout.generation import (
    HFGenerationBackend,
    SamplingConfig,
    decode,
    decodes_itself,
    generate_rollout,
    keeps_prompts_apart,
    key_hash,
    keyed_uniform,
    mask_after_eos,
    reserved_cache,
    sampler,
    stop_tokens,
    stream_keys,
)
from rlhf.tasks.tiny import make_tiny_checkpoint


def test_mask_after_eos_hand_case():
    eos, pad = 2, 0
    ids = torch.tensor([[7, 8, 2, 9, 2], [7, 7, 7, 7, 7], [2, 5, 5, 5, 5]])
    out, mask, ended = mask_after_eos(ids, eos, pad)
    assert out.tolist() == [[7, 8, 2, 0, 0], [7, 7, 7, 7, 7], [2, 0, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert ended.tolist() == [True, False, True]


def test_generate_rollout_is_seeded_and_left_padded(tiny_dirs):
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).train()
    tok = AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    backend = HFGenerationBackend(model, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    prompt_ids = torch.tensor([[0, 0, 1, 5, 70], [1, 5, 70, 71, 72]])
    prompt_mask = (prompt_ids != 0).long()
    sampling = SamplingConfig(max_new_tokens=6)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(generate_rollout(backend, prompt_ids, prompt_mask, sampling, eos_token_id=2, pad_token_id=0))
    a, b = runs
    assert torch.equal(a.response_ids, b.response_ids)
    assert a.response_ids.shape[0] == 2 and a.response_ids.shape[1] <= 6
    assert a.input_ids.shape == (2, 5 + a.response_ids.shape[1])
    assert torch.equal(a.attention_mask[:, :5], prompt_mask)
    assert model.training  # generation leaves the train/eval mode as it found it


def test_the_checkpoints_generation_config_does_not_change_sampling(tiny_dirs, tmp_path):
    """A generation_config.json with a repetition penalty, a minimum length and top_k 1 changes what plain
    `generate` draws; the backend draws exactly what it draws from the same weights without that file."""
    shipped = tmp_path / "shipped"
    shutil.copytree(tiny_dirs["llama"], shipped)
    settings = {"do_sample": True, "top_k": 1, "repetition_penalty": 5.0, "min_new_tokens": 8}
    (shipped / "generation_config.json").write_text(json.dumps(settings | {"eos_token_id": 2, "pad_token_id": 0}))
    plain, with_file = (AutoModelForCausalLM.from_pretrained(d).eval() for d in (tiny_dirs["llama"], shipped))
    prompt_ids = torch.tensor([[1, 5, 70], [1, 5, 71]]).repeat(4, 1)
    prompt_mask = torch.ones_like(prompt_ids)
    sampling = SamplingConfig(max_new_tokens=8)

    def draw(model, *, raw=False):
        torch.manual_seed(7)
        if raw:
            kwargs = {"do_sample": True, "max_new_tokens": 8, "eos_token_id": 2, "pad_token_id": 0}
            return model.generate(prompt_ids, attention_mask=prompt_mask, **kwargs)[:, 3:]
        backend = HFGenerationBackend(model, eos_token_id=2, pad_token_id=0)
        return backend.generate(prompt_ids, prompt_mask, sampling, torch.arange(len(prompt_ids)))

    assert not torch.equal(draw(plain, raw=True), draw(with_file, raw=True))  # the file does change plain generate
    assert torch.equal(draw(with_file), draw(plain))
    assert with_file.generation_config.repetition_penalty == 5.0  # and is back in place afterwards


def _draw_frequencies(logits: torch.Tensor, sampling: SamplingConfig, n: int = 40_000, steps: int = 1) -> torch.Tensor:
    """Frequencies of the tokens drawn by n rows (keys 0..n-1, `model.generate`'s layout) at the step `steps - 1`."""
    race = sampler(sampling, stream_keys(0, 0, torch.arange(n)), rows_as_ids=False)
    for _ in range(steps):
        scores = race(torch.zeros(n, 1, dtype=torch.long), logits.repeat(n, 1))
    return torch.bincount(scores.argmax(-1), minlength=logits.shape[0]).double() / n


def _assert_frequencies(freq: torch.Tensor, probs: torch.Tensor, n: int = 40_000) -> None:
    sigma = (probs * (1 - probs) / n).sqrt()
    assert ((freq - probs).abs() <= 5 * sigma + 1e-12).all(), (freq, probs)


def test_greedy_argmax_of_the_sampler_draws_from_the_softmax():
    """The keyed draw picks token i with probability softmax(logits)_i; -inf tokens never."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, float("-inf")])
    probs = torch.tensor([2.0, 1.0, 0.0, -1.0]).exp().double()
    for steps in (1, 2):  # the first and the next step of the same rows
        freq = _draw_frequencies(logits, SamplingConfig(), steps=steps)
        _assert_frequencies(freq, torch.cat([probs / probs.sum(), torch.zeros(1, dtype=torch.double)]))
        assert freq[-1] == 0


def test_the_sampler_applies_temperature_and_top_k_as_do_sample_does():
    """temperature 0.5, top_k 2 on logits [1, 0, 0.5, -2]: tokens 0 and 2 only, in the ratio e^(1/0.5) : e^(0.5/0.5)."""
    logits = torch.tensor([1.0, 0.0, 0.5, -2.0])
    freq = _draw_frequencies(logits, SamplingConfig(temperature=0.5, top_k=2))
    p0 = 1 / (1 + torch.tensor(-1.0).exp().double())  # e^2 / (e^2 + e^1)
    _assert_frequencies(freq, torch.stack([p0, torch.tensor(0.0).double(), 1 - p0, torch.tensor(0.0).double()]))
    assert freq[1] == freq[3] == 0


def _greedy_hf(model, prompt_ids, prompt_mask, eos, n):
    out = model.generate(
        prompt_ids, attention_mask=prompt_mask, do_sample=False, max_new_tokens=n, eos_token_id=eos, pad_token_id=0
    )
    return mask_after_eos(out[:, prompt_ids.shape[1] :], eos, 0)[0]


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_decode_greedy_equals_generate_while_rows_leave_the_batch(tiny_dirs, style):
    """Greedy `decode` (no processors) gives `model.generate`'s greedy tokens on left-padded prompts of three
    lengths, with an EOS chosen so the rows stop at different steps: the rows that stopped leave the batch and
    the KV cache, and the others go on exactly as before."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[style]).eval()
    prompt_ids = torch.tensor(
        [[0, 0, 0, 5, 70, 71], [0, 5, 72, 73, 74, 75], [5, 80, 81, 82, 83, 84], [0, 0, 5, 9, 9, 9]]
    )
    prompt_mask = (prompt_ids != 0).long()
    free = _greedy_hf(model, prompt_ids, prompt_mask, eos=-1, n=10)  # no EOS: the unrestricted greedy paths
    eos = int(free[0, 2])  # row 0 stops at its third token; the others where (if) this token comes up
    want = _greedy_hf(model, prompt_ids, prompt_mask, eos=eos, n=10)
    got = decode(model, prompt_ids, prompt_mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    _, lengths, _ = mask_after_eos(got, eos, 0)
    assert lengths.sum(-1).min() < lengths.sum(-1).max(), "the rows should stop at different steps"
    assert torch.equal(got, want[:, : got.shape[1]]) and (want[:, got.shape[1] :] == 0).all()


@pytest.mark.parametrize("capacity", [12, 7])
def test_the_reserved_cache_holds_what_the_dynamic_cache_holds(capacity):
    """Two layers, a prefill of 5 positions, then one at a time, a row repeated, rows dropped twice: `reserved_cache`
    returns the keys and values `DynamicCache` returns (all positions so far, rows in the kept order) at every
    update, within the reserved room (12) and past it (7: it grows). Without a config its layers are made as updates
    reach them."""
    gen = torch.Generator().manual_seed(0)
    ours, theirs = reserved_cache(torch.nn.Linear(2, 2), capacity), DynamicCache()
    rows, updates = 6, [5, 1, 1, 1, 1, 1, 1]
    for i, n in enumerate(updates):
        for layer in range(2):
            k, v = torch.randn(rows, 2, n, 3, generator=gen), torch.randn(rows, 2, n, 4, generator=gen)
            got, want = ours.update(k, v, layer), theirs.update(k, v, layer)
            assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
        assert ours.get_seq_length() == sum(updates[: i + 1])
        if i in (0, 2, 4):  # after the prefill a row's cache handed to two rows (`decode`), later rows dropped
            keep = {0: torch.tensor([0, 0, 1, 2, 3, 4, 5]), 2: torch.tensor([4, 0, 2]), 4: torch.tensor([1, 2])}[i]
            ours.reorder_cache(keep), theirs.reorder_cache(keep)
            rows = len(keep)
    assert [type(layer).__name__ for layer in ours.layers] == ["_ReservedLayer"] * 2


def test_decode_drives_transformers_models_with_a_cache_and_peft_wrappers(tiny_dirs):
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])
    assert decodes_itself(model) and decodes_itself(AutoModelForCausalLM.from_pretrained(tiny_dirs["gpt2"]))
    assert decodes_itself(get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])))
    assert not decodes_itself(torch.nn.Linear(2, 2))


def test_state_space_models_sample_through_generate():
    """Mamba's own `prepare_inputs_for_generation` drops the attention mask after the prefill, which `decode` keeps
    (and then drew other tokens than the model's). Such models sample through `generate`: the backend's greedy
    rollout equals greedy decoding that recomputes the whole sequence at every step, with no cache."""
    from transformers import AutoConfig

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "mamba", vocab_size=300, hidden_size=64, num_hidden_layers=4, state_size=16, tie_word_embeddings=False
    )  # tied embeddings repeat the last token whatever the state
    model = AutoModelForCausalLM.from_config(config).eval()
    assert not decodes_itself(model)
    prompts = [[1, 221, 5, 9, 17], [1, 40, 41]]
    prompt_ids = torch.tensor([[0] * (5 - len(p)) + p for p in prompts])  # left-padded
    backend = HFGenerationBackend(model, eos_token_id=-1, pad_token_id=0)
    got = backend.generate(prompt_ids, (prompt_ids != 0).long(), SamplingConfig(max_new_tokens=6, greedy=True), None)
    for row, prompt in enumerate(prompt_ids):
        seq = prompt[prompt != 0].tolist()
        for _ in range(6):
            with torch.no_grad():
                seq.append(int(model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].argmax()))
        assert got[row].tolist() == seq[-6:]


@pytest.mark.parametrize("through_generate", [False, True])
def test_rollouts_end_at_every_end_token_the_model_names(tiny_dirs, monkeypatch, through_generate):
    """An instruct model's turn can end at a token other than its tokenizer's EOS (Gemma's <end_of_turn>), which its
    generation config names: rollouts end at the first of either, through `decode` and through `generate`."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).eval()
    tok = AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    prompt_ids = torch.tensor([[0, 0, 5, 70, 71], [5, 80, 81, 82, 83]])
    prompt_mask = (prompt_ids != 0).long()
    free = _greedy_hf(model, prompt_ids, prompt_mask, eos=-1, n=8)
    end_of_turn = int(free[0, 2])  # row 0's third token
    assert stop_tokens(tok, model) == (tok.eos_token_id,)
    model.generation_config.eos_token_id = [end_of_turn, tok.eos_token_id]
    stops = stop_tokens(tok, model)
    assert stops == (tok.eos_token_id, end_of_turn)
    monkeypatch.setattr(generation, "decodes_itself", lambda model: not through_generate)
    backend = HFGenerationBackend(model, eos_token_id=stops, pad_token_id=0)
    greedy = SamplingConfig(max_new_tokens=8, greedy=True)
    rollout = generate_rollout(backend, prompt_ids, prompt_mask, greedy, eos_token_id=stops, pad_token_id=0)
    want, mask, ended = mask_after_eos(free, stops, 0)
    assert rollout.response_mask.sum(-1).tolist() == mask.sum(-1).tolist() and mask[0].sum() == 3
    assert torch.equal(rollout.response_ids, want[:, : rollout.response_ids.shape[1]])
    assert rollout.ended_with_eos.tolist() == ended.tolist() and bool(ended[0])


def test_keyed_uniforms_are_uniform_and_independent_over_rows_and_steps():
    """keyed_uniform is a pure function of (key, step), in (0, 1), with the moments of U(0, 1) and no correlation
    between neighbouring keys or steps (the ones a counter hash could get wrong); streams do not overlap."""
    hashed = key_hash(stream_keys(5, 3, torch.arange(2**16)))
    u0, u1 = keyed_uniform(hashed, 0), keyed_uniform(hashed, 1)
    assert torch.equal(u0, keyed_uniform(hashed, 0)) and ((u0 > 0) & (u0 < 1)).all()
    n = u0.numel()
    assert abs(u0.mean() - 0.5) < 5 * (1 / 12 / n) ** 0.5
    assert abs(u0.var() - 1 / 12) < 5 * (1 / 180 / n) ** 0.5  # Var of (U - 1/2)^2 is 1/180

    def corr(a, b):
        return float(torch.corrcoef(torch.stack([a, b]))[0, 1])

    bound = 5 / (n // 2) ** 0.5
    assert abs(corr(u0, u1)) < bound  # the same row, the next step
    assert abs(corr(u0[:-1], u0[1:])) < bound  # neighbouring keys
    assert (
        len(set(stream_keys(5, 3, torch.arange(8)).tolist()) | set(stream_keys(5, 4, torch.arange(8)).tolist())) == 16
    )


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_a_rows_sample_depends_on_its_key_not_on_the_rows_beside_it(tiny_dirs, style):
    """Sampled rows of one batch equal the same rows sampled in other batches, with other neighbours and other
    left padding, in any chunking: what lets N processes sample what one process does (the rows leave the
    batch at different steps, so the keys follow the rows that are still going)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[style]).eval()
    prompt_ids = torch.tensor([[0, 0, 5, 70], [0, 5, 72, 73], [5, 80, 81, 82], [0, 0, 5, 9], [0, 0, 0, 5]] * 4)
    prompt_mask = (prompt_ids != 0).long()
    keys = stream_keys(1, 2, torch.arange(len(prompt_ids)))
    sampling = SamplingConfig(max_new_tokens=12, temperature=1.5)

    def rollout(rows, chunk=None, eos=-1):
        ids, mask = prompt_ids[rows], prompt_mask[rows]
        width = int(mask.sum(-1).max())  # strip the columns no row of this batch needs
        backend = HFGenerationBackend(model, eos_token_id=eos, pad_token_id=0)
        out = generate_rollout(
            backend,
            ids[:, -width:],
            mask[:, -width:],
            sampling,
            eos_token_id=eos,
            pad_token_id=0,
            chunk_size=chunk,
            keys=keys[rows],
        )
        return out.response_ids, out.response_mask

    free, _ = rollout(torch.arange(20))  # no EOS: every row runs to the end; then stop at the commonest token
    rollout = functools.partial(rollout, eos=int(free.flatten().mode().values))
    whole, whole_mask = rollout(torch.arange(20))
    assert len(set(map(tuple, whole.tolist()))) > 10, "the rows should differ"
    assert 0 < int(whole_mask.sum(-1).min()) < int(whole_mask.sum(-1).max()), "rows should stop at different steps"
    for rows, chunk in ((torch.arange(1, 20, 2), None), (torch.arange(0, 20, 2), 3), (torch.tensor([13, 2]), 1)):
        part, part_mask = rollout(rows, chunk)
        width = part.shape[1]
        assert torch.equal(part, whole[rows, :width]) and torch.equal(part_mask, whole_mask[rows, :width])
        assert not whole_mask[rows, width:].any()


def test_chunks_take_rows_of_similar_prompt_length_without_their_shared_left_padding(tiny_dirs):
    """Rows of prompt lengths 2, 5, 1, 5, 3, 2 in chunks of 2: the chunks get rows (1, 3), (4, 0), (5, 2), longest
    first (ties in row order), each no wider than its longest prompt; the rollout, in row order, is the one sampled
    all at once."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).eval()
    lengths = [2, 5, 1, 5, 3, 2]
    prompt_ids = torch.tensor([[0] * (5 - n) + [5 + r + i for i in range(n)] for r, n in enumerate(lengths)])
    prompt_mask = (prompt_ids != 0).long()
    keys = stream_keys(2, 7, torch.arange(6))
    backend = HFGenerationBackend(model, eos_token_id=-1, pad_token_id=0)
    calls = []

    def recorded(ids, mask, sampling, keys):
        calls.append((ids.clone(), mask.sum(-1).tolist()))
        return HFGenerationBackend.generate(backend, ids, mask, sampling, keys)

    backend.generate = recorded
    sampling = SamplingConfig(max_new_tokens=5, temperature=1.5)
    chunked = generate_rollout(backend, prompt_ids, prompt_mask, sampling, eos_token_id=-1, pad_token_id=0,
                               chunk_size=2, keys=keys)  # fmt: skip
    assert [(ids.shape[1], n) for ids, n in calls] == [(5, [5, 5]), (3, [3, 2]), (2, [2, 1])]
    assert torch.equal(calls[2][0], prompt_ids[[5, 2], 3:])
    whole = generate_rollout(backend, prompt_ids, prompt_mask, sampling, eos_token_id=-1, pad_token_id=0, keys=keys)
    assert torch.equal(chunked.response_ids, whole.response_ids) and torch.equal(chunked.prompt_ids, prompt_ids)
    assert len(set(map(tuple, whole.response_ids.tolist()))) == 6


def test_a_prompt_that_several_rows_sample_from_is_prefilled_once(tiny_dirs, monkeypatch):
    """A GRPO-like batch, 3 prompts x 4 rows: the prefill runs 3 rows, and the keyed samples equal those of a
    prefill of all 12 rows."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).eval()
    prompt_ids = torch.tensor([[0, 5, 70, 71]] * 4 + [[5, 72, 73, 74]] * 4 + [[0, 0, 5, 9]] * 4)
    prompt_mask = (prompt_ids != 0).long()
    keys = stream_keys(3, 1, torch.arange(12))
    prefills = []
    model.register_forward_pre_hook(lambda _, args, kw: prefills.append(kw["input_ids"].shape), with_kwargs=True)

    def sample():
        processors = sampler(SamplingConfig(max_new_tokens=6, temperature=1.5), keys)
        return decode(model, prompt_ids, prompt_mask, max_new_tokens=6, eos_token_id=-1, pad_token_id=0,
                      logits_processor=processors)  # fmt: skip

    shared = sample()
    assert prefills[0] == (3, 4) and len(set(map(tuple, shared.tolist()))) == 12
    every_row = torch.arange(12)
    monkeypatch.setattr(generation, "prompt_groups", lambda ids, mask: (every_row, every_row))  # 12 "prompts"
    prefills.clear()
    assert torch.equal(sample(), shared) and prefills[0] == (12, 4)


@pytest.mark.parametrize("style", ["llama", "gpt2", "qwen2"])
def test_decoding_with_each_prompts_cache_kept_once_draws_what_a_copy_per_row_draws(
    tiny_dirs, tmp_path, monkeypatch, style
):
    """On our attention function the prompts' KV cache stays one per prompt and each row's holds its own tokens
    (`models.shared_prefix`; here at any size); the keyed samples equal those of the same model on sdpa, whose
    cache is copied to every row, with left-padded prompts of 4, 3 and 5 rows and rows ending at EOS at different
    steps (Qwen2's grouped-query attention included)."""
    monkeypatch.setattr(generation, "SHARED_PREFIX_MIN_REREAD", 0)
    path = tiny_dirs.get(style) or str(make_tiny_checkpoint(tmp_path / style, style, hidden_size=32))
    plain = AutoModelForCausalLM.from_pretrained(path).eval()
    ours = AutoModelForCausalLM.from_pretrained(path).eval()
    assert padding_free.enable(ours) and keeps_prompts_apart(ours) and not keeps_prompts_apart(plain)
    prompt_ids = torch.tensor([[0, 5, 70, 71]] * 4 + [[5, 72, 73, 74]] * 3 + [[0, 0, 5, 9]] * 5)
    prompt_mask = (prompt_ids != 0).long()
    keys = stream_keys(4, 2, torch.arange(12))

    def sample(model, eos):
        processors = sampler(SamplingConfig(max_new_tokens=10, temperature=1.5), keys)
        return decode(model, prompt_ids, prompt_mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=0,
                      logits_processor=processors)  # fmt: skip

    eos = int(sample(plain, -1).flatten().mode().values)  # the commonest token ends rows
    want = sample(plain, eos)
    is_eos = want == eos
    lengths = torch.where(is_eos.any(-1), is_eos.int().argmax(-1) + 1, want.shape[1])
    assert len(set(lengths.tolist())) >= 3, "rows should end at different steps"
    kept = kept_once_calls(monkeypatch)
    assert torch.equal(sample(ours, eos), want)
    assert len(kept) == 1  # so the rows decoded over their prompts' one cache


def kept_once_calls(monkeypatch) -> list[SharedPrefix]:
    """The prompts' caches `decode` keeps once (`SharedPrefix.of` from `_kept_once`), recorded."""
    made = []

    class Recorded(SharedPrefix):
        @classmethod
        def of(cls, *args, **kwargs):
            made.append(SharedPrefix.of(*args, **kwargs))
            return made[-1]

    monkeypatch.setattr(generation, "SharedPrefix", Recorded)
    return made


def test_the_prompts_cache_is_kept_once_only_where_copies_would_read_it_again_enough(tiny_dirs, monkeypatch):
    """3 + 2 rows of two prompts 4 positions wide: copies would re-read (5 - 2) x 4 positions x (keys + values) x
    the key heads x head size of a layer's cache each step. At that threshold the prompts' cache is kept once, one
    element above it the rows get copies, and both draw the same tokens."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).eval()
    assert padding_free.enable(model)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    reread = (5 - 2) * 4 * 2 * config.num_key_value_heads * head_dim
    prompt_ids = torch.tensor([[0, 5, 70, 71]] * 3 + [[5, 72, 73, 74]] * 2)
    keys = stream_keys(2, 1, torch.arange(5))
    kept = kept_once_calls(monkeypatch)

    def sample(threshold):
        monkeypatch.setattr(generation, "SHARED_PREFIX_MIN_REREAD", threshold)
        processors = sampler(SamplingConfig(max_new_tokens=6, temperature=1.5), keys)
        return decode(model, prompt_ids, (prompt_ids != 0).long(), max_new_tokens=6, eos_token_id=-1, pad_token_id=0,
                      logits_processor=processors)  # fmt: skip

    once = sample(reread)
    assert len(kept) == 1
    assert torch.equal(sample(reread + 1), once) and len(kept) == 1


@pytest.mark.parametrize("kind", ["diffllama", "hrm_text"])
def test_a_model_that_does_not_attend_to_its_cache_as_it_is_gets_a_copy_per_row(kind, monkeypatch):
    """DiffLlama attends to each half of the values in turn, HRM indexes its cache by recurrent cycle: the prefill's
    `CacheCheck` finds it, and the rows decode on a copy of the prompt's cache, drawing what the model on sdpa
    draws (a shared prompt's cache there gave other tokens)."""
    from transformers import AutoConfig

    monkeypatch.setattr(generation, "SHARED_PREFIX_MIN_REREAD", 0)
    config = AutoConfig.for_model(kind, vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                  pad_token_id=0, eos_token_id=2, bos_token_id=1)  # fmt: skip
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(config).eval()
    ours = AutoModelForCausalLM.from_config(config).eval()
    ours.load_state_dict(plain.state_dict())
    assert padding_free.enable(ours) and keeps_prompts_apart(ours)
    prompt_ids = torch.tensor([[0, 5, 70, 71]] * 3 + [[5, 72, 73, 74]] * 2)
    prompt_mask = (prompt_ids != 0).long()
    keys = stream_keys(1, 1, torch.arange(5))
    checks = []

    class Recorded(CacheCheck):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            checks.append(self)

    def sample(model):
        processors = sampler(SamplingConfig(max_new_tokens=8, temperature=1.5), keys)
        return decode(model, prompt_ids, prompt_mask, max_new_tokens=8, eos_token_id=-1, pad_token_id=0,
                      logits_processor=processors)  # fmt: skip

    monkeypatch.setattr(generation, "CacheCheck", Recorded)
    kept = kept_once_calls(monkeypatch)
    got = sample(ours)
    assert len(checks) == 1 and not checks[0].passed and not kept
    assert torch.equal(got, sample(plain))


def test_a_model_trained_in_bf16_generates_under_one_autocast(tiny_dirs):
    """A model the engine trains in bf16 (`precision.mark_autocast`) generates under one bf16 autocast for the whole
    call (its forward sees it on, with no wrapper of its own), and computes exactly the logits, and draws, of the
    same model with autocast entered at every forward, as `accelerate` wraps a prepared model."""
    from rlhf.models import precision

    tok = AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    ids = {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    prompt_ids = torch.tensor([[0, 0, 1, 5, 70], [1, 5, 70, 71, 72]])
    prompt_mask = (prompt_ids != 0).long()
    sampling, keys = SamplingConfig(max_new_tokens=8), torch.tensor([11, 12])

    def run(model):
        """The drawn tokens, each forward's last logits, and the autocast dtype each forward saw (None: off)."""
        logits, seen = [], []
        model.model.register_forward_pre_hook(
            lambda *_: seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        )
        model.register_forward_hook(lambda m, args, out: logits.append(out.logits[:, -1].float()))
        return HFGenerationBackend(model, **ids).generate(prompt_ids, prompt_mask, sampling, keys), logits, seen

    wrapped = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])
    wrapped.forward = torch.autocast("cpu", torch.bfloat16)(wrapped.forward)  # keeps the signature, as accelerate's
    assert decodes_itself(wrapped)
    want, want_logits, _ = run(wrapped)

    _, fp32_logits, fp32_seen = run(AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]))
    marked = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])
    precision.mark_autocast(marked, "bf16")
    got, got_logits, seen = run(marked)
    assert set(fp32_seen) == {None} and seen and set(seen) == {torch.bfloat16}
    assert torch.equal(got, want) and len(got_logits) == len(want_logits)
    for a, b, c in zip(got_logits, want_logits, fp32_logits, strict=False):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert not torch.equal(a, c)  # bf16 logits: the equality above says something
