"""Tiny tokenizers and causal LMs, built offline and deterministically.

Tests and the demo use these instead of downloads. Everything goes through the real `save_pretrained` /
`from_pretrained` code paths, so a tiny checkpoint directory is indistinguishable from a hub checkpoint.

Three families, chosen because they differ where RLHF code usually breaks:

| style   | model            | BOS added   | template starts with BOS | pad token                 | after the EOS |
|---------|------------------|-------------|--------------------------|---------------------------|---------------|
| `llama` | LlamaForCausalLM | yes         | yes (double-BOS trap)    | `<pad>` (own id)          | nothing       |
| `gpt2`  | GPT2LMHeadModel  | no          | no                       | `</s>` (pad == eos)       | nothing       |
| `qwen2` | Qwen2ForCausalLM | no BOS      | no (ChatML)              | `<|endoftext|>` (own id)  | a newline     |

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
    Qwen2Config,
    Qwen2ForCausalLM,
)

Style = Literal["llama", "gpt2", "qwen2"]
STYLES: tuple[Style, ...] = ("llama", "gpt2")
"""The two families of the same vocabulary (ids 0-6 special, then the 256 bytes) that most tests run on."""
ALL_STYLES: tuple[Style, ...] = (*STYLES, "qwen2")

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


CHATML_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]

# ChatML as Qwen2 writes it: every turn, the assistant's too, ends with <|im_end|> and a newline.
_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(style: Style = "llama") -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (vocab: the style's special tokens + 256 bytes) with a chat template."""
    if style not in ALL_STYLES:
        raise ValueError(f"unknown tokenizer style {style!r}; expected one of {ALL_STYLES}")
    if style == "qwen2":
        return _build_chatml_tokenizer()
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


def _build_chatml_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(CHATML_SPECIAL_TOKENS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=_CHATML_TEMPLATE,
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
    elif style == "qwen2":
        config = Qwen2Config(
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=max(1, num_heads // 2),  # grouped-query attention, as Qwen2 has
            max_position_embeddings=max_positions,
            tie_word_embeddings=True,
            **common,
        )
        model = Qwen2ForCausalLM(config)
    else:
        raise ValueError(f"unknown model style {style!r}; expected one of {ALL_STYLES}")
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
