"""Junk in, DataError out: no other exception may escape validation, whatever the rows hold."""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhf.config import DataConfig
from rlhf.data import KINDS, DataError, iter_records, parse_row, tokenize_records
from rlhf.data.formats import Record
from rlhf.tasks.tiny import build_tokenizer

FIELDS = ["text", "prompt", "completion", "messages", "chosen", "rejected", "label", "margin", "role", "content"]

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=12,
)
roles = st.sampled_from(["system", "user", "assistant", "tool", "", None, 3])
messages = st.lists(
    st.fixed_dictionaries({}, optional={"role": roles, "content": st.text(max_size=6) | json_values}) | json_values,
    max_size=3,
)
field_values = (
    st.text(max_size=12) | messages | json_values | st.sampled_from(["\n\nHuman: hi\n\nAssistant: a", "1", "a\ud800"])
)
rows = st.dictionaries(st.sampled_from(FIELDS), field_values, max_size=5) | json_values
SETTINGS = settings(
    max_examples=150, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
U, A = {"role": "user", "content": "sort: ba"}, {"role": "assistant", "content": "ab"}
VALID = {
    "sft": [
        {"text": "t"},
        {"prompt": "p", "completion": "c"},
        {"messages": [U, A]},
        {"prompt": [U], "completion": [A]},
    ],
    "preference": [
        {"prompt": "p", "chosen": "a", "rejected": "b", "margin": 1},
        {"prompt": [U], "chosen": [A], "rejected": [{"role": "assistant", "content": "ba"}]},
        {"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: b"},
        {"chosen": [U, A], "rejected": [U, {"role": "assistant", "content": "x"}]},
    ],
    "unpaired": [{"prompt": "p", "completion": "c", "label": True}, {"prompt": [U], "completion": [A], "label": "0"}],
    "prompt": [{"prompt": "p"}, {"prompt": [U], "letters": "ab"}],
}


@st.composite
def near_valid(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A valid row of some kind with a few fields replaced by junk or deleted: reaches the deep checks."""
    kind = draw(st.sampled_from(KINDS))
    row = dict(draw(st.sampled_from(VALID[kind])))
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=2)):
        if draw(st.booleans()):
            row.pop(name, None)
        else:
            row[name] = draw(field_values)
    return kind, row


TOKENIZER = build_tokenizer("llama")


def _only_records_or_data_errors(items: list[Any]) -> None:
    for item in items:
        assert isinstance(item, DataError | Record), type(item)


@SETTINGS
@given(row=rows, kind=st.sampled_from(KINDS))
def test_any_row_is_a_record_or_a_data_error(row: Any, kind: str) -> None:
    _check_row(row, kind)


@SETTINGS
@given(case=near_valid())
def test_near_valid_rows_are_records_or_data_errors(case: tuple[str, dict[str, Any]]) -> None:
    _check_row(case[1], case[0])


def _check_row(row: Any, kind: str) -> None:
    try:
        record = parse_row(row, kind, source="junk.jsonl", row=1)
    except DataError as e:
        assert str(e).startswith("junk.jsonl:1: ")
        return
    # whatever validates must also tokenize, or be dropped with a counted reason
    examples, report = tokenize_records([record], kind, TOKENIZER, DataConfig(max_length=32, max_prompt_length=16))
    assert len(examples) + sum(report.dropped.values()) == 1


@SETTINGS
@given(lines=st.lists(st.binary(max_size=40), max_size=6), kind=st.sampled_from(KINDS))
def test_random_bytes_jsonl_lines(lines: list[bytes], kind: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "junk.jsonl"
        path.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines))
        _only_records_or_data_errors(list(iter_records(path, kind)))


@SETTINGS
@given(values=st.lists(rows, max_size=5), kind=st.sampled_from(KINDS))
def test_json_values_as_jsonl_rows(values: list[Any], kind: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "junk.jsonl"
        path.write_text("".join(json.dumps(v) + "\n" for v in values))
        items = list(iter_records(path, kind))
        _only_records_or_data_errors(items)
        assert [getattr(i, "row", None) for i in items] == list(range(1, len(values) + 1))


@SETTINGS
@given(data=st.binary(max_size=200), kind=st.sampled_from(KINDS))
def test_random_bytes_csv_and_json_files(data: bytes, kind: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        for name in ("junk.csv", "junk.json"):
            path = Path(d) / name
            path.write_bytes(b"prompt,completion,text,label\n" + data if name.endswith("csv") else data)
            with contextlib.suppress(DataError):  # a whole-file error is fine
                _only_records_or_data_errors(list(iter_records(path, kind)))
