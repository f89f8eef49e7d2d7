"""Every kind in every file type, and the readers' own errors (rlhf.data.readers)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from rlhf.data import DataError, iter_records, load_records, read_rows
from rlhf.tasks import sorting

FILE_TYPES = ("jsonl", "json", "parquet", "csv", "dataset")

# Per kind: three valid plain-string rows (every file type, CSV included) and one row missing a field.
STRING_ROWS: dict[str, tuple[list[dict[str, Any]], dict[str, Any], str]] = {
    "sft": (
        [
            {"prompt": "sort: cba", "completion": "abc", "id": "a"},
            {"prompt": "sort: ba", "completion": "ab", "id": "b"},
            {"prompt": "sort: dc", "completion": "cd", "id": "c"},
        ],
        {"prompt": "sort: x", "id": "d"},
        "completion: missing field",
    ),
    "preference": (
        [
            {"prompt": "sort: cba", "chosen": "abc", "rejected": "acb", "margin": "0.5"},
            {"prompt": "sort: ba", "chosen": "ab", "rejected": "ba", "margin": "1"},
            {"prompt": "sort: dc", "chosen": "cd", "rejected": "dc", "margin": "0.25"},
        ],
        {"prompt": "sort: x", "chosen": "x", "margin": "0"},
        "rejected: missing field",
    ),
    "unpaired": (
        [
            {"prompt": "sort: cba", "completion": "abc", "label": "true"},
            {"prompt": "sort: ba", "completion": "ba", "label": "false"},
            {"prompt": "sort: dc", "completion": "cd", "label": "1"},
        ],
        {"prompt": "sort: x", "completion": "x"},
        "label: missing field",
    ),
    "prompt": (
        [{"prompt": "sort: cba", "id": "a"}, {"prompt": "sort: ba", "id": "b"}, {"prompt": "sort: dc", "id": "c"}],
        {"id": "d"},
        "prompt: missing field",
    ),
}


@pytest.mark.parametrize("file_type", FILE_TYPES)
@pytest.mark.parametrize("kind", list(STRING_ROWS))
def test_every_kind_in_every_file_type(kind: str, file_type: str, write_rows: Any) -> None:
    valid, invalid, reason = STRING_ROWS[kind]
    path = write_rows([valid[0], valid[1], invalid, valid[2]], file_type)
    bad_row = 4 if file_type == "csv" else 3  # CSV rows are line numbers and the header is line 1
    with pytest.raises(DataError) as info:
        load_records(path, kind)
    assert str(info.value) == f"{path}:{bad_row}: {reason}"
    records, skipped = load_records(path, kind, skip_bad_rows=True)
    assert len(records) == 3
    assert skipped.total == 1 and dict(skipped.counts) == {"missing field": 1}
    assert [r.row for r in records] == ([2, 3, 5] if file_type == "csv" else [1, 2, 4])
    first = records[0]
    assert first.prompt == "sort: cba"
    if kind == "preference":
        assert [r.margin for r in records] == [0.5, 1.0, 0.25]
    if kind == "unpaired":
        assert [r.label for r in records] == [True, False, True]
    if kind in ("sft", "prompt"):
        assert [r.extra["id"] for r in records] == ["a", "b", "c"]


CONVERSATIONAL = {
    "sft": sorting.sft_rows,
    "preference": sorting.preference_rows,
    "unpaired": sorting.unpaired_rows,
    "prompt": sorting.prompt_rows,
}


@pytest.mark.parametrize("file_type", ["jsonl", "json", "parquet", "dataset"])
@pytest.mark.parametrize("kind", list(CONVERSATIONAL))
def test_message_lists_in_every_structured_file_type(kind: str, file_type: str, write_rows: Any) -> None:
    rows = CONVERSATIONAL[kind](5, seed=3)
    bad = json.loads(json.dumps(rows[0]))
    bad["prompt"][0]["role"] = "robot"
    path = write_rows([*rows[:2], bad, *rows[2:]], file_type)
    records, skipped = load_records(path, kind, skip_bad_rows=True)
    assert len(records) == 5
    assert [r.extra["letters"] for r in records] == [r["letters"] for r in rows]
    assert records[0].prompt == rows[0]["prompt"]
    want = f"{path}:3: prompt[0].role: unknown role 'robot' (expected system, user, assistant or tool)"
    assert skipped.examples == [want]


def test_missing_file_and_unknown_extension(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_records(tmp_path / "nope.jsonl", "sft")
    assert str(info.value) == f"{tmp_path / 'nope.jsonl'}: no such file or directory"
    odd = tmp_path / "data.txt"
    odd.write_text("hello")
    with pytest.raises(DataError) as info:
        load_records(odd, "sft")
    expected = "unknown file type '.txt'; expected .jsonl, .json, .parquet, .csv or a datasets.save_to_disk directory"
    assert str(info.value) == f"{odd}: {expected}"


def test_jsonl_line_numbers_bad_json_and_bad_utf8(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    lines = [b'\xef\xbb\xbf{"text": "bom"}', b"", b'{"text": "ok"}', b"{bad", b'{"text": "caf\xff"}', b"  ", b"[1]"]
    path.write_bytes(b"\n".join(lines) + b"\n")
    items = list(iter_records(path, "sft"))
    assert [getattr(i, "text", None) for i in items[:2]] == ["bom", "ok"]
    assert [i.row for i in items] == [1, 3, 4, 5, 7]
    assert [str(e) for e in items[2:]] == [
        f"{path}:4: row: invalid JSON: Expecting property name enclosed in double quotes (column 2)",
        f"{path}:5: row: invalid UTF-8 (byte 0xff at column 14)",
        f"{path}:7: row: expected an object, got list",
    ]
    assert [e.category for e in items[2:]] == ["invalid JSON", "invalid UTF-8", "not an object"]


def test_json_must_be_a_list(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text('{"data": [{"text": "a"}]}')
    with pytest.raises(DataError) as info:
        list(read_rows(path))
    assert (
        str(info.value)
        == f"{path}: expected a JSON list of rows, got an object (for one object per line, use a .jsonl file)"
    )
    path.write_text('[{"text": "a"},\n {"text": }]')
    with pytest.raises(DataError) as info:
        list(read_rows(path))
    assert str(info.value) == f"{path}: invalid JSON at line 2 column 11: Expecting value"
    path.write_bytes(b'[{"text": "\xff"}]')
    with pytest.raises(DataError, match=r"invalid UTF-8 \(byte 0xff at offset 11\)$"):
        list(read_rows(path))


def test_csv_line_numbers_cells_and_encoding(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    content = (
        b"prompt,completion,label\n"
        b'"multi\nline prompt",ok,true\n'  # lines 2-3
        b"\n"  # line 4: blank
        b"p,c\n"  # line 5: one cell short
        b"p,caf\xe9,0\n"  # line 6: latin-1, not UTF-8
        b"p,,1\n"  # line 7: empty cell = missing value
        b"p,c,yes\n"  # line 8
        b"p,c,FALSE\n"  # line 9
    )
    path.write_bytes(content)
    items = list(iter_records(path, "unpaired"))
    assert items[0].prompt == "multi\nline prompt" and items[0].row == 2 and items[0].label is True
    assert [str(e) for e in items[1:5]] == [
        f"{path}:5: row: expected 3 cells (one per header column), got 2",
        f"{path}:6: row: invalid UTF-8",
        f"{path}:7: completion: missing field",
        f"{path}:8: label: expected a boolean (true/false/1/0), got 'yes'",
    ]
    assert items[5].row == 9 and items[5].label is False


def test_csv_header_problems(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("text,text\na,b\n")
    with pytest.raises(DataError) as info:
        list(read_rows(path))
    assert str(info.value) == f"{path}:1: header: duplicate column(s) text"
    path.write_text("")
    assert list(read_rows(path)) == []


def test_dataset_dict_uses_train_split_or_names_the_splits(tmp_path: Path) -> None:
    import datasets

    rows = [{"text": "a"}, {"text": "b"}]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "with_train"))
    records, _ = load_records(tmp_path / "with_train", "sft")
    assert [r.text for r in records] == ["a", "b"]
    splits = {"test": datasets.Dataset.from_list(rows), "validation": datasets.Dataset.from_list(rows)}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "no_train"))
    with pytest.raises(DataError) as info:
        load_records(tmp_path / "no_train", "sft")
    assert str(info.value) == (
        f"{tmp_path / 'no_train'}: no split 'train' (splits: test, validation); pick one as PATH:SPLIT"
    )
    records, _ = load_records(f"{tmp_path / 'no_train'}:validation", "sft")
    assert [r.text for r in records] == ["a", "b"]


def test_directory_that_is_not_a_saved_dataset(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError) as info:
        load_records(tmp_path / "plain", "sft")
    assert str(info.value).startswith(
        f"{tmp_path / 'plain'}: not a datasets.save_to_disk directory, nor a directory of data"
    )


def test_corrupt_parquet_is_a_file_error(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError) as info:
        list(read_rows(path))
    assert str(info.value).startswith(f"{path}: cannot read parquet file: ")
