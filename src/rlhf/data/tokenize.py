"""Token ids and loss masks from canonical records, for any Hugging Face tokenizer.

The rules (each one guards against a classic silent RLHF bug):

1. **Prompt/response split.** Conversational records (message lists) go through the tokenizer's chat
   template: the prompt rendered with `add_generation_prompt=True`, the whole conversation without. Both
   texts are encoded with `add_special_tokens=False` (the template writes its own special tokens). The
   response is what follows the prompt ids in the full ids; we check that the full ids really start with
   the prompt ids. If they do not (a merge across the boundary), we split the *text* instead and count a
   template fallback; if even the text does not start with the rendered prompt, the example is dropped.
   Plain-string records encode prompt and response separately.
2. **Prompt tokens never carry loss** (labels -100). Labels are not shifted: `labels[t]` is `input_ids[t]`;
   the loss shifts.
3. **BOS**: exactly one at the start when the tokenizer adds one by default or the template writes one,
   none otherwise; never two (a template with `{{ bos_token }}` plus the tokenizer's own BOS is the trap).
4. **EOS**: a response ends with EOS exactly once. Template text after the last EOS (e.g. a newline) is
   not part of the response; if the template writes no EOS, one is appended.
5. **Truncation**: a prompt longer than `max_prompt_length` keeps its end (`keep_end`, the default: the
   part nearest the response, plus the leading BOS) or its start (`keep_start`; note this cuts off the
   chat template's generation prompt). Then the response keeps its start to fit `max_length` in total.
   A truncated response has **no EOS**: the text did not end there, and teaching the model to stop
   mid-answer would be wrong. A response truncated to nothing drops the example (`SkipExample`),
   counted by reason in the `TokenizeReport` - never trained on silently.
"""

from __future__ import annotations

import functools
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rlhf.data.formats import (
    Message,
    PreferenceRecord,
    PromptRecord,
    Record,
    SFTRecord,
    Text,
    UnpairedRecord,
    check_kind,
)
from rlhf.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from rlhf.config import DataConfig

IGNORE_INDEX = -100
TRUNCATION_SIDES = ("keep_end", "keep_start")


TRUNCATED = "response truncated to nothing"
TRUNCATED_TO_TWINS = "identical after truncation"
TRUNCATION_DROPS = (TRUNCATED, TRUNCATED_TO_TWINS)
"""The drop categories that `data.max_length` / `data.max_prompt_length` cause (others: the rows themselves)."""


class SkipExample(Exception):
    """This record cannot become a training example (e.g. its response was truncated to nothing).

    `category` is the short name drops are counted under; `field: reason` says what happened.
    """

    def __init__(self, field: str, reason: str, category: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field, self.reason, self.category = field, reason, category


@dataclass(frozen=True)
class _Special:
    bos: int | None
    eos: int
    adds_bos: bool


_SPECIAL: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, _Special] = weakref.WeakKeyDictionary()


def _special(tokenizer: PreTrainedTokenizerBase) -> _Special:
    """BOS, EOS and whether encoding adds a BOS, probed once per tokenizer (again if BOS or EOS change)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise TokenizerSetupError(
            "the tokenizer has no eos_token; responses must end with EOS (set tokenizer.eos_token)"
        )
    bos = tokenizer.bos_token_id
    known = _SPECIAL.get(tokenizer)
    if known is None or (known.bos, known.eos) != (bos, eos):
        probe = tokenizer.encode("a")  # what the tokenizer does by default
        known = _SPECIAL[tokenizer] = _Special(bos, eos, adds_bos=bos is not None and probe[:1] == [bos])
    return known


def _check_cfg(cfg: DataConfig) -> None:
    if cfg.truncation_side not in TRUNCATION_SIDES:
        raise ValueError(f"data.truncation_side must be one of {TRUNCATION_SIDES}, got {cfg.truncation_side!r}")
    if cfg.max_length < 1 or cfg.max_prompt_length < 1:
        raise ValueError("data.max_length and data.max_prompt_length must be at least 1")


class TokenizerSetupError(UserError, ValueError):
    """The tokenizer cannot tokenize this kind of data at all (no EOS, no chat template for message lists)."""


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _with_bos(ids: list[int], sp: _Special) -> list[int]:
    """Exactly one leading BOS if the tokenizer adds one by default (or the text already has one)."""
    if sp.bos is None:
        return ids
    if sp.adds_bos and ids[:1] != [sp.bos]:
        ids = [sp.bos, *ids]
    while len(ids) >= 2 and ids[0] == ids[1] == sp.bos:
        ids = ids[1:]
    return ids


def _render(
    tokenizer: PreTrainedTokenizerBase, messages: list[Message], *, add_generation_prompt: bool, field: str
) -> str:
    """The chat template's text of `messages`; a row the template refuses (Gemma's "System role not supported",
    Mistral's "Conversation roles must alternate ...") is dropped and counted under `field` (the prompt, or the
    response where the prompt alone renders)."""
    from jinja2 import TemplateError

    if not getattr(tokenizer, "chat_template", None):
        raise TokenizerSetupError(
            "the tokenizer has no chat template, but the data is conversational (message lists); give a "
            "tokenizer that has one (model.tokenizer), set chat_template in its tokenizer_config.json, or use "
            "plain-string rows"
        )
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as exc:
        raise SkipExample(field, f"the chat template refuses it: {exc}", "refused by the chat template") from None
    return str(text)


def _encode_prompt(prompt: Text, tokenizer: PreTrainedTokenizerBase, sp: _Special) -> tuple[str, list[int]]:
    """(rendered text, ids) of the prompt; a conversational prompt ends with the generation prompt."""
    text = prompt if isinstance(prompt, str) else _render(tokenizer, prompt, add_generation_prompt=True, field="prompt")
    return text, _with_bos(_encode(tokenizer, text), sp)


def _encode_response(
    prompt: Text,
    prompt_text: str,
    prompt_ids: list[int],
    response: Text,
    tokenizer: PreTrainedTokenizerBase,
    sp: _Special,
    whole_turns: bool = False,
) -> tuple[list[int], bool]:
    """Response ids ending with exactly one EOS, and whether the text-level fallback split was needed.

    `whole_turns` (what a reward model scores): a conversational response is everything the chat template
    writes for it, text after its EOS included (ChatML's newline), so prompt + response are exactly the tokens
    of the rendered conversation, as `apply_chat_template(messages, tokenize=True)` gives them.
    """
    if isinstance(prompt, str) != isinstance(response, str):
        raise TypeError("a prompt and its responses must both be strings or both be message lists")
    if isinstance(response, str):
        ids = _encode(tokenizer, response)
        if ids[-1:] != [sp.eos]:
            ids.append(sp.eos)
        return ids, False
    assert isinstance(prompt, list)
    full_text = _render(tokenizer, [*prompt, *response], add_generation_prompt=False, field="response")
    full_ids = _with_bos(_encode(tokenizer, full_text), sp)
    fallback = False
    if full_ids[: len(prompt_ids)] == prompt_ids:
        ids = full_ids[len(prompt_ids) :]
    elif full_text.startswith(prompt_text):
        ids, fallback = _encode(tokenizer, full_text[len(prompt_text) :]), True
    else:
        reason = "the chat template's rendered prompt is not a prefix of the rendered conversation"
        raise SkipExample("prompt", reason, "chat template mismatch")
    if whole_turns:
        return ids, fallback
    if sp.eos in ids:  # the response ends at its last EOS; drop template text after it (e.g. "\n")
        ids = ids[: len(ids) - ids[::-1].index(sp.eos)]
    else:
        ids.append(sp.eos)
    return ids, fallback


def _truncate_prompt(ids: list[int], cfg: DataConfig, sp: _Special) -> tuple[list[int], bool]:
    n = cfg.max_prompt_length
    if len(ids) <= n:
        return ids, False
    if cfg.truncation_side == "keep_start":
        return ids[:n], True
    if n > 1 and sp.bos is not None and ids[0] == sp.bos:  # keep_end, but keep the BOS the model expects
        return [ids[0], *ids[len(ids) - n + 1 :]], True
    return ids[len(ids) - n :], True


def _fit_response(ids: list[int], prompt_len: int, max_length: int) -> tuple[list[int], bool]:
    budget = max_length - prompt_len
    if budget <= 0:
        reason = f"truncated to nothing (the prompt takes {prompt_len} of max_length {max_length} tokens)"
        raise SkipExample("response", reason, TRUNCATED)
    return ids[:budget], len(ids) > budget


def _prompt_and_responses(
    prompt: Text,
    responses: list[Text],
    tokenizer: PreTrainedTokenizerBase,
    cfg: DataConfig,
    whole_turns: bool = False,
) -> tuple[list[int], list[list[int]], dict[str, bool]]:
    """The shared path of every prompt+response kind: split, then truncate the prompt, then the responses."""
    _check_cfg(cfg)
    sp = _special(tokenizer)
    prompt_text, prompt_ids = _encode_prompt(prompt, tokenizer, sp)
    encoded = [_encode_response(prompt, prompt_text, prompt_ids, r, tokenizer, sp, whole_turns) for r in responses]
    prompt_ids, prompt_truncated = _truncate_prompt(prompt_ids, cfg, sp)
    fitted = [_fit_response(ids, len(prompt_ids), cfg.max_length) for ids, _ in encoded]
    flags = {
        "prompt_truncated": prompt_truncated,
        "response_truncated": any(t for _, t in fitted),
        "template_fallback": any(f for _, f in encoded),
    }
    return prompt_ids, [ids for ids, _ in fitted], flags


def tokenize_sft(
    record: SFTRecord, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig, *, whole_turns: bool = False
) -> dict[str, Any]:
    """`input_ids`, `labels` (-100 on the prompt, unshifted) and `prompt_len`, plus truncation flags.

    A `text` record carries loss on all of its text (everything but the BOS) and is truncated from the end.
    `whole_turns`: see `_encode_response` (how a reward model reads a conversation).
    """
    if record.text is None:
        assert record.prompt is not None and record.completion is not None
        prompt_ids, (response_ids,), flags = _prompt_and_responses(
            record.prompt, [record.completion], tokenizer, cfg, whole_turns
        )
        input_ids = prompt_ids + response_ids
        labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
        return {"input_ids": input_ids, "labels": labels, "prompt_len": len(prompt_ids), **flags}
    _check_cfg(cfg)
    sp = _special(tokenizer)
    ids = _with_bos(_encode(tokenizer, record.text), sp)
    prompt_len = 1 if sp.bos is not None and ids[:1] == [sp.bos] else 0
    if ids[-1:] != [sp.eos]:
        ids.append(sp.eos)
    truncated = len(ids) > cfg.max_length
    ids = ids[: cfg.max_length]
    if len(ids) <= prompt_len:
        reason = "truncated to nothing (max_length leaves room for BOS only)"
        raise SkipExample("text", reason, TRUNCATED)
    labels = [IGNORE_INDEX] * prompt_len + ids[prompt_len:]
    flags = {"prompt_truncated": False, "response_truncated": truncated, "template_fallback": False}
    return {"input_ids": ids, "labels": labels, "prompt_len": prompt_len, **flags}


def tokenize_responses(
    prompt: Text,
    responses: list[Text],
    tokenizer: PreTrainedTokenizerBase,
    cfg: DataConfig,
    *,
    whole_turns: bool = False,
) -> tuple[list[int], list[list[int]]]:
    """The prompt's ids and each response's, as `tokenize_sft` gives them for (prompt, response) one at a time
    (`input_ids` = prompt ids + response ids), the prompt rendered and encoded once for all of them."""
    prompt_ids, response_ids, _ = _prompt_and_responses(prompt, responses, tokenizer, cfg, whole_turns)
    return prompt_ids, response_ids


def tokenize_preference(
    record: PreferenceRecord, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig, *, whole_turns: bool = False
) -> dict[str, Any]:
    """`prompt_ids`, `chosen_ids`, `rejected_ids` (responses, each ending with EOS unless truncated), `margin`.
    `whole_turns` (reward models): each response as the chat template writes it (see `_encode_response`)."""
    prompt_ids, (chosen, rejected), flags = _prompt_and_responses(
        record.prompt, [record.chosen, record.rejected], tokenizer, cfg, whole_turns
    )
    if chosen == rejected:
        raise SkipExample("rejected", "identical to chosen after truncation", TRUNCATED_TO_TWINS)
    return {"prompt_ids": prompt_ids, "chosen_ids": chosen, "rejected_ids": rejected, "margin": record.margin, **flags}


def tokenize_unpaired(record: UnpairedRecord, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> dict[str, Any]:
    """`prompt_ids`, `completion_ids` (ending with EOS unless truncated) and `label` (True = desirable)."""
    prompt_ids, (completion,), flags = _prompt_and_responses(record.prompt, [record.completion], tokenizer, cfg)
    return {"prompt_ids": prompt_ids, "completion_ids": completion, "label": bool(record.label), **flags}


def tokenize_prompt(record: PromptRecord, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> dict[str, Any]:
    """`prompt_ids` (ending with the generation prompt for conversations), the original `prompt` and `extra`.

    Only `max_prompt_length` applies; `max_length` bounds prompt + response at generation time.
    """
    _check_cfg(cfg)
    sp = _special(tokenizer)
    _, prompt_ids = _encode_prompt(record.prompt, tokenizer, sp)
    prompt_ids, truncated = _truncate_prompt(prompt_ids, cfg, sp)
    return {
        "prompt_ids": prompt_ids,
        "prompt": record.prompt,
        "extra": dict(record.extra),
        "prompt_truncated": truncated,
    }


TOKENIZE_FNS: dict[str, Callable[..., dict[str, Any]]] = {
    "sft": tokenize_sft,
    "preference": tokenize_preference,
    "unpaired": tokenize_unpaired,
    "prompt": tokenize_prompt,
}


def example_tokens(example: dict[str, Any]) -> int:
    """The tokens a tokenized example holds: an SFT example's (or packed row's) `input_ids`, else all its `*_ids`
    lists together (a preference pair's prompt, chosen and rejected): what a batch of it costs, to group examples of
    like length."""
    if "input_ids" in example:  # a packed row's position_ids are no tokens
        return len(example["input_ids"])
    return sum(len(v) for k, v in example.items() if k.endswith("_ids"))


def longest_first(examples: Sequence[dict[str, Any]]) -> list[int]:
    """The indices of `examples` in order of `example_tokens`, longest first (a stable sort): padded batches cut
    from this order hold examples of like length, and the first is the largest, so one too large for memory fails
    at once. Scoring passes whose results are sums, or are put back in place, use it."""
    return sorted(range(len(examples)), key=lambda i: -example_tokens(examples[i]))


def percentile(values: list[int], q: float) -> int:
    """Nearest-rank percentile (an actual value of the data): the smallest v with at least q% of values <= v."""
    if not values:
        return 0
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n q / 100)
    return ordered[min(len(ordered), int(rank)) - 1]


@dataclass
class TokenizeReport:
    """What tokenization did to a data set: truncations, drops by reason, and token-length statistics."""

    kind: str
    rows: int = 0
    examples: int = 0
    truncated_prompts: int = 0
    truncated_responses: int = 0
    template_fallbacks: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    dropped_examples: list[str] = field(default_factory=list)
    lengths: dict[str, list[int]] = field(default_factory=dict)

    def add(self, example: dict[str, Any]) -> None:
        self.examples += 1
        self.truncated_prompts += bool(example.get("prompt_truncated"))
        self.truncated_responses += bool(example.get("response_truncated"))
        self.template_fallbacks += bool(example.get("template_fallback"))
        if "input_ids" in example:  # sft
            sizes = {"prompt": example["prompt_len"], "response": len(example["input_ids"]) - example["prompt_len"]}
        else:
            sizes = {k[: -len("_ids")]: len(v) for k, v in example.items() if k.endswith("_ids")}
        for name, n in sizes.items():
            self.lengths.setdefault(name, []).append(n)

    def drop(self, record: Record, error: SkipExample) -> None:
        self.dropped[error.category] += 1
        if len(self.dropped_examples) < 5:
            where = f"{record.source}:{record.row}: " if record.source else ""
            self.dropped_examples.append(f"{where}{error}")

    def percentiles(self, name: str) -> dict[str, int]:
        values = self.lengths.get(name, [])
        return {
            "p50": percentile(values, 50),
            "p90": percentile(values, 90),
            "p99": percentile(values, 99),
            "max": max(values, default=0),
        }

    def as_dict(self) -> dict[str, int]:
        """Flat numbers for a metrics log (`data/...` keys)."""
        out = {
            "data/rows": self.rows,
            "data/examples": self.examples,
            "data/dropped": sum(self.dropped.values()),
            "data/truncated_prompts": self.truncated_prompts,
            "data/truncated_responses": self.truncated_responses,
        }
        for name in self.lengths:
            out.update({f"data/{name}_len_{k}": v for k, v in self.percentiles(name).items()})
        return out


def tokenize_records(
    records: Iterable[Record],
    kind: str,
    tokenizer: PreTrainedTokenizerBase,
    cfg: DataConfig,
    *,
    whole_turns: bool = False,
) -> tuple[list[dict[str, Any]], TokenizeReport]:
    """Tokenize every record of one kind; records that cannot become examples are dropped and counted.
    `whole_turns` (sft and preference kinds): conversations as the chat template writes them, for reward models.

    Raises TokenizerSetupError (a one-line user error naming the data file and the tokenizer) for problems that
    affect every row (no EOS token, no chat template for conversational data): configuration, not bad rows.
    """
    check_kind(kind)
    fn = TOKENIZE_FNS[kind]
    if whole_turns:
        fn = functools.partial(fn, whole_turns=True)
    report = TokenizeReport(kind)
    examples = []
    for record in records:
        report.rows += 1
        try:
            example = fn(record, tokenizer, cfg)
        except SkipExample as e:
            report.drop(record, e)
            continue
        except TokenizerSetupError as e:
            source = record.source or "the data"
            raise TokenizerSetupError(f"{source}: {e} (tokenizer {getattr(tokenizer, 'name_or_path', '?')})") from None
        report.add(example)
        examples.append(example)
    return examples, report
