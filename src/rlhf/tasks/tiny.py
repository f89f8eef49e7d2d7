"""Tiny tokenizers and causal LMs, built offline and deterministically.

Tests and the demo use these instead of downloads. Everything goes through the real `save_pretrained` /
`from_pretrained` code paths, so a tiny checkpoint directory is indistinguishable from a hub checkpoint.

Two families, chosen because they differ where RLHF code usually breaks:

| style   | model              | BOS added by tokenizer | chat template starts with BOS | pad token            |
|---------|--------------------|------------------------|-------------------------------|----------------------|
| `llama` | LlamaForCausalLM   | yes                    | yes (double-BOS trap)         | `<pad>` (own id)     |
| `gpt2`  | GPT2LMHeadModel    | no                     | no                            | `</s>` (pad == eos)  |

The tokenizer is byte-level with no merges: every UTF-8 byte is one token, so any text round-trips and
token counts are predictable (ASCII: one token per character).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

Style = Literal["llama", "gpt2"]
STYLES: tuple[Style, ...] = ("llama", "gpt2")

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]

# Role markers are special tokens; system and user turns end with a newline, assistant turns with EOS
# (nothing after it, so a rendered response ends exactly at EOS). `add_generation_prompt` opens a turn.
_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(style: Style = "llama") -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (vocab: 7 special tokens + 256 bytes) with a chat template."""
    if style not in STYLES:
        raise ValueError(f"unknown tokenizer style {style!r}; expected one of {STYLES}")
    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(byte_alphabet):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    if style == "llama":
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
        )
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    template = ("{{ bos_token }}" + _CHAT_TEMPLATE) if style == "llama" else _CHAT_TEMPLATE
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>" if style == "llama" else "</s>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        chat_template=template,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.padding_side = "right"
    return tokenizer


def build_model(
    tokenizer: PreTrainedTokenizerFast,
    style: Style = "llama",
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 512,
    seed: int = 0,
) -> PreTrainedModel:
    """A randomly initialised tiny causal LM; the same seed gives the same weights."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model: PreTrainedModel
    if style == "llama":
        config = LlamaConfig(
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
            max_position_embeddings=max_positions,
            tie_word_embeddings=False,
            **common,
        )
        model = LlamaForCausalLM(config)
    elif style == "gpt2":
        config = GPT2Config(
            n_embd=hidden_size, n_layer=num_layers, n_head=num_heads, n_positions=max_positions, **common
        )
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(f"unknown model style {style!r}; expected one of {STYLES}")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def make_tiny_checkpoint(out_dir: str | Path, style: Style = "llama", *, seed: int = 0, **model_kwargs: int) -> Path:
    """Write a tiny model and its tokenizer to `out_dir` with `save_pretrained`; return the directory."""
    out = Path(out_dir)
    tokenizer = build_tokenizer(style)
    model = build_model(tokenizer, style, seed=seed, **model_kwargs)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
