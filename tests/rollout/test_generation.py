"""Rollout masking and sampling."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf.rollout.generation import HFGenerationBackend, SamplingConfig, generate_rollout, mask_after_eos


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
