"""Shared configuration: typed dataclasses composed by nesting, one top-level config per algorithm.

Each field is documented once, by the string literal under it; that text is the `--help` and the docs.
Algorithm configs (in `rlhf/trainers/<algo>.py`) nest the shared sections below and add their own fields.
Derived values are properties; algorithm code never mutates its config.
"""

from __future__ import annotations

import textwrap
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf.config_loader import (
    field_docs,
    field_types,
    load_config,
    parse_overrides,
    read_yaml,
    save_config,
    section_type,
    to_dict,
    type_name,
    validate_config,
)
from rlhf.errors import ConfigError

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "FieldInfo",
    "LoggingConfig",
    "LoraConfig",
    "ModelConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TrainConfig",
    "check",
    "check_choice",
    "config_help",
    "config_markdown",
    "field_docs",
    "format_value",
    "iter_fields",
    "load_config",
    "parse_overrides",
    "read_yaml",
    "save_config",
    "to_dict",
    "type_name",
    "validate_config",
]

DTYPES = ("float32", "bfloat16", "float16")
MIXED_PRECISION = ("no", "bf16", "fp16")
SCHEDULES = ("constant", "linear", "cosine")
TRUNCATION_SIDES = ("keep_end", "keep_start")
TRACKERS = ("tensorboard", "wandb", "comet_ml", "aim", "mlflow", "clearml", "dvclive", "swanlab", "trackio")


def check(ok: bool, key: str, message: str) -> None:
    """In a `validate()` method: raise `ConfigError(message, key=key)` unless `ok`; the loader adds the path."""
    if not ok:
        raise ConfigError(message, key=key)


def check_choice(value: object, choices: tuple[object, ...], key: str) -> None:
    """In a `validate()` method: `value` must be one of `choices` (the error lists them)."""
    check(value in choices, key, f"expected one of {', '.join(map(repr, choices))}, got {value!r}")


@dataclass
class LoraConfig:
    r: int = 0
    """LoRA rank; 0 trains all weights (no adapter)."""
    alpha: float = 16.0
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.0
    """Dropout on the LoRA branch."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names (or `all-linear`) that receive adapters."""

    def validate(self) -> None:
        check(self.r >= 0, "r", f"must be >= 0, got {self.r}")
        check(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")
        check(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")
        check(self.r == 0 or bool(self.target_modules), "target_modules", "must not be empty when r > 0")


@dataclass
class ModelConfig:
    path: str = ""
    """Hugging Face checkpoint directory of the model to train (or to start from)."""
    tokenizer: str | None = None
    """Tokenizer directory; defaults to `path`."""
    dtype: str = "float32"
    """Weight dtype when loading: float32, bfloat16 or float16."""
    trust_remote_code: bool = False
    """Allow code shipped with the checkpoint to run. Off unless you trust the checkpoint."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Low-rank adapters (peft)."""

    def validate(self) -> None:
        check_choice(self.dtype, DTYPES, "dtype")

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.path


@dataclass
class DataConfig:
    train: str = ""
    """Training data: a .jsonl, .json, .parquet or .csv file, or a `datasets.save_to_disk` directory."""
    eval: str | None = None
    """Held-out data in the same format; if unset, `eval_fraction` of `train` is held out."""
    eval_fraction: float = 0.0
    """Fraction of the training rows held out for evaluation when `eval` is unset."""
    max_length: int = 512
    """Maximum tokens of prompt + response."""
    max_prompt_length: int = 256
    """Maximum prompt tokens; longer prompts keep their end (the part nearest the response)."""
    truncation_side: str = "keep_end"
    """Prompt truncation: keep_end (drop the start of long prompts) or keep_start."""
    skip_bad_rows: bool = False
    """Skip invalid rows (each skip counted by reason) instead of stopping at the first one."""
    packing: bool = False
    """Pack several examples into one sequence (SFT only)."""
    padding_free: bool = True
    """SFT, the reward model, DPO (with its shared prompt) and KTO: run each micro-batch as one row of its
    examples back to back, attention kept within each example, so no compute goes to padding; the loss is that
    of padded batches. Needs a `transformers` model on sdpa attention whose layers mix tokens by attention alone,
    checked on loading (others use padded batches)."""
    group_by_length: bool = False
    """Draw each batch from examples of like length (as `transformers`' group_by_length; the online trainers:
    prompts), so that padded batches pad little. It changes which examples share a step, not how often each is
    drawn."""

    def validate(self) -> None:
        check(0 <= self.eval_fraction < 1, "eval_fraction", f"must be in [0, 1), got {self.eval_fraction}")
        check(
            self.eval is None or self.eval_fraction == 0,
            "eval_fraction",
            f"set either eval or eval_fraction, not both (eval={self.eval!r}, eval_fraction={self.eval_fraction})",
        )
        check(self.max_length > 0, "max_length", f"must be > 0, got {self.max_length}")
        check(
            0 < self.max_prompt_length < self.max_length,
            "max_prompt_length",
            f"must be > 0 and < max_length ({self.max_length}) to leave room for the response, "
            f"got {self.max_prompt_length}",
        )
        check_choice(self.truncation_side, TRUNCATION_SIDES, "truncation_side")


@dataclass
class OptimConfig:
    lr: float = 1e-5
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    beta1: float = 0.9
    """AdamW first-moment decay."""
    beta2: float = 0.999
    """AdamW second-moment decay."""
    eps: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""

    def validate(self) -> None:
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(0 <= self.beta1 < 1, "beta1", f"must be in [0, 1), got {self.beta1}")
        check(0 <= self.beta2 < 1, "beta2", f"must be in [0, 1), got {self.beta2}")
        check(self.eps > 0, "eps", f"must be > 0, got {self.eps}")
        check(self.max_grad_norm >= 0, "max_grad_norm", f"must be >= 0 (0 disables clipping), got {self.max_grad_norm}")


@dataclass
class ScheduleConfig:
    name: str = "cosine"
    """Learning-rate schedule after warmup: constant, linear or cosine."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup from 0 to the peak learning rate."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of the peak (linear and cosine)."""

    def validate(self) -> None:
        check_choice(self.name, SCHEDULES, "name")
        check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class TrainConfig:
    batch_size: int = 8
    """Global batch: examples per optimizer step, summed over processes and accumulation."""
    micro_batch_size: int = 8
    """Examples per forward pass on one process; where padded, a batch split into several micro-batches is cut
    longest first, so that each holds examples of like length (the step's gradient is the same for any split)."""
    epochs: int = 1
    """Passes over the training data (ignored when max_steps is set)."""
    max_steps: int = 0
    """Optimizer steps to run; 0 derives them from `epochs`."""
    mixed_precision: str = "no"
    """Autocast precision through accelerate: no, bf16 or fp16 (fp16 on GPU only)."""
    max_consecutive_nonfinite: int = 10
    """Abort after this many optimizer steps in a row skipped for a non-finite loss or gradient (0: never)."""
    max_nonfinite_fraction: float = 0.1
    """A run that skipped more than this fraction of its optimizer steps for a non-finite loss or gradient (fp16
    loss-scale overflows aside) ends with an error instead of saving final/; so does one that made no update."""
    eval_every: int = 0
    """Evaluate on the held-out split every N optimizer steps (0: only at the end)."""

    def validate(self) -> None:
        # Single-process invariants only: the engine checks divisibility by micro_batch_size * world size.
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.micro_batch_size >= 1, "micro_batch_size", f"must be >= 1, got {self.micro_batch_size}")
        check(
            self.batch_size % self.micro_batch_size == 0,
            "batch_size",
            f"must be a multiple of micro_batch_size ({self.micro_batch_size}), got {self.batch_size}",
        )
        check(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        check(self.max_steps >= 0, "max_steps", f"must be >= 0 (0: derive from epochs), got {self.max_steps}")
        check_choice(self.mixed_precision, MIXED_PRECISION, "mixed_precision")
        check(self.max_consecutive_nonfinite >= 0, "max_consecutive_nonfinite", "must be >= 0 (0: never abort)")
        check(0 <= self.max_nonfinite_fraction <= 1, "max_nonfinite_fraction", "must be in [0, 1]")
        check(self.eval_every >= 0, "eval_every", f"must be >= 0, got {self.eval_every}")


@dataclass
class LoggingConfig:
    every: int = 1
    """Write metrics every N optimizer steps, and at the run's last step."""
    trackers: list[str] = field(default_factory=list)
    """Extra accelerate trackers: tensorboard, wandb (install `rlhf[tensorboard]` / `rlhf[wandb]`; one that cannot
    start is an error)."""
    progress: bool = True
    """Show a progress bar of the training steps, and transient ones of the passes beside them (evaluation, the
    reference log-probs)."""

    def validate(self) -> None:
        check(self.every >= 1, "every", f"must be >= 1, got {self.every}")
        for i, tracker in enumerate(self.trackers):
            check_choice(tracker, TRACKERS, f"trackers[{i}]")


@dataclass
class CheckpointConfig:
    every: int = 0
    """Write a resumable checkpoint every N optimizer steps (0: none by step count)."""
    every_minutes: float = 30.0
    """Also write one when this many minutes have passed since the last (or since the start), so that a killed
    run loses at most that much work (0: off). The main process's clock decides, for all processes."""
    keep_last: int = 2
    """Resumable checkpoints kept; older ones are deleted once a newer one is complete."""
    resume: str = "auto"
    """auto: continue from the newest complete checkpoint in the run directory; never; or a checkpoint path."""
    allow_config_change: bool = False
    """Resume although the config changes what the run computes (the differences are listed either way; changing
    logging, checkpointing or the run's length needs no permission)."""

    def validate(self) -> None:
        check(self.every >= 0, "every", f"must be >= 0, got {self.every}")
        check(self.every_minutes >= 0, "every_minutes", f"must be >= 0, got {self.every_minutes}")
        check(self.keep_last >= 1, "keep_last", f"must be >= 1, got {self.keep_last}")
        check(
            self.resume in ("auto", "never") or Path(self.resume).exists(),
            "resume",
            f"expected auto, never or an existing checkpoint directory, got {self.resume!r}",
        )


# ---------------------------------------------------------------------------------------------- docs
# `rlhf train ALGO --help` and docs/config.md, generated from the field docstrings.
class FieldInfo(typing.NamedTuple):
    key: str  # dotted path, `optim.lr`
    type: Any  # the resolved annotation
    default: Any  # the default value; for a section, its default instance (or None)
    doc: str  # the docstring, whitespace collapsed
    section: bool  # a nested config section


def iter_fields(cls: type, prefix: str = "") -> Iterator[FieldInfo]:
    """Every field of the config tree, depth first: a level's plain fields, then each section and its fields."""
    obj, docs = cls(), field_docs(cls)
    infos = [
        FieldInfo(prefix + name, tp, getattr(obj, name), " ".join(docs.get(name, "").split()), bool(section_type(tp)))
        for name, tp in field_types(cls).items()
    ]
    yield from (f for f in infos if not f.section)
    for f in infos:
        if f.section:
            yield f
            yield from iter_fields(typing.cast(type, section_type(f.type)), f.key + ".")


def format_value(value: Any) -> str:
    """A default as the user would write it on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    return '""' if value == "" else str(value)


def config_help(cls: type, width: int = 100) -> str:
    """Every field as `--dotted.key TYPE (default: ...)` and its wrapped docstring, grouped by section."""
    lines: list[str] = []
    for f in iter_fields(cls):
        if f.section:
            unset = " (unset by default)" if f.default is None else ""
            lines += ["", f"{f.key}:{unset}  {f.doc}".rstrip()]
            continue
        lines.append(f"  --{f.key} {type_name(f.type)}  (default: {format_value(f.default)})")
        lines += textwrap.wrap(f.doc, width=width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines).strip("\n")


def config_markdown(cls: type, prefix: str = "") -> str:
    """Markdown tables of every field (key, type, default, description), one table per section."""
    header = ["| key | type | default | description |", "|---|---|---|---|"]
    out = list(header)
    for f in iter_fields(cls, prefix):
        if f.section:
            out += ["", f"#### `{f.key}`", "", f.doc, "", *header]
        else:
            cells = [f"`{f.key}`", f"`{type_name(f.type)}`", f"`{format_value(f.default)}`", f.doc]
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(out[2:] if out[2:3] == [""] else out) + "\n"
