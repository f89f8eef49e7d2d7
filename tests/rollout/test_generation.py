"""Rollout masking and sampling."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf.rollout.generation import (
    HFGenerationBackend,
    SamplingConfig,
    decode,
    decodes_itself,
    generate_rollout,
    mask_after_eos,
    sampler,
)


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
        return HFGenerationBackend(model, eos_token_id=2, pad_token_id=0).generate(prompt_ids, prompt_mask, sampling)

    assert not torch.equal(draw(plain, raw=True), draw(with_file, raw=True))  # the file does change plain generate
    assert torch.equal(draw(with_file), draw(plain))
    assert with_file.generation_config.repetition_penalty == 5.0  # and is back in place afterwards


def _draw_frequencies(logits: torch.Tensor, sampling: SamplingConfig, n: int = 40_000) -> torch.Tensor:
    torch.manual_seed(0)
    scores = sampler(sampling)(torch.zeros(n, 1, dtype=torch.long), logits.repeat(n, 1))
    return torch.bincount(scores.argmax(-1), minlength=logits.shape[0]).double() / n


def _assert_frequencies(freq: torch.Tensor, probs: torch.Tensor, n: int = 40_000) -> None:
    sigma = (probs * (1 - probs) / n).sqrt()
    assert ((freq - probs).abs() <= 5 * sigma + 1e-12).all(), (freq, probs)


def test_greedy_argmax_of_the_sampler_draws_from_the_softmax():
    """The exponential race picks token i with probability softmax(logits)_i; -inf tokens never."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, float("-inf")])
    freq = _draw_frequencies(logits, SamplingConfig())
    probs = torch.tensor([2.0, 1.0, 0.0, -1.0]).exp().double()
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


def test_decode_drives_transformers_models_with_a_cache_and_peft_wrappers(tiny_dirs):
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])
    assert decodes_itself(model) and decodes_itself(AutoModelForCausalLM.from_pretrained(tiny_dirs["gpt2"]))
    assert decodes_itself(get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])))
    assert not decodes_itself(torch.nn.Linear(2, 2))
