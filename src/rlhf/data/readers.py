"""Read rows from data files, numbering each so an error can point at it.

`read_rows(path)` yields `(row, value)` pairs: `value` is whatever the row holds (normally a dict; the
format layer rejects anything else) or a `DataError` for a row that could not be read at all (malformed
JSON, invalid UTF-8, a CSV line with the wrong number of cells). A bad row never stops the reader, so a
checker can list every bad row in one pass. Problems with the whole file raise `DataError` with no row.

Row numbers: `.jsonl` and `.csv` use 1-based *line numbers* in the file (a CSV's header is line 1, so its
first data row is line 2; blank lines are skipped but still counted); `.json`, `.parquet` and `save_to_disk`
directories use the 1-based position of the row.

Splits: `PATH:SPLIT` picks a split of a `DatasetDict.save_to_disk` directory or of a directory of data files in
the hub's layout (`data/train_prefs-00000-of-00001.parquet`: `datasets.load_dataset` infers the splits); without
it, `train`. A path that is no local file or directory is read as a dataset *name* (`org/name:split`) from the
local `datasets` cache; nothing is downloaded unless RLHF_ALLOW_HUB=1 is set.

`pyarrow` and `datasets` are imported only when a file needs them, to keep `import rlhf.data` light.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rlhf.data.errors import DataError

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


HUB_OPT_IN = "RLHF_ALLOW_HUB"


def split_of(path: str | Path) -> tuple[Path, str | None]:
    """`PATH:SPLIT` -> (PATH, SPLIT) unless the whole string names an existing file; else (path, None)."""
    text = str(path)
    base, sep, split = text.rpartition(":")
    if Path(text).exists() or not sep or not base or not split or "/" in split:
        return Path(text), None
    return Path(base), split


def read_rows(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield `(row_number, value_or_DataError)` for every row of a file, a `save_to_disk` directory, a directory
    of data files or a cached dataset (`PATH:SPLIT` for a split other than train)."""
    source = str(path)
    p, split = split_of(path)
    if not p.exists():
        yield from _read_named_dataset(str(p), split, source)
        return
    if p.is_dir():
        if (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
            yield from _read_dataset_dir(p, source, split)
        else:
            yield from _read_data_files(p, source, split)
        return
    if split is not None:
        raise DataError(source, None, None, f"a single file has no splits (drop ':{split}')")
    readers = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json}
    readers.update({".parquet": _read_parquet, ".csv": _read_csv})
    reader = readers.get(p.suffix.lower())
    if reader is None:
        expected = ", ".join(SUFFIXES)
        reason = f"unknown file type {p.suffix or '(none)'!r}; expected {expected} or a datasets.save_to_disk directory"
        raise DataError(source, None, None, reason)
    yield from reader(p, source)


def _utf8_error(raw: bytes, e: UnicodeDecodeError) -> str:
    return f"invalid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"


def _read_jsonl(p: Path, source: str) -> Iterator[tuple[int, Any]]:
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte-order mark
                raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, DataError(source, lineno, "row", _utf8_error(raw, e), "invalid UTF-8")
                continue
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                yield (
                    lineno,
                    DataError(source, lineno, "row", f"invalid JSON: {e.msg} (column {e.colno})", "invalid JSON"),
                )
            except (ValueError, RecursionError) as e:  # e.g. integers over Python's digit limit, deep nesting
                reason = f"invalid JSON: {type(e).__name__}: {str(e)[:80] or 'nested too deeply'}"
                yield lineno, DataError(source, lineno, "row", reason, "invalid JSON")


def _read_json(p: Path, source: str) -> Iterator[tuple[int, Any]]:
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(source, None, None, f"invalid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(source, None, None, f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except (ValueError, RecursionError) as e:
        raise DataError(source, None, None, f"invalid JSON: {type(e).__name__}") from None
    if not isinstance(data, list):
        hint = " (for one object per line, use a .jsonl file)" if isinstance(data, dict) else ""
        kind = "an object" if isinstance(data, dict) else type(data).__name__
        raise DataError(source, None, None, f"expected a JSON list of rows, got {kind}{hint}")
    yield from enumerate(data, 1)


def _read_parquet(p: Path, source: str) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(p)
    except (pa.ArrowException, OSError) as e:
        raise DataError(source, None, None, f"cannot read parquet file: {e}") from None
    row = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for value in batch.to_pylist():
            row += 1
            yield row, value


def _has_surrogates(cells: list[str]) -> bool:
    """Cells decoded with `surrogateescape` hold lone surrogates where the bytes were not UTF-8."""
    try:
        for cell in cells:
            cell.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _read_csv(p: Path, source: str) -> Iterator[tuple[int, Any]]:
    """Cells stay strings (CSV holds plain-text fields; `label` and `margin` are parsed by the format layer),
    except that an empty cell is a missing value, so one file can mix `text` rows and `prompt` rows."""
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # long documents are normal SFT data
    with open(p, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
        except csv.Error as e:
            raise DataError(source, 1, "header", f"invalid CSV: {e}") from None
        if header is None:
            return
        if _has_surrogates(header):
            raise DataError(source, 1, "header", "invalid UTF-8")
        duplicates = sorted({h for h in header if header.count(h) > 1})
        if duplicates:
            raise DataError(source, 1, "header", f"duplicate column(s) {', '.join(duplicates)}")
        end = reader.line_num
        while True:
            start = end + 1
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield start, DataError(source, start, "row", f"invalid CSV: {e}", "invalid CSV")
                if reader.line_num == end:
                    return
                end = reader.line_num
                continue
            end = reader.line_num
            if not cells:  # blank line
                continue
            if _has_surrogates(cells):
                yield start, DataError(source, start, "row", "invalid UTF-8", "invalid UTF-8")
            elif len(cells) != len(header):
                reason = f"expected {len(header)} cells (one per header column), got {len(cells)}"
                yield start, DataError(source, start, "row", reason, "invalid CSV")
            else:
                yield start, {name: cell if cell != "" else None for name, cell in zip(header, cells, strict=True)}


def _pick_split(ds: Any, split: str | None, source: str) -> Any:
    """The `split` (default train) of a DatasetDict; a Dataset as it is (it has no splits to choose from)."""
    import datasets

    if not isinstance(ds, datasets.DatasetDict):
        if split not in (None, "train"):
            raise DataError(source, None, None, f"no split {split!r}: the dataset has a single split")
        return ds
    name = split or "train"
    if name not in ds:
        splits = ", ".join(ds.keys()) or "none"
        raise DataError(source, None, None, f"no split {name!r} (splits: {splits}); pick one as PATH:SPLIT")
    return ds[name]


def _read_dataset_dir(p: Path, source: str, split: str | None) -> Iterator[tuple[int, Any]]:
    """A directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk` (split `train` unless named)."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except (FileNotFoundError, ValueError, OSError) as e:
        reason = f"not a directory saved by datasets.save_to_disk ({type(e).__name__}: {str(e)[:120]})"
        raise DataError(source, None, None, reason) from None
    yield from enumerate(_pick_split(ds, split, source), 1)


def _read_data_files(p: Path, source: str, split: str | None) -> Iterator[tuple[int, Any]]:
    """A directory of parquet / JSON / CSV files in the hub's layout; `datasets` infers its splits from the names."""
    import datasets

    try:
        ds = datasets.load_dataset(str(p))
    except Exception as e:  # datasets raises many kinds here: an empty directory, unknown files, mixed formats
        reason = f"not a datasets.save_to_disk directory, nor a directory of data files ({type(e).__name__}: {e})"
        raise DataError(source, None, None, reason[:300]) from None
    yield from enumerate(_pick_split(ds, split, source), 1)


def _read_named_dataset(name: str, split: str | None, source: str) -> Iterator[tuple[int, Any]]:
    """A dataset name (`org/name`) read from the local `datasets` cache; the hub only with RLHF_ALLOW_HUB=1."""
    import os

    allowed = os.environ.get(HUB_OPT_IN) == "1"
    looks_like_name = name.count("/") == 1 and not Path(name).suffix and not name.startswith((".", "/", "~"))
    if not looks_like_name:
        raise DataError(source, None, None, "no such file or directory")
    if not allowed and not _cached(name):
        reason = (
            f"no such file or directory, and no dataset {name!r} in the local datasets cache (nothing is "
            f"downloaded unless {HUB_OPT_IN}=1 is set)"
        )
        raise DataError(source, None, None, reason)
    import datasets

    offline = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = offline or not allowed
    try:
        ds = datasets.load_dataset(name)
    except Exception as e:
        where = "on the hub" if allowed else "in the local datasets cache (nothing is downloaded)"
        raise DataError(source, None, None, f"no dataset {name!r} {where}: {type(e).__name__}") from None
    finally:
        datasets.config.HF_HUB_OFFLINE = offline
    yield from enumerate(_pick_split(ds, split, source), 1)


def _cached(name: str) -> bool:
    """Whether the datasets or hub cache holds something under this dataset name (without importing datasets)."""
    import os

    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    hub = Path(os.environ.get("HF_HUB_CACHE", home / "hub"))
    cache = Path(os.environ.get("HF_DATASETS_CACHE", home / "datasets"))
    flat = name.replace("/", "___")
    return (hub / f"datasets--{name.replace('/', '--')}").exists() or any(cache.glob(f"{flat}*"))
