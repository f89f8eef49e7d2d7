"""What every trainer does the same way before its loop: read and tokenize the data, hold out an eval split,
count optimizer steps, build the engine. Kept here once so the algorithm files stay about their algorithm.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate.utils import set_seed
from torch import nn

from rlhf.config import DataConfig, TrainConfig, to_dict
from rlhf.data import DataError, TokenizeReport, load_records, tokenize_records
from rlhf.errors import UserError
from rlhf.runtime.engine import Engine

logger = logging.getLogger(__name__)


@dataclass
class Splits:
    """Tokenized examples of the training and held-out splits, with what reading and tokenizing reported."""

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    report: dict[str, float] = field(default_factory=dict)


def _tokenized(
    records: list[Any], kind: str, tokenizer: Any, cfg: DataConfig, what: str, whole_turns: bool
) -> tuple[list[dict[str, Any]], TokenizeReport]:
    examples, report = tokenize_records(records, kind, tokenizer, cfg, whole_turns=whole_turns)
    for reason, count in report.dropped.items():
        logger.warning("%s: dropped %d row(s): %s", what, count, reason)
    if report.truncated_prompts or report.truncated_responses:
        logger.warning(
            "%s: truncated %d prompt(s) to data.max_prompt_length %d and %d response(s) to data.max_length %d",
            what,
            report.truncated_prompts,
            cfg.max_prompt_length,
            report.truncated_responses,
            cfg.max_length,
        )
    return examples, report


def _records(path: str, kind: str, skip_bad_rows: bool) -> tuple[list[Any], Any]:
    """`load_records`; a bad row's error also says how to see every bad row of the file and how to skip them."""
    try:
        return load_records(path, kind, skip_bad_rows=skip_bad_rows)
    except DataError as e:
        if e.row is None:  # the whole file is at fault: no rows to list or skip
            raise
        hint = f"`rlhf data check {path} --kind {kind}` lists every bad row; data.skip_bad_rows=true skips them"
        raise DataError(e.file, e.row, e.field, f"{e.reason} ({hint})", e.category) from None


def load_splits(cfg: DataConfig, kind: str, tokenizer: Any, *, seed: int, whole_turns: bool = False) -> Splits:
    """Read `cfg.train` (and `cfg.eval`, or hold out `cfg.eval_fraction` of train by a seeded shuffle), tokenize
    (`whole_turns`: conversations as the chat template writes them, for reward models)."""
    if not cfg.train:
        raise UserError("data.train: no training data given")
    records, skips = _records(cfg.train, kind, cfg.skip_bad_rows)
    for line in skips.lines():
        logger.warning("%s: %s", cfg.train, line)
    eval_records: list[Any] = []
    if cfg.eval:
        eval_records, eval_skips = _records(cfg.eval, kind, cfg.skip_bad_rows)
        for line in eval_skips.lines():
            logger.warning("%s: %s", cfg.eval, line)
    elif cfg.eval_fraction > 0:
        order = list(range(len(records)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, round(cfg.eval_fraction * len(records)))
        held = set(order[:n_eval])
        eval_records = [r for i, r in enumerate(records) if i in held]
        records = [r for i, r in enumerate(records) if i not in held]
    train, train_report = _tokenized(records, kind, tokenizer, cfg, cfg.train, whole_turns)
    held_out, _ = _tokenized(eval_records, kind, tokenizer, cfg, cfg.eval or f"{cfg.train} (held out)", whole_turns)
    if not train:
        raise UserError(f"{cfg.train}: no usable training rows after validation and tokenization")
    report = {
        "data/train_rows": float(len(train)),
        "data/eval_rows": float(len(held_out)),
        "data/skipped_rows": float(skips.total),
        "data/dropped_rows": float(sum(train_report.dropped.values())),
        "data/truncated_prompts": float(train_report.truncated_prompts),
        "data/truncated_responses": float(train_report.truncated_responses),
    }
    return Splits(train, held_out, report)


def count_steps(train: TrainConfig, num_examples: int) -> int:
    """Optimizer steps of the run: `max_steps`, or whole batches over `epochs` passes (the last partial one dropped)."""
    if num_examples < train.batch_size:
        raise UserError(
            f"only {num_examples} training examples for a batch of {train.batch_size}: lower train.batch_size"
        )
    return train.max_steps or train.epochs * (num_examples // train.batch_size)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch before models are built: LoRA adapters and fresh heads are initialised
    randomly before the engine seeds again, and identical runs must start from identical weights."""
    set_seed(seed)


def eval_due(step: int, total: int, every: int) -> bool:
    """Evaluate every `every` steps (0: never in between) and always after the last step."""
    return step == total or (every > 0 and step % every == 0)


def make_engine(model: nn.Module, cfg: Any, total_steps: int, *, data_report: dict[str, float] | None = None) -> Engine:
    """The engine of a run, from the sections every algorithm config has (output_dir, seed, optim, schedule,
    train, logging, checkpoint); the resolved config goes to the run directory's config.yaml, and `data_report`
    (`Splits.report`: the `data/*` counts) onto the run's first metrics line."""
    return Engine(
        model,
        run_dir=Path(cfg.output_dir),
        seed=cfg.seed,
        optim=cfg.optim,
        schedule=cfg.schedule,
        train=cfg.train,
        logging=cfg.logging,
        checkpoint=cfg.checkpoint,
        total_steps=total_steps,
        config_dict=to_dict(cfg),
        data_report=data_report,
    )
