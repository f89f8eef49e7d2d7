"""Recognise each row of a data file and normalise it into a canonical record.

Four kinds of data (fields and examples in `docs/data.md`): `sft` -> `SFTRecord`, `preference` ->
`PreferenceRecord` (reward models, DPO family), `unpaired` -> `UnpairedRecord` (KTO), `prompt` ->
`PromptRecord` (online RL, evaluation).

Text fields are strings or *message lists* (`[{"role": "system"|"user"|"assistant", "content": str}, ...]`);
a prompt and its responses must use the same form. Every other field of a row lands in `extra` untouched
(reward functions receive it). A missing field and a null one are the same thing, because parquet files
and `datasets` directories store absent values as nulls.

Every problem is a `DataError` that renders as `file:row: field: reason`, so the user can open the file at
the right line. Field names index message lists from 0 (`prompt[1].role`). Rows are never dropped
silently: `load_records` either stops at the first bad row or, with `skip_bad_rows`, counts every skip by
category in a `SkipReport`.
"""

from __future__ import annotations

import difflib
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rlhf.data.errors import DataError
from rlhf.data.readers import read_rows

KINDS: tuple[str, ...] = ("sft", "preference", "unpaired", "prompt")
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "tool": "tool", "function_call": "assistant", "observation": "tool"}  # fmt: skip
"""ShareGPT's `from` values -> roles (function calls are the assistant's turns, their results the tool's)."""
HH_ASSISTANT = "\n\nAssistant:"
"""HH-RLHF turn marker: the implicit prompt of a text pair ends with the last one."""

Message = dict[str, str]
Text = str | list[Message]


class _Invalid(Exception):
    """Raised inside row parsing; `parse_row` adds the file and row and turns it into a DataError."""

    def __init__(self, field: str, reason: str, category: str) -> None:
        super().__init__(reason)
        self.field, self.reason, self.category = field, reason, category


@dataclass(frozen=True)
class SFTRecord:
    """A demonstration. Either `text` (the whole text carries loss) or `prompt` + `completion`.

    A `messages` row becomes prompt = every message before the last one, completion = [last assistant
    message]: only the final assistant turn carries loss, earlier turns are context.
    """

    prompt: Text | None
    completion: Text | None
    text: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    format: str = ""
    source: str = ""
    row: int = 0


@dataclass(frozen=True)
class PreferenceRecord:
    """A prompt with a preferred (`chosen`) and a dispreferred (`rejected`) response."""

    prompt: Text
    chosen: Text
    rejected: Text
    margin: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    format: str = ""
    source: str = ""
    row: int = 0


@dataclass(frozen=True)
class UnpairedRecord:
    """A prompt with one response labelled desirable (True) or undesirable (False), for KTO."""

    prompt: Text
    completion: Text
    label: bool
    extra: dict[str, Any] = field(default_factory=dict)
    format: str = ""
    source: str = ""
    row: int = 0


@dataclass(frozen=True)
class PromptRecord:
    """A prompt for generation (online RL, evaluation); `extra` goes to reward functions."""

    prompt: Text
    extra: dict[str, Any] = field(default_factory=dict)
    format: str = ""
    source: str = ""
    row: int = 0


Record = SFTRecord | PreferenceRecord | UnpairedRecord | PromptRecord


@dataclass
class SkipReport:
    """Rows skipped with `skip_bad_rows`, counted by category, with the first few messages as examples."""

    counts: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    max_examples: int = 5

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, error: DataError) -> None:
        self.counts[error.category] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(str(error))

    def lines(self) -> list[str]:
        """Human-readable summary, most frequent reason first (empty when nothing was skipped)."""
        if not self.total:
            return []
        out = [f"skipped {self.total} bad row(s):"]
        out += [f"  {reason}: {n}" for reason, n in self.counts.most_common()]
        out += [f"  e.g. {ex}" for ex in self.examples]
        return out


# ---------------------------------------------------------------------------------------------- helpers


def _type_name(value: Any) -> str:
    """JSON-style type names, because users write JSON."""
    names = {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string"}
    names.update({list: "list", tuple: "list", dict: "object", bytes: "bytes"})
    return names.get(type(value), type(value).__name__)


def _shown(value: Any) -> str:
    """A scalar's value (users recognise it), otherwise its type."""
    scalar = isinstance(value, str | int | float) and not isinstance(value, bool)
    return repr(value) if scalar else _type_name(value)


def _present(row: dict[str, Any], name: str) -> bool:
    return row.get(name) is not None


def _check_unicode(text: str, name: str) -> None:
    """JSON can smuggle in lone surrogates (`"\\ud800"`), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _Invalid(name, "invalid Unicode (a lone surrogate such as \\ud800)", "invalid UTF-8") from None


def _messages(value: list[Any], name: str, *, response: bool) -> list[Message]:
    """Validate a message list; `response` lists (completions, explicit chosen/rejected) are assistant-only."""
    if not value:
        raise _Invalid(name, "empty message list", "empty message list")
    out: list[Message] = []
    for i, message in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(message, dict):
            got = _type_name(message)
            raise _Invalid(where, f"expected a message object with role and content, got {got}", "invalid message")
        role, content = message.get("role"), message.get("content")
        if role is None:
            raise _Invalid(f"{where}.role", "missing field", "missing field")
        if role not in ROLES:
            raise _Invalid(
                f"{where}.role", f"unknown role {role!r} (expected system, user, assistant or tool)", "unknown role"
            )
        if content is None:
            raise _Invalid(f"{where}.content", "missing field", "missing field")
        if not isinstance(content, str):
            raise _Invalid(f"{where}.content", f"expected a string, got {_type_name(content)}", "invalid message")
        if role not in ("system", "tool") and not content.strip():
            raise _Invalid(f"{where}.content", "empty text", "empty text")
        _check_unicode(content, f"{where}.content")
        if response and role != "assistant":
            raise _Invalid(
                f"{where}.role", f"a response message must have role 'assistant', got {role!r}", "wrong role"
            )
        out.append({"role": role, "content": content})
    return out


def _missing(row: dict[str, Any], name: str) -> _Invalid:
    """A required field the row lacks; where the row has a field spelt much like it (`rejectd`, `Prompt`), the
    message names that field, which is most often a misspelling."""
    near = difflib.get_close_matches(name, [k for k in row if isinstance(k, str) and row[k] is not None], n=1)
    reason = "missing field" + (f" (the row has {near[0]!r})" if near else "")
    return _Invalid(name, reason, "missing field")


def _text(row: dict[str, Any], name: str, *, response: bool = False) -> Text:
    """A required string or message list."""
    value = row.get(name)
    if value is None:
        raise _missing(row, name)
    if isinstance(value, str):
        if not value.strip():
            raise _Invalid(name, "empty text", "empty text")
        _check_unicode(value, name)
        return value
    if isinstance(value, list | tuple):
        return _messages(list(value), name, response=response)
    raise _Invalid(name, f"expected a string or a message list, got {_type_name(value)}", "wrong type")


def _same_form(first: Text, other: Text, name: str, like: str = "prompt") -> None:
    """A string prompt takes string responses; a message-list prompt takes message-list responses."""
    if isinstance(first, str) != isinstance(other, str):
        want = "a string" if isinstance(first, str) else "a message list"
        got = "a string" if isinstance(other, str) else "a message list"
        raise _Invalid(name, f"expected {want} like {like}, got {got}", "wrong type")


def _form(value: Text) -> str:
    return "strings" if isinstance(value, str) else "messages"


def _label(row: dict[str, Any]) -> bool:
    value = row.get("label")
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    if value is None:
        raise _missing(row, "label")
    raise _Invalid("label", f"expected a boolean (true/false/1/0), got {_shown(value)}", "invalid label")


def _margin(value: Any) -> float | None:
    """Optional numeric margin; numeric strings are accepted because CSV cells are strings."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    number: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if number is None or not math.isfinite(number):
        raise _Invalid("margin", f"expected a finite number, got {_shown(value)}", "invalid margin")
    return number


def _extra(row: dict[str, Any], used: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in used}


# ---------------------------------------------------------------------------------------------- kinds


def _sharegpt(value: Any) -> list[dict[str, Any]]:
    """ShareGPT `conversations` ([{"from": "human" | "gpt" | ..., "value": text}, ...]) as role/content messages,
    errors named by ShareGPT's own fields."""
    if not isinstance(value, list | tuple):
        raise _Invalid("conversations", f"expected a list of turns, got {_type_name(value)}", "wrong type")
    out = []
    for i, turn in enumerate(value):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise _Invalid(
                where, f"expected a turn object with from and value, got {_type_name(turn)}", "invalid message"
            )
        source = turn.get("from")
        if source is None:
            raise _Invalid(f"{where}.from", "missing field", "missing field")
        if source not in SHAREGPT_ROLES:
            known = ", ".join(SHAREGPT_ROLES)
            raise _Invalid(f"{where}.from", f"unknown speaker {source!r} (expected one of {known})", "unknown role")
        out.append({"role": SHAREGPT_ROLES[source], "content": turn.get("value")})
    return out


def _conversation_sft(value: Any, name: str, extra: dict[str, Any], fmt: str) -> SFTRecord:
    """A whole conversation: every message before the final assistant turn is the prompt."""
    if not isinstance(value, list | tuple):
        raise _Invalid(name, f"expected a message list, got {_type_name(value)}", "wrong type")
    messages = _messages(list(value), name, response=False)
    last = len(messages) - 1
    if messages[-1]["role"] != "assistant":
        raise _Invalid(f"{name}[{last}].role", "the last message must be the assistant's response", "wrong role")
    if last == 0:
        raise _Invalid(name, "no message before the final assistant response", "missing prompt")
    return SFTRecord(messages[:-1], messages[-1:], None, extra, fmt)


def _alpaca(row: dict[str, Any]) -> SFTRecord:
    """Alpaca rows: the instruction, then the optional input after a blank line, is the prompt; output the answer."""
    instruction = _text(row, "instruction")
    if not isinstance(instruction, str):
        raise _Invalid("instruction", "expected a string, got list", "wrong type")
    source = row.get("input")
    if source is not None and not isinstance(source, str):
        raise _Invalid("input", f"expected a string, got {_type_name(source)}", "wrong type")
    output = _text(row, "output")
    if not isinstance(output, str):
        raise _Invalid("output", "expected a string, got list", "wrong type")
    prompt = f"{instruction}\n\n{source}" if source and source.strip() else instruction
    return SFTRecord(prompt, output, None, _extra(row, ("instruction", "input", "output")), "alpaca")


def _sft(row: dict[str, Any]) -> SFTRecord:
    if _present(row, "messages"):
        return _conversation_sft(row["messages"], "messages", _extra(row, ("messages",)), "messages")
    if _present(row, "conversations"):
        messages = _sharegpt(row["conversations"])
        try:
            return _conversation_sft(messages, "conversations", _extra(row, ("conversations",)), "sharegpt")
        except _Invalid as e:  # name ShareGPT's fields: conversations[2].value, not .content
            raise _Invalid(
                e.field.replace(".content", ".value").replace(".role", ".from"), e.reason, e.category
            ) from None
    if _present(row, "instruction") or _present(row, "output"):
        return _alpaca(row)
    if _present(row, "prompt") or _present(row, "completion"):
        prompt = _text(row, "prompt")
        completion = _text(row, "completion", response=True)
        _same_form(prompt, completion, "completion")
        fmt = f"prompt+completion ({_form(prompt)})"
        return SFTRecord(prompt, completion, None, _extra(row, ("prompt", "completion")), fmt)
    if _present(row, "text"):
        text = _text(row, "text")
        if not isinstance(text, str):
            raise _Invalid("text", "expected a string, got list (use `messages` for conversations)", "wrong type")
        return SFTRecord(None, None, text, _extra(row, ("text",)), "text")
    reason = (
        "missing field (an sft row needs text, prompt + completion, messages, conversations or instruction + output)"
    )
    raise _Invalid("text", reason, "missing field")


def _split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """HH-RLHF text pairs: the prompt is the shared prefix up to and including the last `\\n\\nAssistant:`."""
    i, j = chosen.rfind(HH_ASSISTANT), rejected.rfind(HH_ASSISTANT)
    end = i + len(HH_ASSISTANT)
    if i < 0 or i != j or chosen[:end] != rejected[:end]:
        reason = f"missing field, and chosen/rejected do not share a prefix ending in {HH_ASSISTANT!r} (HH-RLHF)"
        raise _Invalid("prompt", reason, "no shared prompt")
    return chosen[:end], chosen[end:], rejected[end:]


def _split_messages(chosen: list[Message], rejected: list[Message]) -> tuple[list[Message], ...]:
    """Whole conversations: the prompt is every message but the last, which must be the assistant's."""
    for name, conv in (("chosen", chosen), ("rejected", rejected)):
        if conv[-1]["role"] != "assistant":
            where = f"{name}[{len(conv) - 1}].role"
            raise _Invalid(where, "the last message must be the assistant's response", "wrong role")
    if chosen[:-1] != rejected[:-1]:
        reason = "must share every message but the last assistant turn with chosen (the implicit prompt)"
        raise _Invalid("rejected", reason, "no shared prompt")
    if len(chosen) < 2:
        raise _Invalid("chosen", "no shared prompt before the final assistant turn", "no shared prompt")
    return chosen[:-1], chosen[-1:], rejected[-1:]


def _whole_conversations(row: dict[str, Any]) -> bool:
    """UltraFeedback-binarized rows: a `prompt` and chosen/rejected that are whole conversations repeating it."""
    value = row.get("chosen")
    return isinstance(value, list | tuple) and any(isinstance(m, dict) and m.get("role") != "assistant" for m in value)


def _preference_conversations(row: dict[str, Any]) -> PreferenceRecord:
    """`prompt` + chosen/rejected as whole conversations: the shared turns before the final assistant turn are the
    prompt, and a string `prompt` must be the last user turn among them (what UltraFeedback-binarized writes)."""
    chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
    if not isinstance(rejected, list):
        raise _Invalid("rejected", "expected a message list like chosen, got a string", "wrong type")
    assert isinstance(chosen, list)
    prompt, chosen, rejected = _split_messages(chosen, rejected)
    given = row.get("prompt")
    users = [m["content"] for m in prompt if m["role"] == "user"]
    if isinstance(given, str) and (not users or given.strip() != users[-1].strip()):
        reason = "does not match the conversations' last user turn (chosen and rejected repeat the prompt)"
        raise _Invalid("prompt", reason, "prompt mismatch")
    if chosen == rejected:
        raise _Invalid("rejected", "identical to chosen", "identical responses")
    extra = _extra(row, ("prompt", "chosen", "rejected", "margin"))
    fmt = "prompt+chosen+rejected (whole conversations, UltraFeedback)"
    return PreferenceRecord(prompt, chosen, rejected, _margin(row.get("margin")), extra, fmt)


def _preference(row: dict[str, Any]) -> PreferenceRecord:
    explicit = _present(row, "prompt")
    if explicit and _whole_conversations(row):
        return _preference_conversations(row)
    prompt = _text(row, "prompt") if explicit else None
    chosen = _text(row, "chosen", response=explicit)
    rejected = _text(row, "rejected", response=explicit)
    if prompt is not None:
        _same_form(prompt, chosen, "chosen")
        _same_form(prompt, rejected, "rejected")
        fmt = f"prompt+chosen+rejected ({_form(prompt)})"
    else:
        _same_form(chosen, rejected, "rejected", like="chosen")
        if isinstance(chosen, str) and isinstance(rejected, str):
            prompt, chosen, rejected = _split_hh(chosen, rejected)
            for name, text in (("chosen", chosen), ("rejected", rejected)):
                if not text.strip():
                    raise _Invalid(name, "empty text (nothing after the last '\\n\\nAssistant:')", "empty text")
            fmt = "chosen+rejected (HH-RLHF text, implicit prompt)"
        else:
            assert isinstance(chosen, list) and isinstance(rejected, list)
            prompt, chosen, rejected = _split_messages(chosen, rejected)
            fmt = "chosen+rejected (messages, implicit prompt)"
    if chosen == rejected:
        raise _Invalid("rejected", "identical to chosen", "identical responses")
    margin = _margin(row.get("margin"))
    extra = _extra(row, ("prompt", "chosen", "rejected", "margin"))
    return PreferenceRecord(prompt, chosen, rejected, margin, extra, fmt)


def _unpaired(row: dict[str, Any]) -> UnpairedRecord:
    prompt = _text(row, "prompt")
    completion = _text(row, "completion", response=True)
    _same_form(prompt, completion, "completion")
    label = _label(row)
    fmt = f"prompt+completion+label ({_form(prompt)})"
    return UnpairedRecord(prompt, completion, label, _extra(row, ("prompt", "completion", "label")), fmt)


def _prompt(row: dict[str, Any]) -> PromptRecord:
    prompt = _text(row, "prompt")
    fmt = "prompt (string)" if isinstance(prompt, str) else "prompt (messages)"
    return PromptRecord(prompt, _extra(row, ("prompt",)), fmt)


_PARSERS: dict[str, Callable[[dict[str, Any]], Record]] = {
    "sft": _sft,
    "preference": _preference,
    "unpaired": _unpaired,
    "prompt": _prompt,
}


def check_kind(kind: str) -> None:
    """Raise ValueError for an unknown kind (a usage error, not a data error)."""
    if kind not in _PARSERS:
        raise ValueError(f"unknown data kind {kind!r}; expected one of {', '.join(KINDS)}")


def parse_row(value: Any, kind: str, *, source: str = "<rows>", row: int = 0) -> Record:
    """Validate one row (already read from its file) and return its canonical record, or raise DataError."""
    check_kind(kind)
    if not isinstance(value, dict):
        raise DataError(source, row, "row", f"expected an object, got {_type_name(value)}", "not an object")
    if not all(isinstance(k, str) for k in value):
        raise DataError(source, row, "row", "field names must be strings", "not an object")
    try:
        record = _PARSERS[kind](value)
    except _Invalid as e:
        raise DataError(source, row, e.field, e.reason, e.category) from None
    return _located(record, source, row)


def _located(record: Record, source: str, row: int) -> Record:
    return replace(record, source=source, row=row)


# ---------------------------------------------------------------------------------------------- loading


def iter_records(path: str | Path, kind: str) -> Iterator[Record | DataError]:
    """Each row of a file as a record, or as the DataError that row raises (row problems are yielded, so a
    checker can list them all). Problems with the whole file (missing, unreadable) are raised."""
    check_kind(kind)
    source = str(path)
    for row, value in read_rows(path):
        if isinstance(value, DataError):
            yield value
            continue
        try:
            yield parse_row(value, kind, source=source, row=row)
        except DataError as e:
            yield e


def collect_records(
    items: Iterable[Record | DataError], *, skip_bad_rows: bool = False
) -> tuple[list[Record], SkipReport]:
    """Keep the records; raise the first DataError, or count each one when skipping bad rows."""
    records: list[Record] = []
    report = SkipReport()
    for item in items:
        if isinstance(item, DataError):
            if not skip_bad_rows:
                raise item
            report.add(item)
        else:
            records.append(item)
    return records, report


def load_records(path: str | Path, kind: str, *, skip_bad_rows: bool = False) -> tuple[list[Record], SkipReport]:
    """Read and validate a data file (.jsonl, .json, .parquet, .csv or a `save_to_disk` directory).

    Without `skip_bad_rows` the first bad row raises its DataError; with it, bad rows are skipped and
    counted by reason in the returned SkipReport (log it: skips are never silent).
    """
    return collect_records(iter_records(path, kind), skip_bad_rows=skip_bad_rows)


def records_from_rows(
    rows: Iterable[Any], kind: str, *, source: str = "<rows>", skip_bad_rows: bool = False
) -> tuple[list[Record], SkipReport]:
    """Like `load_records` for rows already in memory (e.g. `rlhf.tasks.sorting.sft_rows(100)`); rows are
    numbered from 1."""
    check_kind(kind)

    def parse_all() -> Iterator[Record | DataError]:
        for i, value in enumerate(rows, 1):
            try:
                yield parse_row(value, kind, source=source, row=i)
            except DataError as e:
                yield e

    return collect_records(parse_all(), skip_bad_rows=skip_bad_rows)


def is_conversational(record: Record) -> bool:
    """True when the record's text is message lists (rendered with the tokenizer's chat template)."""
    return isinstance(getattr(record, "prompt", None), list)
