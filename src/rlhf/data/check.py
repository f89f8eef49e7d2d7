"""`rlhf data check FILE --kind KIND`: validate a data file, summarise it, and diagnose tokenization.

The command answers, before any GPU time is spent: can every row be read (each bad row listed as
`file:row: field: reason`)? Which formats does the file mix? With a tokenizer: how long are prompts and
responses, what does truncation cost, and does the loss mask look right (one rendered example per run,
with the prompt in `[brackets]` because it carries no loss)? It warns about the classic silent bugs:
double BOS, responses without EOS, pad == EOS, responses lost to truncation.

Exit codes: 0 valid (possibly with warnings, or with bad rows skipped under --skip-bad-rows); 1 invalid
data, an unreadable file or tokenizer; 2 a usage error (unknown kind, bad lengths). User errors print a
message, never a traceback.
"""

from __future__ import annotations

import sys
from collections import Counter
from itertools import groupby
from pathlib import Path
from typing import Any

from rlhf.config import DataConfig
from rlhf.data.errors import DataError
from rlhf.data.formats import Record, SkipReport, check_kind, iter_records
from rlhf.data.tokenize import (
    IGNORE_INDEX,
    TOKENIZE_FNS,
    TRUNCATION_DROPS,
    SkipExample,
    TokenizeReport,
    tokenize_records,
)

MAX_PRINTED_ERRORS = 50
_DEFAULTS = DataConfig()


def _err(line: str) -> None:
    print(line, file=sys.stderr)


def data_check(
    path: str | Path,
    kind: str,
    tokenizer_path: str | None = None,
    skip_bad_rows: bool = False,
    max_length: int = _DEFAULTS.max_length,
    max_prompt_length: int = _DEFAULTS.max_prompt_length,
) -> int:
    """Validate and summarise a data file; print the report (stdout) and problems (stderr); return an exit code.

    Without `skip_bad_rows`, every invalid row is listed (the first MAX_PRINTED_ERRORS, then a count) and
    the exit code is 1; with it, bad rows are skipped and counted by reason, and the exit code is 0.
    """
    try:
        check_kind(kind)
        if max_length < 1 or max_prompt_length < 1:
            raise ValueError("--max-length and --max-prompt-length must be at least 1")
    except ValueError as e:
        _err(f"error: {e}")
        return 2
    records: list[Record] = []
    errors: list[DataError] = []
    try:
        for item in iter_records(path, kind):
            if isinstance(item, DataError):
                errors.append(item)
            else:
                records.append(item)
    except DataError as file_error:
        _err(f"error: {file_error}")
        return 1
    total = len(records) + len(errors)
    if errors and not skip_bad_rows:
        for error in errors[:MAX_PRINTED_ERRORS]:
            _err(str(error))
        if len(errors) > MAX_PRINTED_ERRORS:
            _err(f"... and {len(errors) - MAX_PRINTED_ERRORS} more invalid rows")
        _err(f"{path}: {len(errors)} of {total} rows are invalid; fix them, or pass --skip-bad-rows to skip them")
        return 1
    _print_summary(path, kind, total, records, errors)
    if not records:
        _err(f"error: {path}: no valid rows")
        return 1
    if tokenizer_path is None:
        print("pass --tokenizer DIR to check token lengths, truncation and the loss mask")
        return 0
    try:  # any failure to load is the user's path or checkpoint, reported without a traceback
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=False)
    except Exception as e:
        _err(f"error: cannot load a tokenizer from {tokenizer_path}: {type(e).__name__}: {e}")
        return 1
    cfg = DataConfig(max_length=max_length, max_prompt_length=max_prompt_length)
    try:
        examples, report = tokenize_records(records, kind, tokenizer, cfg)
    except ValueError as e:
        _err(f"error: {e}")
        return 1
    _print_tokens(report, tokenizer, cfg, tokenizer_path)
    _print_example(records, kind, tokenizer, cfg)
    warnings = _warnings(records, examples, report, tokenizer, cfg)
    if warnings:
        print("warnings:")
        for w in warnings:
            print(f"  - {w}")
    if not examples:
        _err("error: no row survives tokenization")
        return 1
    return 0


def _print_summary(path: str | Path, kind: str, total: int, records: list[Record], errors: list[DataError]) -> None:
    print(f"{path}: {total} rows, kind {kind}")
    print(f"valid rows: {len(records)}")
    print("formats:")
    for fmt, n in Counter(r.format for r in records).most_common():
        print(f"  {fmt}: {n}")
    extra = Counter(k for r in records for k in r.extra)
    if extra:
        print("extra fields (passed through): " + ", ".join(f"{k} ({n})" for k, n in extra.most_common()))
    skips = SkipReport()
    for e in errors:
        skips.add(e)
    for line in skips.lines():
        print(line)


def _token_name(tokenizer: Any, which: str) -> str:
    token, token_id = getattr(tokenizer, f"{which}_token", None), getattr(tokenizer, f"{which}_token_id", None)
    return f"{which} none" if token is None else f"{which} {token!r} = {token_id}"


def _print_tokens(report: TokenizeReport, tokenizer: Any, cfg: DataConfig, tokenizer_path: str) -> None:
    names = ", ".join(_token_name(tokenizer, w) for w in ("bos", "eos", "pad"))
    print(f"tokenizer: {tokenizer_path} ({names})")
    print(
        f"token lengths (max_length {cfg.max_length}, max_prompt_length {cfg.max_prompt_length}, "
        f"{cfg.truncation_side}):"
    )
    print(f"  {'':<10}{'p50':>7}{'p90':>7}{'p99':>7}{'max':>7}")
    for name in report.lengths:
        p = report.percentiles(name)
        print(f"  {name:<10}{p['p50']:>7}{p['p90']:>7}{p['p99']:>7}{p['max']:>7}")
    print(f"truncated prompts: {report.truncated_prompts}")
    print(f"truncated responses: {report.truncated_responses}")
    print(f"dropped rows: {sum(report.dropped.values())}")
    for reason, n in report.dropped.most_common():
        print(f"  {reason}: {n}")
    for line in report.dropped_examples:
        print(f"  e.g. {line}")


def render_tokens(ids: list[int], loss: list[bool], tokenizer: Any) -> str:
    """Decode ids with special tokens visible; spans without loss are wrapped in [brackets]."""
    parts = []
    for has_loss, group in groupby(zip(ids, loss, strict=True), key=lambda pair: pair[1]):
        text = tokenizer.decode([i for i, _ in group], skip_special_tokens=False)
        text = text.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
        parts.append(text if has_loss else f"[{text}]")
    return "".join(parts)


def _print_example(records: list[Record], kind: str, tokenizer: Any, cfg: DataConfig) -> None:
    for record in records:
        try:
            ex = TOKENIZE_FNS[kind](record, tokenizer, cfg)
        except SkipExample:
            continue
        print(f"example (row {record.row}; [bracketed] tokens carry no loss):")
        if kind == "sft":
            loss = [label != IGNORE_INDEX for label in ex["labels"]]
            print("  " + render_tokens(ex["input_ids"], loss, tokenizer))
        elif kind == "prompt":
            print(
                "  "
                + render_tokens(ex["prompt_ids"], [False] * len(ex["prompt_ids"]), tokenizer)
                + "  <- generation starts here"
            )
        else:
            names = ("chosen", "rejected") if kind == "preference" else ("completion",)
            for name in names:
                ids, p = ex["prompt_ids"] + ex[f"{name}_ids"], len(ex["prompt_ids"])
                label = f"{name} (label {str(ex['label']).lower()})" if kind == "unpaired" else name
                print(f"  {label}: " + render_tokens(ids, [i >= p for i in range(len(ids))], tokenizer))
        return


def _responses(example: dict[str, Any]) -> list[list[int]]:
    if "labels" in example:
        return [[t for t in example["labels"] if t != IGNORE_INDEX]]
    return [v for k, v in example.items() if k.endswith("_ids") and k != "prompt_ids"]


def _warnings(
    records: list[Record], examples: list[dict[str, Any]], report: TokenizeReport, tokenizer: Any, cfg: DataConfig
) -> list[str]:
    out = []
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    starts = [ex.get("input_ids") or ex["prompt_ids"] for ex in examples]
    doubled = sum(bos is not None and s[:2] == [bos, bos] for s in starts)
    if doubled:
        out.append(f"double BOS: {doubled} example(s) start with two BOS tokens (does the text itself contain one?)")
    first = records[0]
    if (
        isinstance(getattr(first, "prompt", None), list)
        and bos is not None
        and getattr(tokenizer, "chat_template", None)
    ):
        rendered = tokenizer.apply_chat_template(first.prompt, tokenize=False, add_generation_prompt=True)
        if tokenizer.encode(rendered)[:2] == [bos, bos]:
            out.append(
                "the chat template writes BOS and the tokenizer adds one too: rlhf keeps exactly one, but "
                "code that calls tokenizer(apply_chat_template(...)) elsewhere gets a double BOS"
            )
    no_eos = sum(r[-1:] != [eos] for ex in examples for r in _responses(ex))
    if no_eos:
        out.append(
            f"missing EOS: {no_eos} response(s) were cut at max_length and have no EOS in their labels "
            "(the model does not learn to stop on them); consider a larger --max-length"
        )
    if pad is None:
        out.append("the tokenizer has no pad token; set one (EOS is fine with rlhf's collate, which masks by length)")
    elif pad == eos:
        out.append(
            f"pad == eos (id {eos}): rlhf's collate masks padding by length, not by id, so EOS stays in the "
            "loss; a collator that masks labels where input_ids == pad_id would drop every EOS"
        )
    truncated = sum(report.dropped[category] for category in TRUNCATION_DROPS)
    if truncated:
        out.append(f"{truncated} row(s) lost to truncation; raise --max-length or lower --max-prompt-length")
    if cfg.max_prompt_length >= cfg.max_length and report.kind != "prompt":
        out.append("max_prompt_length >= max_length: a prompt at its limit leaves no room for the response")
    if report.template_fallbacks:
        out.append(
            f"{report.template_fallbacks} example(s): the prompt's tokens were not a prefix of the "
            "conversation's tokens; they were split by text instead"
        )
    return out
