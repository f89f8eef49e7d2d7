"""Supervised fine-tuning (SFT): maximum likelihood of the demonstrations' responses.

    rlhf train sft --config configs/sft.yaml

The loss is the token-mean cross-entropy over response tokens only (prompt tokens are labelled -100 by the
data layer and never carry loss): the engine counts one unit per response token, so a step's loss is
(sum of token NLLs over the global batch) / (response tokens in it), however the batch is split into
micro-batches and processes. With `data.packing`, several examples share one row; each restarts its
`position_ids` at 0 and the forward passes no attention mask, so `transformers` (v5) finds the example
boundaries from the positions and no token attends across them (see `model_inputs`). Every
`train.eval_every` steps and at the end, the held-out split gives `eval/loss` (token-mean NLL) and
`eval/perplexity`. The run directory's `final/` is a `save_pretrained` checkpoint with the tokenizer,
loadable by `AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rlhf.config import (
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
    check,
)
from rlhf.data import IGNORE_INDEX, collate_sft, longest_first, pack_sft, to_device
from rlhf.errors import ConfigError
from rlhf.losses.sft import sft_loss
from rlhf.models import padding_free
from rlhf.models.forward import mixes_by_attention_alone
from rlhf.models.loading import apply_lora, load_causal_lm, load_model_tokenizer
from rlhf.models.padding_free import LAYOUT_KWARG, flat_inputs
from rlhf.models.unwrap import base_model
from rlhf.progress import progress
from rlhf.runtime.data_order import DataOrder
from rlhf.runtime.engine import Engine
from rlhf.runtime.finish import save_final
from rlhf.runtime.setup import count_steps, eval_due, load_splits, make_engine, seed_everything

logger = logging.getLogger(__name__)


@dataclass
class Config:
    output_dir: str = "runs/sft"
    """Run directory: config.yaml, metrics.jsonl, checkpoints/ and the final model in final/."""
    seed: int = 0
    """Seed of the data order, the held-out split and every random draw of training."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The causal LM to fine-tune."""
    data: DataConfig = field(default_factory=DataConfig)
    """SFT data: `text`, `prompt` + `completion`, or `messages` rows; `packing` packs several per row."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Batches (with packing: packed rows), steps, precision and the evaluation interval."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics logging and the progress bar."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Resumable checkpoints."""

    def validate(self) -> None:
        check(bool(self.output_dir), "output_dir", "must not be empty")


# ---------------------------------------------------------------------------------------------- batches


def make_batch(
    examples: Sequence[dict[str, Any]], pad_id: int, *, flat: bool = False, round_to: int = 1
) -> dict[str, Any]:
    """One micro-batch, with where the loss is worked out here on the CPU so the step needs no host sync.

    Padded (default): `collate_sft` plus `logits_to_keep` (int): position p predicts token p + 1, so only the
    positions from the first one whose next token carries a label (in any row) need the LM head; for prompt +
    completion data that skips most of the prompt, most of the head's cost with a large vocabulary.
    `label_positions` (N,): the flat indices, into those K-1 predicting positions of every row, of the N
    labelled tokens; `targets` (N,): their ids.

    `flat` (padding-free, see `rlhf.models.padding_free`): every example (for packed rows, every example inside
    them) back to back in one row: `input_ids` (1, T), `padding_free.flat_inputs`, and `logits_to_keep`
    (N,) the positions whose next token (in the same example) carries a label, so the LM head sees only those;
    `targets` (N,) as above, in the same order. `round_to`: the row ends with pad ids up to a multiple of it
    (`padding_free.row_multiple`: half-precision matmuls on the CPU); no loss reads them.
    """
    if flat:
        return _flat_batch(examples, pad_id, round_to)
    batch: dict[str, Any] = collate_sft(examples, pad_id)
    length = batch["input_ids"].shape[1]
    predicted = (batch["labels"][:, 1:] != IGNORE_INDEX).any(0)  # (L-1,) positions whose prediction counts
    first = int(predicted.nonzero()[0, 0]) if bool(predicted.any()) else 0
    keep = length - first  # >= 2: positions first .. L-1 (the last one predicts nothing)
    shifted = batch["labels"][:, length - keep + 1 :]  # (B, K-1): the tokens positions first .. L-2 predict
    batch["logits_to_keep"] = keep
    batch["label_positions"] = (shifted != IGNORE_INDEX).flatten().nonzero().squeeze(1)  # (N,)
    batch["targets"] = shifted.flatten()[batch["label_positions"]]  # (N,)
    return batch


def _flat_batch(examples: Sequence[dict[str, Any]], pad_id: int, round_to: int) -> dict[str, Any]:
    lengths = [n for ex in examples for n in ex.get("seq_lens", [len(ex["input_ids"])])]
    next_label = torch.tensor([t for ex in examples for t in ex["labels"]]).roll(-1)  # (T,) label of t + 1
    next_label[torch.tensor(lengths).cumsum(0) - 1] = IGNORE_INDEX  # an example's last token predicts nothing
    positions = (next_label != IGNORE_INDEX).nonzero().squeeze(1)  # (N,)
    ids = [t for ex in examples for t in ex["input_ids"]]
    return {
        "input_ids": torch.tensor(ids + [pad_id] * padding_free.filler_length(len(ids), round_to))[None],  # (1, T)
        **flat_inputs(lengths, round_to),  # position_ids, attention_mask (1, T) and the layout
        "logits_to_keep": positions,
        "targets": next_label[positions],  # (N,)
    }


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of the forward pass.

    Padding-free batches pass `position_ids`, an all-ones mask and their `flat_layout` (the attention keeps
    examples apart; see `padding_free.flat_inputs`).
    Unpacked padded rows are right padded, so the attention mask changes nothing a loss sees (no real token
    attends to a later position) but is passed for models that use it otherwise. Packed padded rows pass
    `position_ids` and NO attention mask (with `use_cache=False`): `transformers` then reads each example's
    span from the restarting positions and masks attention across examples (sdpa and eager build a
    block-diagonal causal mask; flash-attention uses the variable-length kernel), so packing changes the
    batching, not the loss.
    """
    if LAYOUT_KWARG in batch:
        keys: tuple[str, ...] = ("position_ids", "attention_mask", LAYOUT_KWARG)  # `padding_free.flat_inputs`
    elif "position_ids" in batch:
        keys = ("position_ids",)  # packed rows: no mask
    else:
        keys = ("attention_mask",)
    kwargs = {"input_ids": batch["input_ids"], "logits_to_keep": batch["logits_to_keep"], "use_cache": False}
    return kwargs | {k: batch[k] for k in keys}


def token_nll(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """NLL of every labelled token of the batch, flattened: (N,).

    Only the labelled positions go through `sft_loss`, as one (1, N, V) slab: the log-softmax is taken over
    response tokens only, in one call rather than one per row (on small batches mostly per-op overhead).
    """
    logits = model(**model_inputs(batch)).logits
    if LAYOUT_KWARG in batch:
        picked = logits[0]  # (N, V): logits_to_keep already picked the labelled positions
    else:  # (B, K, V): positions L-K .. L-1, the last of which predicts nothing
        picked = logits[:, :-1].flatten(0, 1).index_select(0, batch["label_positions"])  # (N, V)
    nll, _ = sft_loss(picked[None], batch["targets"][None])  # (1, N)
    return nll[0]


def loss_fn(model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Engine loss: summed NLL of the response tokens, unit = one response token."""
    nll = token_nll(model, batch)
    return nll.sum(), nll.shape[0], {}


# ---------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(engine: Engine, examples: Sequence[dict[str, Any]], pad_id: int, *, flat: bool) -> dict[str, float]:
    """Token-mean NLL and perplexity on held-out examples (never packed), each process scoring its share; padded
    batches cut from it longest first (`longest_first`), as the sums do not depend on the order."""
    model = engine.unwrapped_model  # no DDP in evaluation: processes run different numbers of forwards
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=engine.device)  # [nll sum, tokens]
    mine = list(examples)[engine.rank :: engine.world_size]
    if not flat:
        mine = [mine[i] for i in longest_first(mine)]
    size = engine.train_cfg.micro_batch_size
    for start in progress(range(0, len(mine), size), "eval", show=engine.shows_progress):
        batch = make_batch(mine[start : start + size], pad_id, flat=flat)
        nll = token_nll(model, to_device(batch, engine.device))
        sums[0] += nll.sum().double()
        sums[1] += nll.shape[0]
    if engine.world_size > 1:
        sums = engine.accelerator.reduce(sums, reduction="sum")
    model.train(was_training)
    loss = (sums[0] / sums[1].clamp(min=1)).item()
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 700.0))}


# ---------------------------------------------------------------------------------------------- the loop


def train(cfg: Config) -> Path:
    """Fine-tune `cfg.model` on `cfg.data`; return the run directory (its `final/` holds the model)."""
    seed_everything(cfg.seed)
    out = Path(cfg.output_dir)
    tokenizer = load_model_tokenizer(cfg.model)
    splits = load_splits(cfg.data, "sft", tokenizer, seed=cfg.seed)
    examples = pack_sft(splits.train, cfg.data.max_length) if cfg.data.packing else splits.train
    if cfg.data.packing:
        n_rows, n_examples = len(examples), len(splits.train)
        logger.info("packed %d examples into %d rows of <= %d tokens", n_examples, n_rows, cfg.data.max_length)
    if not splits.eval:
        logger.warning("no held-out data (set data.eval or data.eval_fraction): eval/* metrics are not logged")
    total = count_steps(cfg.train, len(examples))
    model = apply_lora(load_causal_lm(cfg.model, trainable=True), cfg.model.lora)
    if cfg.data.packing and not mixes_by_attention_alone(model):
        raise ConfigError(
            f"{type(base_model(model)).__name__} carries state along the sequence in layers other than attention, "
            "so packed examples would see each other: set it to false",
            key="data.packing",
        )
    flat = cfg.data.padding_free and padding_free.enabled(model)
    if cfg.data.padding_free and not flat:
        logger.info("padding-free batches need a model that runs them (see padding_free.enable): using padded batches")
    engine = make_engine(model, cfg, total, data_report=splits.report)
    round_to = padding_free.row_multiple(model, engine.device) if flat else 1
    with engine:
        group = cfg.data.group_by_length
        order = DataOrder.of_examples(examples, cfg.train.batch_size, seed=cfg.seed, group_by_length=group)
        engine.register_state("data_order", order)
        engine.resume()
        pad_id = tokenizer.pad_token_id
        while engine.step < total:
            if engine.should_stop():
                engine.interrupt()
            micro_batches = [
                to_device(make_batch([examples[i] for i in idx], pad_id, flat=flat, round_to=round_to), engine.device)
                for idx in engine.local_indices(order.next_batch(), None if flat else order.lengths)
            ]
            metrics = engine.train_step(micro_batches, loss_fn) or {}
            if splits.eval and eval_due(engine.step, total, cfg.train.eval_every):
                metrics |= evaluate(engine, splits.eval, pad_id, flat=flat)
            if metrics:
                engine.log(metrics | {"data/epoch": float(order.epoch)})
            engine.maybe_save_checkpoint()
        save_final(engine, engine.unwrapped_model, tokenizer, base_path=cfg.model.path)
    return out
