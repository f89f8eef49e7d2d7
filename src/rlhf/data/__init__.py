"""The data layer: files -> canonical records -> token ids with loss masks -> padded or packed batches.

    records, skipped = load_records("train.jsonl", "preference", skip_bad_rows=cfg.skip_bad_rows)
    examples, report = tokenize_records(records, "preference", tokenizer, cfg)
    batch = collate_pairs(examples[:8], pad_id=tokenizer.pad_token_id)

See `docs/data.md` for the formats and the tokenization rules. `import rlhf.data` stays light: torch is
imported only when a collate function is first used, pyarrow and datasets only when a file needs them.
"""

from __future__ import annotations

from typing import Any

from rlhf.data.check import data_check, render_tokens
from rlhf.data.errors import DataError
from rlhf.data.formats import (
    KINDS,
    Message,
    PreferenceRecord,
    PromptRecord,
    Record,
    SFTRecord,
    SkipReport,
    UnpairedRecord,
    is_conversational,
    iter_records,
    load_records,
    parse_row,
    records_from_rows,
)
from rlhf.data.readers import read_rows
from rlhf.data.tokenize import (
    IGNORE_INDEX,
    SkipExample,
    TokenizeReport,
    example_tokens,
    longest_first,
    tokenize_preference,
    tokenize_prompt,
    tokenize_records,
    tokenize_responses,
    tokenize_sft,
    tokenize_unpaired,
)

_COLLATE = (
    "collate_sft",
    "collate_pairs",
    "collate_unpaired",
    "collate_prompts",
    "collate_responses",
    "pack_sft",
    "pad_sequences",
    "to_device",
)


def __getattr__(name: str) -> Any:
    """Import the collate functions (and torch) on first use."""
    if name in _COLLATE:
        from rlhf.data import collate

        return getattr(collate, name)
    raise AttributeError(f"module 'rlhf.data' has no attribute {name!r}")


__all__ = [
    "IGNORE_INDEX",
    "KINDS",
    "DataError",
    "Message",
    "PreferenceRecord",
    "PromptRecord",
    "Record",
    "SFTRecord",
    "SkipExample",
    "SkipReport",
    "TokenizeReport",
    "UnpairedRecord",
    "data_check",
    "example_tokens",
    "is_conversational",
    "iter_records",
    "load_records",
    "longest_first",
    "parse_row",
    "read_rows",
    "records_from_rows",
    "render_tokens",
    "tokenize_preference",
    "tokenize_prompt",
    "tokenize_records",
    "tokenize_responses",
    "tokenize_sft",
    "tokenize_unpaired",
    *_COLLATE,
]
