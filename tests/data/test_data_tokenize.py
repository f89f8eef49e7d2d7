"""Chat template, BOS/EOS and truncation rules (rlhf.data.tokenize) on both tiny tokenizer families.

The tiny tokenizers are byte-level without merges: ASCII letter c has id ord(c) - 26 ('a' = 71), space is
227, newline 205; specials: <pad> 0, <s> 1, </s> 2, <|system|> 4, <|user|> 5, <|assistant|> 6. The llama
tokenizer adds BOS by default AND its chat template starts with {{ bos_token }} (the double-BOS trap);
the gpt2 tokenizer adds nothing and its pad token is its EOS.
"""

from __future__ import annotations

from typing import Any

import pytest

from rlhf.config import DataConfig
from rlhf.data import (
    IGNORE_INDEX,
    SkipExample,
    pack_sft,
    parse_row,
    tokenize_preference,
    tokenize_prompt,
    tokenize_records,
    tokenize_sft,
    tokenize_unpaired,
)
from rlhf.data.tokenize import example_tokens, longest_first, percentile
from rlhf.tasks.tiny import STYLES, build_tokenizer

BOS, EOS, USER, ASSISTANT = 1, 2, 5, 6
ABC = [71, 72, 73]


def ids_of(text: str) -> list[int]:
    return build_tokenizer("gpt2").encode(text, add_special_tokens=False)


def conv_sft(prompt: str = "sort: abc", answer: str = "abc") -> Any:
    return parse_row(
        {"prompt": [{"role": "user", "content": prompt}], "completion": [{"role": "assistant", "content": answer}]},
        "sft",
    )


@pytest.mark.parametrize("style", STYLES)
def test_conversational_sft_bos_eos_and_prompt_mask(style: str, tokenizers: dict[str, Any], cfg: DataConfig) -> None:
    ex = tokenize_sft(conv_sft(), tokenizers[style], cfg)
    prompt = [USER, *ids_of("sort: abc\n"), ASSISTANT]
    if style == "llama":
        prompt = [BOS, *prompt]  # exactly one BOS, although template and tokenizer each add one
    assert ex["input_ids"] == [*prompt, *ABC, EOS]
    assert ex["labels"] == [IGNORE_INDEX] * len(prompt) + [*ABC, EOS]
    assert ex["prompt_len"] == len(prompt) == (13 if style == "llama" else 12)
    assert ex["input_ids"].count(BOS) == (1 if style == "llama" else 0)
    assert ex["labels"].count(EOS) == 1 and ex["labels"][-1] == EOS
    assert (ex["prompt_truncated"], ex["response_truncated"], ex["template_fallback"]) == (False, False, False)


@pytest.mark.parametrize("style", STYLES)
def test_plain_string_sft(style: str, tokenizers: dict[str, Any], cfg: DataConfig) -> None:
    rec = parse_row({"prompt": "Q: sort cba\nA:", "completion": " abc"}, "sft")
    ex = tokenize_sft(rec, tokenizers[style], cfg)
    prompt = ([BOS] if style == "llama" else []) + ids_of("Q: sort cba\nA:")
    assert ex["input_ids"] == [*prompt, *ids_of(" abc"), EOS]
    assert ex["labels"] == [IGNORE_INDEX] * len(prompt) + [*ids_of(" abc"), EOS]
    # a completion that already ends with EOS does not get a second one; a prompt that starts with BOS neither
    rec = parse_row({"prompt": "<s>Q:", "completion": "abc</s>"}, "sft")
    ex = tokenize_sft(rec, tokenizers[style], cfg)
    assert ex["input_ids"] == [BOS, *ids_of("Q:"), *ABC, EOS]
    assert ex["input_ids"].count(BOS) == 1 and ex["input_ids"].count(EOS) == 1


@pytest.mark.parametrize("style", STYLES)
def test_text_sft_whole_text_carries_loss(style: str, tokenizers: dict[str, Any], cfg: DataConfig) -> None:
    ex = tokenize_sft(parse_row({"text": "abc"}, "sft"), tokenizers[style], cfg)
    if style == "llama":
        assert ex["input_ids"] == [BOS, *ABC, EOS] and ex["labels"] == [IGNORE_INDEX, *ABC, EOS]
        assert ex["prompt_len"] == 1
    else:
        assert ex["input_ids"] == [*ABC, EOS] and ex["labels"] == [*ABC, EOS] and ex["prompt_len"] == 0


def test_template_text_after_eos_is_not_part_of_the_response(cfg: DataConfig) -> None:
    tok = build_tokenizer("gpt2")
    tok.chat_template = tok.chat_template.replace("{{ eos_token }}", "{{ eos_token }}\n")
    ex = tokenize_sft(conv_sft(), tok, cfg)
    assert ex["labels"][ex["prompt_len"] :] == [*ABC, EOS]


def test_template_without_eos_gets_exactly_one_appended(cfg: DataConfig) -> None:
    tok = build_tokenizer("llama")
    tok.chat_template = tok.chat_template.replace("{{ eos_token }}", "\n")
    ex = tokenize_sft(conv_sft(), tok, cfg)
    assert ex["labels"][ex["prompt_len"] :] == [*ABC, 205, EOS]
    assert ex["input_ids"][:2] == [BOS, USER]


def test_template_whose_prompt_is_not_a_prefix_is_dropped_and_counted(cfg: DataConfig) -> None:
    tok = build_tokenizer("gpt2")
    tok.chat_template = tok.chat_template.replace(
        "{% if add_generation_prompt %}<|assistant|>", "{% if add_generation_prompt %}ASSISTANT:"
    )
    with pytest.raises(SkipExample) as info:
        tokenize_sft(conv_sft(), tok, cfg)
    assert str(info.value) == "prompt: the chat template's rendered prompt is not a prefix of the rendered conversation"
    examples, report = tokenize_records([conv_sft()], "sft", tok, cfg)
    assert examples == [] and dict(report.dropped) == {"chat template mismatch": 1}


def test_rows_the_chat_template_refuses_are_dropped_and_counted_under_their_field(cfg: DataConfig) -> None:
    """A template that raises (Gemma's on a system message, Mistral's on roles that do not alternate) drops the row,
    counted and named by the field that made it raise: the prompt, or the response where the prompt renders."""
    tok = build_tokenizer("gpt2")
    refusals = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{% if messages[-1]['content'] == 'zzz' %}{{ raise_exception('no zzz') }}{% endif %}"
    )
    tok.chat_template = refusals + tok.chat_template
    user, answer = {"role": "user", "content": "sort: cba"}, [{"role": "assistant", "content": "abc"}]
    rows = [
        {"prompt": [user], "completion": answer},
        {"prompt": [{"role": "system", "content": "be brief"}, user], "completion": answer},
        {"prompt": [user], "completion": [{"role": "assistant", "content": "zzz"}]},
    ]
    examples, report = tokenize_records([parse_row(r, "sft") for r in rows], "sft", tok, cfg)
    assert len(examples) == 1 and dict(report.dropped) == {"refused by the chat template": 2}
    assert [e.split(": ", 1)[1] for e in report.dropped_examples] == [
        "prompt: the chat template refuses it: System role not supported",
        "response: the chat template refuses it: no zzz",
    ]


@pytest.mark.parametrize("style", STYLES)
def test_keep_end_and_keep_start_prompt_truncation(style: str, tokenizers: dict[str, Any]) -> None:
    rec = parse_row({"prompt": "abcdefghijklmnopqrst", "completion": "xyz"}, "sft")  # 20 prompt tokens
    bos = [BOS] if style == "llama" else []
    ex = tokenize_sft(rec, tokenizers[style], DataConfig(max_length=64, max_prompt_length=10))
    kept = 9 if style == "llama" else 10  # keep_end keeps the leading BOS and the LAST tokens
    assert ex["input_ids"][: ex["prompt_len"]] == bos + ids_of("abcdefghijklmnopqrst")[-kept:]
    assert ex["prompt_len"] == 10 and ex["prompt_truncated"] is True
    assert ex["labels"][10:] == [*ids_of("xyz"), EOS]
    cfg = DataConfig(max_length=64, max_prompt_length=10, truncation_side="keep_start")
    ex = tokenize_sft(rec, tokenizers[style], cfg)
    assert ex["input_ids"][:10] == (bos + ids_of("abcdefghijklmnopqrst"))[:10]


@pytest.mark.parametrize("style", STYLES)
def test_response_truncation_keeps_start_and_has_no_eos(style: str, tokenizers: dict[str, Any]) -> None:
    rec = parse_row({"prompt": "abcde", "completion": "vwxyz"}, "sft")
    prompt_len = 6 if style == "llama" else 5
    ex = tokenize_sft(rec, tokenizers[style], DataConfig(max_length=prompt_len + 3, max_prompt_length=8))
    assert ex["input_ids"][prompt_len:] == ids_of("vwx") and EOS not in ex["labels"]
    assert ex["response_truncated"] is True and len(ex["input_ids"]) == prompt_len + 3


@pytest.mark.parametrize("style", STYLES)
def test_response_truncated_to_nothing_is_reported(style: str, tokenizers: dict[str, Any]) -> None:
    cfg = DataConfig(max_length=8, max_prompt_length=8)
    long_row = parse_row({"prompt": "abcdefghijkl", "completion": "xyz"}, "sft", source="d.jsonl", row=2)
    short_row = parse_row({"prompt": "ab", "completion": "xyz"}, "sft", source="d.jsonl", row=3)
    with pytest.raises(SkipExample):
        tokenize_sft(long_row, tokenizers[style], cfg)
    examples, report = tokenize_records([long_row, short_row], "sft", tokenizers[style], cfg)
    assert len(examples) == 1 and report.rows == 2 and report.examples == 1
    assert dict(report.dropped) == {"response truncated to nothing": 1}
    assert report.dropped_examples == [
        "d.jsonl:2: response: truncated to nothing (the prompt takes 8 of max_length 8 tokens)"
    ]
    assert report.truncated_prompts == 0  # only kept examples are counted as truncated


@pytest.mark.parametrize("style", STYLES)
def test_preference_conversational(style: str, tokenizers: dict[str, Any], cfg: DataConfig) -> None:
    rec = parse_row(
        {
            "prompt": [{"role": "user", "content": "sort: abc"}],
            "chosen": [{"role": "assistant", "content": "abc"}],
            "rejected": [{"role": "assistant", "content": "cba"}],
            "margin": 0.5,
        },
        "preference",
    )
    ex = tokenize_preference(rec, tokenizers[style], cfg)
    assert (
        ex["prompt_ids"] == tokenize_sft(conv_sft(), tokenizers[style], cfg)["input_ids"][: ex["prompt_ids"].__len__()]
    )
    assert ex["prompt_ids"][-1] == ASSISTANT and ex["prompt_ids"].count(BOS) == (1 if style == "llama" else 0)
    assert ex["chosen_ids"] == [*ABC, EOS] and ex["rejected_ids"] == [*ids_of("cba"), EOS]
    assert ex["margin"] == 0.5


def test_preference_hh_rlhf_text(tokenizers: dict[str, Any], cfg: DataConfig) -> None:
    head = "\n\nHuman: hi\n\nAssistant:"
    rec = parse_row({"chosen": head + " yes", "rejected": head + " no"}, "preference")
    ex = tokenize_preference(rec, tokenizers["gpt2"], cfg)
    assert ex["prompt_ids"] == ids_of(head) and len(ex["prompt_ids"]) == 23
    assert ex["chosen_ids"] == [*ids_of(" yes"), EOS] and ex["rejected_ids"] == [*ids_of(" no"), EOS]
    assert ex["margin"] is None


def test_preference_identical_after_truncation_is_dropped(tokenizers: dict[str, Any]) -> None:
    rec = parse_row({"prompt": "ab", "chosen": "xyz1", "rejected": "xyz2"}, "preference", source="p", row=1)
    examples, report = tokenize_records([rec], "preference", tokenizers["gpt2"], DataConfig(max_length=4))
    assert examples == [] and report.dropped_examples == ["p:1: rejected: identical to chosen after truncation"]


@pytest.mark.parametrize("style", STYLES)
def test_unpaired_and_prompt(style: str, tokenizers: dict[str, Any], cfg: DataConfig) -> None:
    prompt = [{"role": "user", "content": "sort: abc"}]
    rec = parse_row(
        {"prompt": prompt, "completion": [{"role": "assistant", "content": "abc"}], "label": "0"}, "unpaired"
    )
    ex = tokenize_unpaired(rec, tokenizers[style], cfg)
    assert ex["completion_ids"] == [*ABC, EOS] and ex["label"] is False
    pex = tokenize_prompt(parse_row({"prompt": prompt, "letters": "abc"}, "prompt"), tokenizers[style], cfg)
    assert pex["prompt_ids"] == ex["prompt_ids"]
    assert pex["prompt_ids"][-1] == ASSISTANT  # ends with the generation prompt
    assert pex["extra"] == {"letters": "abc"} and pex["prompt"] == prompt
    short = tokenize_prompt(
        parse_row({"prompt": "abcdefgh"}, "prompt"), tokenizers[style], DataConfig(max_prompt_length=4)
    )
    assert short["prompt_ids"] == ([BOS] + ids_of("fgh") if style == "llama" else ids_of("efgh"))
    assert short["prompt_truncated"] is True


def test_configuration_errors(tokenizers: dict[str, Any], cfg: DataConfig) -> None:
    tok = build_tokenizer("gpt2")
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        tokenize_records([conv_sft()], "sft", tok, cfg)
    with pytest.raises(ValueError, match="truncation_side"):
        tokenize_sft(conv_sft(), tokenizers["gpt2"], DataConfig(truncation_side="left"))
    tok = build_tokenizer("gpt2")
    tok.eos_token = None
    with pytest.raises(ValueError, match="no eos_token"):
        tokenize_sft(conv_sft(), tok, cfg)


def test_report_lengths_and_percentiles(tokenizers: dict[str, Any], cfg: DataConfig) -> None:
    records = [parse_row({"prompt": "p" * n, "completion": "c" * n}, "sft") for n in range(1, 11)]
    examples, report = tokenize_records(records, "sft", tokenizers["gpt2"], cfg)
    assert report.lengths == {"prompt": list(range(1, 11)), "response": list(range(2, 12))}
    assert report.percentiles("prompt") == {"p50": 5, "p90": 9, "p99": 10, "max": 10}
    assert report.as_dict()["data/response_len_p50"] == 6
    assert report.as_dict()["data/examples"] == 10


def test_example_tokens_counts_every_id_list(tokenizers: dict[str, Any], cfg: DataConfig) -> None:
    """An example's tokens: an SFT example's input ids; a pair's prompt, chosen and rejected ids together (the
    byte-level tokenizer: one token a character, plus the EOS each response ends with)."""
    sft = tokenize_records(
        [parse_row({"prompt": "p" * 3, "completion": "c" * 4}, "sft")], "sft", tokenizers["gpt2"], cfg
    )
    assert example_tokens(sft[0][0]) == len(sft[0][0]["input_ids"]) == 3 + 4 + 1
    assert example_tokens(pack_sft([sft[0][0]] * 2, 64)[0]) == 2 * 8  # a packed row: its input ids
    row = {"prompt": "p" * 3, "chosen": "c" * 4, "rejected": "r" * 6}
    pair = tokenize_records([parse_row(row, "preference")], "preference", tokenizers["gpt2"], cfg)[0][0]
    assert example_tokens(pair) == 3 + (4 + 1) + (6 + 1)


def test_longest_first_is_a_stable_sort_by_tokens() -> None:
    """Indices by descending `example_tokens`; examples of equal length keep their order."""
    lengths = [3, 5, 3, 7, 5, 1]
    exs = [{"prompt_ids": [0] * (n - 1), "chosen_ids": [0]} for n in lengths]
    assert longest_first(exs) == [3, 1, 4, 0, 2, 5]
    assert longest_first([]) == []


def test_percentile_nearest_rank() -> None:
    assert percentile([], 50) == 0
    assert percentile([7], 99) == 7
    assert percentile([3, 1, 2, 4], 50) == 2  # ceil(0.5 * 4) = 2nd smallest
    assert percentile([3, 1, 2, 4], 51) == 3
    assert percentile(list(range(1, 101)), 99) == 99


def test_special_tokens_are_probed_again_when_they_change(cfg: DataConfig) -> None:
    """The BOS/EOS probe is cached per tokenizer, but a changed EOS is what the next example ends with."""
    tok = build_tokenizer("llama")
    rec = parse_row({"prompt": "Q:", "completion": " abc"}, "sft")
    assert tokenize_sft(rec, tok, cfg)["input_ids"][-1] == EOS
    tok.eos_token = tok.convert_ids_to_tokens(USER)
    assert tokenize_sft(rec, tok, cfg)["input_ids"][-1] == USER
