"""Fixtures for the data tests: the two tiny tokenizer families, and a writer for every file type."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from rlhf.config import DataConfig
from rlhf.tasks.tiny import STYLES, build_tokenizer


def _write_rows(directory: Path, rows: list[Any], file_type: str, name: str = "data") -> Path:
    """Write rows as `file_type` under `directory` and return the path a user would pass."""
    if file_type == "jsonl":
        path = directory / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif file_type == "json":
        path = directory / f"{name}.json"
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif file_type == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = directory / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif file_type == "csv":
        path = directory / f"{name}.csv"
        columns = list(dict.fromkeys(k for r in rows for k in r))
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    elif file_type == "dataset":
        import datasets

        path = directory / name
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    else:
        raise ValueError(file_type)
    return path


@pytest.fixture
def write_rows(tmp_path: Path) -> Callable[..., Path]:
    """`write_rows(rows, file_type, name="data")`: write rows as jsonl/json/parquet/csv/dataset under tmp_path."""

    def write(rows: list[Any], file_type: str, name: str = "data") -> Path:
        return _write_rows(tmp_path, rows, file_type, name)

    return write


@pytest.fixture(scope="session")
def tokenizers() -> dict[str, Any]:
    """{"llama": tokenizer, "gpt2": tokenizer}, built in memory."""
    return {style: build_tokenizer(style) for style in STYLES}


@pytest.fixture(scope="session")
def tokenizer_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Tokenizer-only checkpoint directories (what `--tokenizer DIR` points at)."""
    root = tmp_path_factory.mktemp("tokenizers")
    out = {}
    for style in STYLES:
        build_tokenizer(style).save_pretrained(root / style)
        out[style] = str(root / style)
    return out


@pytest.fixture
def cfg() -> DataConfig:
    return DataConfig(max_length=64, max_prompt_length=32)
