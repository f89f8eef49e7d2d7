"""Row validation and normalisation (rlhf.data.formats), row by row, with exact error strings."""

from __future__ import annotations

from typing import Any

import pytest

from rlhf.data import (
    DataError,
    PreferenceRecord,
    PromptRecord,
    SFTRecord,
    UnpairedRecord,
    is_conversational,
    load_records,
    parse_row,
    records_from_rows,
)
from rlhf.tasks import sorting

U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "hello"}
A2 = {"role": "assistant", "content": "go away"}
SYS = {"role": "system", "content": ""}  # an empty system prompt is allowed


def _error(kind: str, row: Any) -> str:
    with pytest.raises(DataError) as info:
        parse_row(row, kind, source="data/train.jsonl", row=17)
    return str(info.value)


INVALID = [
    # sft
    (
        "sft",
        {},
        "text: missing field (an sft row needs text, prompt + completion, messages, conversations or "
        "instruction + output)",
    ),
    ("sft", {"text": "  \n"}, "text: empty text"),
    ("sft", {"text": 3}, "text: expected a string or a message list, got number"),
    ("sft", {"text": [U]}, "text: expected a string, got list (use `messages` for conversations)"),
    ("sft", {"prompt": "p"}, "completion: missing field"),
    ("sft", {"completion": "c"}, "prompt: missing field"),
    ("sft", {"prompt": "p", "completion": [A]}, "completion: expected a string like prompt, got a message list"),
    ("sft", {"prompt": [U], "completion": "c"}, "completion: expected a message list like prompt, got a string"),
    (
        "sft",
        {"prompt": [U], "completion": [U]},
        "completion[0].role: a response message must have role 'assistant', got 'user'",
    ),
    ("sft", {"messages": []}, "messages: empty message list"),
    ("sft", {"messages": "hello"}, "messages: expected a message list, got string"),
    ("sft", {"messages": [U]}, "messages[0].role: the last message must be the assistant's response"),
    ("sft", {"messages": [A]}, "messages: no message before the final assistant response"),
    (
        "sft",
        {"messages": [{"role": "robot", "content": "x"}, A]},
        "messages[0].role: unknown role 'robot' (expected system, user, assistant or tool)",
    ),
    ("sft", {"messages": ["hi", A]}, "messages[0]: expected a message object with role and content, got string"),
    ("sft", {"messages": [{"role": "user", "content": 5}, A]}, "messages[0].content: expected a string, got number"),
    ("sft", {"messages": [{"role": "user"}, A]}, "messages[0].content: missing field"),
    ("sft", {"messages": [{"content": "x"}, A]}, "messages[0].role: missing field"),
    ("sft", {"messages": [U, {"role": "assistant", "content": " "}]}, "messages[1].content: empty text"),
    # preference
    ("preference", {"prompt": "p", "chosen": "a"}, "rejected: missing field"),
    ("preference", {"prompt": "p", "rejected": "a"}, "chosen: missing field"),
    ("preference", {"prompt": "p", "chosen": "a", "rejectd": "b"}, "rejected: missing field (the row has 'rejectd')"),
    ("prompt", {"Prompt": "p"}, "prompt: missing field (the row has 'Prompt')"),
    ("preference", {"prompt": "p", "chosen": "a", "rejected": "a"}, "rejected: identical to chosen"),
    ("preference", {"prompt": [U], "chosen": [A], "rejected": [A]}, "rejected: identical to chosen"),
    (
        "preference",
        {"prompt": "p", "chosen": "a", "rejected": [A]},
        "rejected: expected a string like prompt, got a message list",
    ),
    (
        "preference",
        {"prompt": "p", "chosen": "a", "rejected": "b", "margin": "x"},
        "margin: expected a finite number, got 'x'",
    ),
    (
        "preference",
        {"prompt": "p", "chosen": "a", "rejected": "b", "margin": True},
        "margin: expected a finite number, got boolean",
    ),
    (
        "preference",
        {"prompt": "p", "chosen": "a", "rejected": "b", "margin": float("nan")},
        "margin: expected a finite number, got nan",
    ),
    (
        "preference",
        {"prompt": "p", "chosen": "a", "rejected": "b", "margin": [1]},
        "margin: expected a finite number, got list",
    ),
    (
        "preference",
        {"chosen": "a", "rejected": "b"},
        "prompt: missing field, and chosen/rejected do not share a prefix ending in '\\n\\nAssistant:' (HH-RLHF)",
    ),
    ("preference", {"chosen": [U, A], "rejected": "b"}, "rejected: expected a message list like chosen, got a string"),
    (
        "preference",
        {"chosen": [U, A], "rejected": [{"role": "user", "content": "other"}, A2]},
        "rejected: must share every message but the last assistant turn with chosen (the implicit prompt)",
    ),
    ("preference", {"chosen": [A], "rejected": [A2]}, "chosen: no shared prompt before the final assistant turn"),
    (
        "preference",
        {"chosen": [U, A], "rejected": [A2, U]},
        "rejected[1].role: the last message must be the assistant's response",
    ),
    (
        "preference",
        {"chosen": "\n\nHuman: hi\n\nAssistant:", "rejected": "\n\nHuman: hi\n\nAssistant: no"},
        "chosen: empty text (nothing after the last '\\n\\nAssistant:')",
    ),
    (
        "preference",
        {
            "chosen": "\n\nHuman: a\n\nAssistant: x\n\nHuman: b\n\nAssistant: y",
            "rejected": "\n\nHuman: a\n\nAssistant: z\n\nHuman: b\n\nAssistant: w",
        },
        "prompt: missing field, and chosen/rejected do not share a prefix ending in '\\n\\nAssistant:' (HH-RLHF)",
    ),
    # unpaired
    ("unpaired", {"prompt": "p", "completion": "c"}, "label: missing field"),
    ("unpaired", {"prompt": "p", "completion": "c", "labels": True}, "label: missing field (the row has 'labels')"),
    (
        "unpaired",
        {"prompt": "p", "completion": "c", "label": "maybe"},
        "label: expected a boolean (true/false/1/0), got 'maybe'",
    ),
    ("unpaired", {"prompt": "p", "completion": "c", "label": 2}, "label: expected a boolean (true/false/1/0), got 2"),
    (
        "unpaired",
        {"prompt": "p", "completion": "c", "label": {"x": 1}},
        "label: expected a boolean (true/false/1/0), got object",
    ),
    ("unpaired", {"completion": "c", "label": True}, "prompt: missing field"),
    # prompt
    ("prompt", {"prompt": "a\ud800b"}, "prompt: invalid Unicode (a lone surrogate such as \\ud800)"),
    (
        "prompt",
        {"prompt": [{"role": "user", "content": "\udcff"}]},
        "prompt[0].content: invalid Unicode (a lone surrogate such as \\ud800)",
    ),
    ("prompt", {"prompt": None}, "prompt: missing field"),
    ("prompt", {"prompt": {"a": 1}}, "prompt: expected a string or a message list, got object"),
    ("prompt", {"prompt": []}, "prompt: empty message list"),
    # not an object
    ("prompt", [1, 2], "row: expected an object, got list"),
    ("sft", "text", "row: expected an object, got string"),
    ("unpaired", None, "row: expected an object, got null"),
    ("preference", 3.5, "row: expected an object, got number"),
]


@pytest.mark.parametrize(("kind", "row", "expected"), INVALID)
def test_invalid_rows_name_file_row_field_and_reason(kind: str, row: Any, expected: str) -> None:
    assert _error(kind, row) == f"data/train.jsonl:17: {expected}"


def test_data_error_fields_and_rendering() -> None:
    err = DataError("data/train.jsonl", 17, "chosen", "missing field")
    assert str(err) == "data/train.jsonl:17: chosen: missing field"
    assert (err.file, err.row, err.field, err.reason, err.category) == (
        "data/train.jsonl",
        17,
        "chosen",
        "missing field",
        "missing field",
    )
    assert str(DataError("x.csv", None, None, "no such file or directory")) == "x.csv: no such file or directory"
    assert str(DataError("x.csv", 3, None, "bad")) == "x.csv:3: bad"


def test_sft_forms() -> None:
    rec = parse_row({"text": "hello", "id": 7}, "sft", source="f", row=2)
    assert rec == SFTRecord(None, None, "hello", {"id": 7}, "text", "f", 2)
    rec = parse_row({"prompt": "p", "completion": " c"}, "sft")
    assert (rec.prompt, rec.completion, rec.text, rec.format) == ("p", " c", None, "prompt+completion (strings)")
    rec = parse_row({"messages": [SYS, U, A, {"role": "user", "content": "more"}, A2]}, "sft")
    assert rec.prompt == [SYS, U, A, {"role": "user", "content": "more"}]
    assert rec.completion == [A2]
    assert rec.format == "messages"
    # nulls are missing values: a parquet row of a file that mixes text rows and prompt rows
    rec = parse_row({"text": "t", "prompt": None, "completion": None}, "sft")
    assert rec.format == "text" and rec.extra == {"prompt": None, "completion": None}
    # message dicts keep role and content only
    rec = parse_row({"prompt": [{**U, "name": "bob"}], "completion": [A]}, "sft")
    assert rec.prompt == [U] and rec.format == "prompt+completion (messages)"
    assert is_conversational(rec) and not is_conversational(parse_row({"prompt": "p", "completion": "c"}, "sft"))


def test_preference_explicit_and_margin() -> None:
    rec = parse_row({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "0.5", "id": 1}, "preference")
    assert rec == PreferenceRecord("p", "a", "b", 0.5, {"id": 1}, "prompt+chosen+rejected (strings)", "<rows>", 0)
    assert parse_row({"prompt": "p", "chosen": "a", "rejected": "b", "margin": 2}, "preference").margin == 2.0
    assert parse_row({"prompt": "p", "chosen": "a", "rejected": "b", "margin": ""}, "preference").margin is None
    assert parse_row({"prompt": "p", "chosen": "a", "rejected": "b"}, "preference").margin is None


def test_preference_hh_rlhf_implicit_prompt() -> None:
    """The prompt is the shared prefix up to and including the LAST '\\n\\nAssistant:' (multi-turn)."""
    head = "\n\nHuman: sort dcba\n\nAssistant: abcd\n\nHuman: and backwards?\n\nAssistant:"
    rec = parse_row({"chosen": head + " dcba", "rejected": head + " dcab", "src": "hh"}, "preference")
    assert rec.prompt == head
    assert (rec.chosen, rec.rejected) == (" dcba", " dcab")
    assert rec.format == "chosen+rejected (HH-RLHF text, implicit prompt)"
    assert rec.extra == {"src": "hh"}
    # responses that share a beginning do not move the split
    rec = parse_row({"chosen": head + " Yes.", "rejected": head + " Yes, sure"}, "preference")
    assert (rec.prompt, rec.chosen, rec.rejected) == (head, " Yes.", " Yes, sure")


def test_preference_message_lists_with_shared_prefix() -> None:
    convo = [{"role": "system", "content": "be brief"}, U, A, {"role": "user", "content": "again"}]
    rec = parse_row({"chosen": [*convo, A], "rejected": [*convo, A2]}, "preference")
    assert rec.prompt == convo
    assert (rec.chosen, rec.rejected) == ([A], [A2])
    assert rec.format == "chosen+rejected (messages, implicit prompt)"


def test_unpaired_labels() -> None:
    for value, expected in [(True, True), (False, False), ("true", True), (" FALSE ", False), ("1", True), (0, False)]:
        rec = parse_row({"prompt": "p", "completion": "c", "label": value}, "unpaired")
        assert rec == UnpairedRecord("p", "c", expected, {}, "prompt+completion+label (strings)", "<rows>", 0)


def test_prompt_extra_fields_pass_through_untouched() -> None:
    extra = {"letters": "dcba", "meta": {"nested": [1, None]}, "score": 0.5}
    rec = parse_row({"prompt": [U], **extra}, "prompt", source="p.jsonl", row=4)
    assert rec == PromptRecord([U], extra, "prompt (messages)", "p.jsonl", 4)


def test_unknown_kind_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown data kind 'dpo'; expected one of sft, preference, unpaired, prompt"):
        parse_row({}, "dpo")


def test_built_in_task_rows_are_valid() -> None:
    for kind, make in [
        ("sft", sorting.sft_rows),
        ("preference", sorting.preference_rows),
        ("unpaired", sorting.unpaired_rows),
        ("prompt", sorting.prompt_rows),
    ]:
        records, skipped = records_from_rows(make(30, seed=1), kind)
        assert len(records) == 30 and skipped.total == 0
        assert all(r.extra["letters"] for r in records)
        assert [r.row for r in records] == list(range(1, 31))


def test_skip_bad_rows_counts_every_reason(tmp_path: Any) -> None:
    rows = [{"text": "ok"}, {"text": ""}, [1], {"text": "fine"}, {}, {"text": " "}]
    with pytest.raises(DataError, match=r"^<rows>:2: text: empty text$"):
        records_from_rows(rows, "sft")
    records, skipped = records_from_rows(rows, "sft", skip_bad_rows=True)
    assert [r.text for r in records] == ["ok", "fine"]
    assert skipped.total == 4
    assert dict(skipped.counts) == {"empty text": 2, "not an object": 1, "missing field": 1}
    assert skipped.examples == [
        "<rows>:2: text: empty text",
        "<rows>:3: row: expected an object, got list",
        "<rows>:5: text: missing field (an sft row needs text, prompt + completion, messages, conversations or "
        "instruction + output)",
        "<rows>:6: text: empty text",
    ]
    assert skipped.lines()[:4] == [
        "skipped 4 bad row(s):",
        "  empty text: 2",
        "  not an object: 1",
        "  missing field: 1",
    ]


def test_load_records_stops_at_first_bad_row(tmp_path: Any) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "a"}\n{"text": 1}\n{"nope": 1}\n')
    with pytest.raises(DataError) as info:
        load_records(path, "sft")
    assert str(info.value) == f"{path}:2: text: expected a string or a message list, got number"
    records, skipped = load_records(path, "sft", skip_bad_rows=True)
    assert len(records) == 1 and skipped.total == 2
