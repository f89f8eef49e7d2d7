"""`rlhf data check` logic (rlhf.data.check.data_check): exit codes and the exact lines it prints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from rlhf.data import data_check
from rlhf.data.check import MAX_PRINTED_ERRORS
from rlhf.tasks import sorting


def _jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_valid_file_with_llama_tokenizer(tmp_path: Path, tokenizer_dirs: dict[str, str], capsys: Any) -> None:
    path = _jsonl(tmp_path / "sft.jsonl", sorting.sft_rows(20, seed=0))
    assert data_check(path, "sft", tokenizer_dirs["llama"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert err == ""
    assert lines[:5] == [
        f"{path}: 20 rows, kind sft",
        "valid rows: 20",
        "formats:",
        "  prompt+completion (messages): 20",
        "extra fields (passed through): letters (20)",
    ]
    assert f"tokenizer: {tokenizer_dirs['llama']} (bos '<s>' = 1, eos '</s>' = 2, pad '<pad>' = 0)" in lines
    assert "truncated prompts: 0" in lines and "truncated responses: 0" in lines and "dropped rows: 0" in lines
    # the first row is "sort: gaehge" -> "aeeggh": prompt bracketed (no loss), response and EOS plain
    i = lines.index("example (row 1; [bracketed] tokens carry no loss):")
    assert lines[i + 1] == "  [<s><|user|>sort: gaehge\\n<|assistant|>]aeeggh</s>"
    header = lines.index("token lengths (max_length 512, max_prompt_length 256, keep_end):")
    assert lines[header + 1].split() == ["p50", "p90", "p99", "max"]
    assert lines[header + 2].split()[0] == "prompt" and lines[header + 3].split()[0] == "response"
    assert lines[header + 3].split()[-1] == "7"  # longest answer: 6 letters + EOS
    assert any("the chat template writes BOS and the tokenizer adds one too" in line for line in lines)


def test_gpt2_tokenizer_warns_pad_equals_eos(tmp_path: Path, tokenizer_dirs: dict[str, str], capsys: Any) -> None:
    path = _jsonl(tmp_path / "pref.jsonl", sorting.preference_rows(5, seed=0))
    assert data_check(path, "preference", tokenizer_dirs["gpt2"]) == 0
    out = capsys.readouterr().out
    assert "  prompt+chosen+rejected (messages): 5\n" in out
    assert "  - pad == eos (id 2): rlhf's collate masks padding by length, not by id, so EOS stays in the loss" in out
    assert "\n  chosen: [<|user|>sort: " in out and "\n  rejected: [<|user|>sort: " in out
    assert "double BOS" not in out


def test_every_bad_row_is_listed_then_exit_1(tmp_path: Path, capsys: Any) -> None:
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "a"},
        "{not json",
        {"prompt": "p", "chosen": "a", "rejected": "a"},
        {"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"},
        [1, 2],
    ]
    path = _jsonl(tmp_path / "bad.jsonl", rows)
    assert data_check(path, "preference") == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"{path}:2: rejected: missing field",
        f"{path}:3: row: invalid JSON: Expecting property name enclosed in double quotes (column 2)",
        f"{path}:4: rejected: identical to chosen",
        f"{path}:5: margin: expected a finite number, got 'big'",
        f"{path}:6: row: expected an object, got list",
        f"{path}: 5 of 6 rows are invalid; fix them, or pass --skip-bad-rows to skip them",
    ]


def test_skip_bad_rows_counts_each_reason_and_exits_0(tmp_path: Path, capsys: Any) -> None:
    rows = [{"text": "a"}, {"text": ""}, {"text": 1}, {"text": "b"}, {"text": " "}]
    path = _jsonl(tmp_path / "s.jsonl", rows)
    assert data_check(path, "sft", skip_bad_rows=True) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.splitlines() == [
        f"{path}: 5 rows, kind sft",
        "valid rows: 2",
        "formats:",
        "  text: 2",
        "skipped 3 bad row(s):",
        "  empty text: 2",
        "  wrong type: 1",
        f"  e.g. {path}:2: text: empty text",
        f"  e.g. {path}:3: text: expected a string or a message list, got number",
        f"  e.g. {path}:5: text: empty text",
        "pass --tokenizer DIR to check token lengths, truncation and the loss mask",
    ]


def test_printed_errors_are_capped(tmp_path: Path, capsys: Any) -> None:
    path = _jsonl(tmp_path / "many.jsonl", [{"prompt": 1}] * (MAX_PRINTED_ERRORS + 10))
    assert data_check(path, "prompt") == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == MAX_PRINTED_ERRORS + 2
    assert err[0] == f"{path}:1: prompt: expected a string or a message list, got number"
    assert err[-2:] == [
        "... and 10 more invalid rows",
        f"{path}: 60 of 60 rows are invalid; fix them, or pass --skip-bad-rows to skip them",
    ]


def test_truncation_losses_are_reported(tmp_path: Path, tokenizer_dirs: dict[str, str], capsys: Any) -> None:
    rows = [{"prompt": "abcdefghij", "completion": "xyz"}, {"prompt": "ab", "completion": "uvwxyz"}]
    path = _jsonl(tmp_path / "t.jsonl", rows)
    assert data_check(path, "sft", tokenizer_dirs["gpt2"], max_length=6, max_prompt_length=6) == 0
    out = capsys.readouterr().out.splitlines()
    assert "truncated responses: 1" in out and "dropped rows: 1" in out
    assert "  response truncated to nothing: 1" in out
    assert f"  e.g. {path}:1: response: truncated to nothing (the prompt takes 6 of max_length 6 tokens)" in out
    assert "example (row 2; [bracketed] tokens carry no loss):" in out and "  [ab]uvwx" in out
    assert any(line.startswith("  - missing EOS: 1 response(s) were cut at max_length") for line in out)
    assert "  - 1 row(s) lost to truncation; raise --max-length or lower --max-prompt-length" in out
    assert "  - max_prompt_length >= max_length: a prompt at its limit leaves no room for the response" in out


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        ({"kind": "dpo"}, 2, "error: unknown data kind 'dpo'; expected one of sft, preference, unpaired, prompt"),
        ({"kind": "sft", "max_length": 0}, 2, "error: --max-length and --max-prompt-length must be at least 1"),
        (
            {"kind": "sft", "tokenizer_path": "/nonexistent/tok"},
            1,
            "error: cannot load a tokenizer from /nonexistent/tok: ",
        ),
    ],
)
def test_usage_and_tokenizer_errors(tmp_path: Path, capsys: Any, args: dict[str, Any], code: int, message: str) -> None:
    path = _jsonl(tmp_path / "ok.jsonl", [{"text": "a"}])
    assert data_check(path, **args) == code
    err = capsys.readouterr().err
    assert err.startswith(message) and "Traceback" not in err


def test_file_errors_exit_1_without_traceback(tmp_path: Path, capsys: Any) -> None:
    assert data_check(tmp_path / "missing.jsonl", "sft") == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'missing.jsonl'}: no such file or directory\n"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert data_check(empty, "sft") == 1
    assert capsys.readouterr().err == f"error: {empty}: no valid rows\n"


def test_conversational_data_with_a_template_less_tokenizer(tmp_path: Path, capsys: Any) -> None:
    from rlhf.tasks.tiny import build_tokenizer

    tok = build_tokenizer("gpt2")
    tok.chat_template = None
    tok.save_pretrained(tmp_path / "tok")
    path = _jsonl(tmp_path / "p.jsonl", sorting.prompt_rows(3))
    assert data_check(path, "prompt", str(tmp_path / "tok")) == 1
    err = capsys.readouterr().err
    assert f"error: {path}: the tokenizer has no chat template, but the data is conversational" in err
    assert f"(tokenizer {tmp_path / 'tok'})" in err


def test_rows_the_chat_template_refuses_are_listed_and_not_called_truncated(tmp_path: Path, capsys: Any) -> None:
    from rlhf.tasks.tiny import build_tokenizer

    tok = build_tokenizer("gpt2")
    refuse = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    tok.chat_template = refuse + tok.chat_template
    tok.save_pretrained(tmp_path / "tok")
    rows = sorting.prompt_rows(3)
    rows[1]["prompt"] = [{"role": "system", "content": "be brief"}, *rows[1]["prompt"]]
    path = _jsonl(tmp_path / "p.jsonl", rows)
    assert data_check(path, "prompt", str(tmp_path / "tok")) == 0
    out = capsys.readouterr().out
    assert "  refused by the chat template: 1\n" in out
    assert f"  e.g. {path}:2: prompt: the chat template refuses it: System role not supported\n" in out
    assert "lost to truncation" not in out
