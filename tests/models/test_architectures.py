"""Every fast path, on tiny random models of the architecture families users bring: whatever route a model takes
(padding-free rows, shared-prompt trees, our decoding, or the padded and `generate` fallbacks), the log-probs are
each row's own and greedy rollouts are the model's greedy path. A survey of the causal LMs of `transformers` 5.24
found the fast paths silently wrong on StableLM, Falcon and every hybrid before `enable` checked them; this keeps
a family of each kind in the suite, so an upgrade of `transformers` that breaks one shows here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from rlhf.config import ModelConfig
from rlhf.models import padding_free
from rlhf.models.forward import Unpadded, causal_lm_logprobs
from rlhf.models.loading import load_causal_lm
from rlhf.rollout.generation import HFGenerationBackend, SamplingConfig, decodes_itself, generate_rollout
from rlhf.tasks.tiny import build_tokenizer

SIZES = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 64, "tie_word_embeddings": False}  # fmt: skip
LINEAR = {"linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 8}

# family: (config kwargs, padding-free, our decoding)
FAMILIES: dict[str, tuple[dict[str, Any], bool, bool]] = {
    "llama": ({}, True, True),
    "qwen3": ({"head_dim": 8}, True, True),
    "gemma3_text": ({"head_dim": 8, "sliding_window": 4}, True, True),  # sliding layers narrower than the rows
    "phi3": ({}, True, False),  # its own prepare_inputs_for_generation
    "gpt_neox": ({}, True, True),
    "opt": ({"ffn_dim": 64, "word_embed_proj_dim": 32}, True, True),
    "qwen2_moe": (
        {
            "moe_intermediate_size": 16,
            "shared_expert_intermediate_size": 16,
            "num_experts": 4,
            "num_experts_per_tok": 2,
        },
        True,
        True,
    ),  # fmt: skip
    "stablelm": ({}, False, True),  # its layers drop the layout
    "falcon": ({"new_decoder_architecture": True, "num_kv_heads": 2}, False, True),  # tests for "sdpa" by name
    "qwen3_5_text": ({"head_dim": 8, "layer_types": ["linear_attention", "full_attention"], **LINEAR}, False, False),
    "mamba": ({"state_size": 8}, False, False),
}


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_tokenizer("llama")


def _checkpoint(model_type: str, kwargs: dict[str, Any], tokenizer: Any, out: Path) -> Path:
    special = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id, "bos_token_id": 1}
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **SIZES, **special, **kwargs)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_route_gives_each_rows_own_log_probs_and_greedy_path(family: str, tokenizer: Any, tmp_path: Path) -> None:
    """Rows 0 and 2 share a prompt; responses end at different lengths; sequences reach 12 tokens."""
    kwargs, flat_route, decode_route = FAMILIES[family]
    model = load_causal_lm(ModelConfig(path=str(_checkpoint(family, kwargs, tokenizer, tmp_path))), trainable=False)
    assert padding_free.enabled(model) == flat_route and decodes_itself(model) == decode_route
    pad = tokenizer.pad_token_id
    pairs = [([1, 40, 41, 42, 43, 44, 45], [60, 61, 62, 63, 64]), ([1, 50, 51], [70, 71]),
             ([1, 40, 41, 42, 43, 44, 45], [80, 81, 82, 83])]  # fmt: skip
    P, R = 7, 5
    ids = torch.tensor([[pad] * (P - len(p)) + p + r + [pad] * (R - len(r)) for p, r in pairs])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * (len(p) + len(r)) + [0] * (R - len(r)) for p, r in pairs])
    with torch.no_grad():
        for flat in (None, Unpadded.of(mask), Unpadded.of(mask, ids, P)):
            got = causal_lm_logprobs(model, ids, mask, response_len=R, flat=flat).logprobs
            for row, (p, r) in enumerate(pairs):
                logits = model(input_ids=torch.tensor([p + r])).logits[0, -len(r) - 1 : -1]
                want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(r)[:, None]).squeeze(-1)
                torch.testing.assert_close(got[row, : len(r)], want, atol=1e-5, rtol=1e-5)

    prompt_ids, prompt_mask = ids[:, :P], mask[:, :P]
    backend = HFGenerationBackend(model, eos_token_id=-1, pad_token_id=pad)
    greedy = SamplingConfig(max_new_tokens=4, greedy=True)
    rollout = generate_rollout(backend, prompt_ids, prompt_mask, greedy, eos_token_id=-1, pad_token_id=pad)
    for row, (prompt, _) in enumerate(pairs):
        seq = list(prompt)
        for _ in range(4):
            with torch.no_grad():
                seq.append(int(model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].argmax()))
        assert rollout.response_ids[row].tolist() == seq[-4:], f"row {row}"
