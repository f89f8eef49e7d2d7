"""Reward model (RM): a scalar head on a causal LM, trained on preference pairs with the Bradley-Terry loss.

    rlhf train rm --config configs/rm.yaml

The model is a one-label `AutoModelForSequenceClassification` built from any causal-LM checkpoint (the
backbone is kept, the `score` head is new). A sequence's reward is the head's output at its last real
token, found from the attention mask (so it is right whatever the padding side, and an EOS that doubles as
the pad token is still read). Chosen and rejected responses of a batch go through one forward. By default
(`share_prompt`) each pair is ONE row, [prompt | chosen | rejected], whose attention mask keeps the rejected
tokens from seeing the chosen ones and whose positions restart the rejected response where the prompt
ends: every token sees exactly what it would in its own row, so the scores are the same, but the prompt
is computed once per pair instead of twice (on the built-in task, 35% fewer tokens). With `data.padding_free`
(the default, for models on our attention) those rows are laid back to back in one flat row, so the linear
layers see no padding either (`collate_shared_prompt_flat`; 18% of the built-in task's batch was pads).
Otherwise the responses are stacked as rows 0..B-1 (chosen) and B..2B-1 (rejected). Per pair,

    loss = -log sigmoid(r_c - r_r - margin) + center_coef * (r_c + r_r)^2

with the margin only when `use_margin` (the data's `margin` field; Llama 2) and the centering term of
Eisenstein et al. 2023 (formulas in `rlhf.losses.reward`). One unit per pair. Evaluation on the held-out
pairs logs accuracy, mean margin and expected calibration error and writes the reliability bins to
`calibration.json`. `final/` loads with `AutoModelForSequenceClassification.from_pretrained` (architectures without
such a class in `transformers`: `rlhf.models.loading.register_scalar_class`).
"""

from __future__ import annotations

import functools
import json
import logging
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
from rlhf.data import collate_pairs, longest_first, pad_sequences, to_device
from rlhf.data.collate import add_margins, tree_rows
from rlhf.errors import UserError
from rlhf.evaluation.calibration import preference_calibration
from rlhf.losses.reward import bradley_terry_loss, reward_centering_penalty
from rlhf.models import padding_free
from rlhf.models.forward import backbone_and_head, mixes_by_attention_alone, sequence_scores
from rlhf.models.loading import apply_lora, disable_dropout, load_model_tokenizer, load_scalar_model
from rlhf.progress import progress
from rlhf.runtime.data_order import DataOrder
from rlhf.runtime.engine import Engine
from rlhf.runtime.finish import save_final
from rlhf.runtime.run_dir import CALIBRATION_FILE, atomic_write_text
from rlhf.runtime.setup import count_steps, eval_due, load_splits, make_engine, seed_everything

logger = logging.getLogger(__name__)

CALIBRATION_BINS = 10
PAIR = ("chosen_ids", "rejected_ids")


@dataclass
class Config:
    output_dir: str = "runs/rm"
    """Run directory: config.yaml, metrics.jsonl, calibration.json, checkpoints/ and the final model in final/."""
    seed: int = 0
    """Seed of the data order, the held-out split, the new score head and every random draw of training."""
    use_margin: bool = False
    """Subtract each pair's `margin` field from the reward gap in the loss (pairs without one get 0)."""
    center_coef: float = 0.0
    """Weight of the reward-centering term (r_c + r_r)^2 (Eisenstein et al. 2023 use 0.01); 0 turns it off."""
    disable_dropout: bool = True
    """Turn dropout off, so a pair's two rewards come from the same network (as TRL's RewardTrainer does)."""
    share_prompt: bool = True
    """One row per pair holding the prompt once, with a tree attention mask (same scores, fewer tokens). Needs
    eager or sdpa attention; with another implementation (flash-attention) the two-row layout is used."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The starting checkpoint: a causal LM (a scalar head is added) or a reward model."""
    data: DataConfig = field(default_factory=DataConfig)
    """Preference data: `prompt` + `chosen` + `rejected` rows, optionally with `margin`."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Batches (in pairs), steps, precision and the evaluation interval."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics logging and the progress bar."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Resumable checkpoints."""

    def validate(self) -> None:
        check(bool(self.output_dir), "output_dir", "must not be empty")
        check(self.center_coef >= 0, "center_coef", f"must be >= 0, got {self.center_coef}")
        check(not self.data.packing, "data.packing", "packing is for SFT only; a reward model scores whole sequences")


class SequenceScorer(nn.Module):
    """A sequence-classification model whose forward returns one score per sequence, at its last real token.

    The engine prepares (and under DDP wraps) this module, so the loss calls the wrapper's forward and
    gradient synchronisation sees the whole computation; `.model` is the Hugging Face model to save.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor | None = None,
        score_index: Tensor | None = None,
        flat_layout: padding_free.FlatLayout | None = None,
    ) -> Tensor:
        """Scores (N,) of a padded batch (2-D `attention_mask`: rows are sequences, either padding side); or,
        with a 4-D boolean `attention_mask` (B, 1, L, L), `position_ids` and `score_index` (B, K), the K
        scores of each packed row read at those columns, returned column-major: (K * B,); or, with `flat_layout`
        (`collate_shared_prompt_flat`), those rows back to back in one (1, T) row, `score_index` into it."""
        backbone, head = backbone_and_head(self.model)
        if flat_layout is not None:  # (1, T) rows back to back; score_index (B, K) indexes the flat row
            hidden = backbone(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
                **{padding_free.LAYOUT_KWARG: flat_layout},
            ).last_hidden_state[0]  # (T, H)
            return head(hidden[score_index.T.reshape(-1)]).squeeze(-1).float()  # (K * B,)
        if attention_mask.dim() == 2:
            return sequence_scores(self.model, input_ids, attention_mask)  # (N,)
        dtype = next(head.parameters()).dtype
        additive = torch.zeros(attention_mask.shape, dtype=dtype, device=input_ids.device)
        additive.masked_fill_(~attention_mask, torch.finfo(dtype).min)  # eager adds it; sdpa takes it as is
        hidden = backbone(
            input_ids=input_ids, attention_mask=additive, position_ids=position_ids, use_cache=False
        ).last_hidden_state  # (B, L, H)
        scores = head(hidden).squeeze(-1).float()  # (B, L)
        return scores.gather(1, score_index).T.reshape(-1)  # (K * B,): column 0 of every row, then column 1


def supports_shared_prompt(model: nn.Module) -> bool:
    """Whether the attention implementation takes a custom 4-D mask (eager, sdpa and ours on sdpa do; flash-attention
    not) and the mask is all that keeps the rows' parts apart (`mixes_by_attention_alone`)."""
    config = getattr(model, "config", None)
    attention = getattr(config, "_attn_implementation", None) in ("eager", "sdpa", padding_free.ATTENTION)
    return attention and mixes_by_attention_alone(model)


def collate_shared_prompt(examples: Sequence[dict[str, Any]], pad_id: int) -> dict[str, Tensor]:
    """Each pair as one right-padded row [prompt | chosen | rejected], for `SequenceScorer`.

    With P, C, R the three lengths and n = P + C + R: `position_ids` run 0..P+C-1 and then P..P+R-1 again
    (the rejected response starts where the prompt ends, as in its own row); `attention_mask` (B, 1, L, L)
    bool lets query q see key k when k <= q, except that rejected tokens (P+C <= q < n) do not see chosen
    ones (P <= k < P+C); a pad column sees only itself (no all-masked row, which would give NaN).
    `score_index` (B, 2) holds the columns where each response's score is read: as `models.forward.score_index`
    reads prompt + response alone (its rightmost non-pad token: the last one, P+C-1 and n-1, unless it is a
    pad id, as EOS is when pad == eos). `margin` as in `collate_pairs`.
    """
    lengths, rows, positions = tree_rows(examples, PAIR)
    batch = {
        "input_ids": pad_sequences(rows, pad_id),  # (B, L)
        "position_ids": pad_sequences(positions, 0),  # (B, L)
        "attention_mask": padding_free.tree_mask(torch.tensor(lengths), max(len(r) for r in rows)),  # (B, 1, L, L)
        "score_index": torch.tensor([_score_columns(ex, pad_id) for ex in examples]),  # (B, 2)
    }
    return add_margins(batch, examples)


def collate_shared_prompt_flat(examples: Sequence[dict[str, Any]], pad_id: int, round_to: int = 1) -> dict[str, Any]:
    """`collate_shared_prompt`'s rows without padding: every [prompt | chosen | rejected] back to back in one row
    `input_ids` (1, T), with the same `position_ids` (1, T), an all-ones `attention_mask` (1, T), the
    `flat_layout` whose blocks carry each pair's tree mask (`padding_free.flat_layout`), and `score_index` (B, 2)
    as flat indices. The linear layers then run on real tokens only; attention pads within its blocks.
    `round_to`: the row ends with a filler of pad ids up to a multiple of it (`padding_free.row_multiple`)."""
    lengths, rows, _ = tree_rows(examples, PAIR)
    sizes = torch.tensor(lengths).sum(1)  # (B,)
    starts = torch.cumsum(sizes, 0) - sizes
    columns = torch.tensor([_score_columns(ex, pad_id) for ex in examples])  # (B, 2) within each pair's row
    batch = {
        **padding_free.flat_tree_inputs(lengths, rows, pad_id, round_to),
        "score_index": starts[:, None] + columns,  # (B, 2)
    }
    return add_margins(batch, examples)


def _score_columns(example: dict[str, Any], pad_id: int) -> tuple[int, int]:
    """The columns of [prompt | chosen | rejected] where each response's score is read (`collate_shared_prompt`)."""
    prompt, chosen, rejected = example["prompt_ids"], example["chosen_ids"], example["rejected_ids"]

    def last_real(seq: list[int]) -> int:
        return next((i for i in range(len(seq) - 1, -1, -1) if seq[i] != pad_id), len(seq) - 1)

    c, r = last_real([*prompt, *chosen]), last_real([*prompt, *rejected])
    return c, r if r < len(prompt) else r + len(chosen)  # a rejected column past the prompt follows the chosen


def make_collate(share_prompt: bool, flat: bool = False, round_to: int = 1) -> Any:
    """The batch layout: one row per pair (`collate_shared_prompt`; with `flat`, those rows back to back:
    `collate_shared_prompt_flat`, filled up to a multiple of `round_to`) or two (`collate_pairs`)."""
    if share_prompt and flat:
        return functools.partial(collate_shared_prompt_flat, round_to=round_to)
    return collate_shared_prompt if share_prompt else collate_pairs


def pair_rewards(model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """Rewards of the chosen and rejected responses of either layout, in one forward: (B,), (B,)."""
    extra = {k: batch[k] for k in ("position_ids", "score_index", padding_free.LAYOUT_KWARG) if k in batch}
    scores = model(batch["input_ids"], batch["attention_mask"], **extra)  # (2B,): chosen then rejected
    chosen, rejected = scores.chunk(2)
    return chosen, rejected


def pair_losses(
    chosen: Tensor, rejected: Tensor, margin: Tensor | None, *, center_coef: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair loss (B,) = Bradley-Terry (with margin if given) + center_coef * centering, and per-pair metrics."""
    bt, bt_metrics = bradley_terry_loss(chosen, rejected, margin=margin)
    centering = reward_centering_penalty(chosen, rejected)
    losses = bt + center_coef * centering if center_coef else bt
    metrics = {
        "loss/bradley_terry": bt.detach(),
        "loss/centering": centering.detach(),
        "rewards/chosen": chosen.detach().float(),
        "rewards/rejected": rejected.detach().float(),
        "rewards/accuracy": bt_metrics["accuracy"],
        "rewards/margin": bt_metrics["margin"],
    }
    return losses, metrics


def make_loss_fn(use_margin: bool, center_coef: float) -> Any:
    """The engine's loss_fn: summed per-pair loss, one unit per pair, metrics summed over pairs."""

    def loss_fn(model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, int, dict[str, Tensor]]:
        chosen, rejected = pair_rewards(model, batch)
        margin = batch.get("margin") if use_margin else None
        losses, metrics = pair_losses(chosen, rejected, margin, center_coef=center_coef)
        return losses.sum(), losses.shape[0], {k: v.sum() for k, v in metrics.items()}

    return loss_fn


# ---------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def score_pairs(
    model: nn.Module,
    examples: Sequence[dict[str, Any]],
    pad_id: int,
    batch_size: int,
    device: torch.device,
    *,
    share_prompt: bool = False,
    flat: bool = False,
    show_progress: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Chosen and rejected rewards and margins (0 where missing) of `examples`, in order, on the CPU: (B,) each.

    Padded batches are cut from the examples longest first (`longest_first`), flat ones in order."""
    was_training = model.training
    model.eval()
    order = list(range(len(examples))) if flat else longest_first(examples)
    out = torch.zeros(3, len(examples))  # [chosen, rejected, margin]
    for start in progress(range(0, len(order), batch_size), "eval", show=show_progress):
        idx = order[start : start + batch_size]
        batch = to_device(make_collate(share_prompt, flat)([examples[i] for i in idx], pad_id), device)
        chosen, rejected = pair_rewards(model, batch)
        margin = batch.get("margin", torch.zeros(len(idx), device=device))
        out[:, idx] = torch.stack([chosen.float(), rejected.float(), margin.float()]).cpu()
    model.train(was_training)
    return out[0], out[1], out[2]


def evaluate(
    engine: Engine,
    examples: Sequence[dict[str, Any]],
    pad_id: int,
    *,
    use_margin: bool,
    share_prompt: bool,
    flat: bool = False,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Held-out `eval/*` metrics and the calibration report; every process scores its share."""
    mine = list(examples)[engine.rank :: engine.world_size]
    model = engine.unwrapped_model  # no DDP in evaluation: processes run different numbers of forwards
    size = engine.train_cfg.micro_batch_size
    kw = {"share_prompt": share_prompt, "flat": flat, "show_progress": engine.shows_progress}
    scored = score_pairs(model, mine, pad_id, size, engine.device, **kw)
    chosen, rejected, margin = (torch.cat(x) for x in zip(*engine.gather(scored), strict=True))
    bt, metrics = bradley_terry_loss(chosen, rejected, margin=margin if use_margin else None)
    calibration = preference_calibration(chosen, rejected, n_bins=CALIBRATION_BINS)
    values = {
        "eval/loss": bt.mean().item(),
        "eval/accuracy": metrics["accuracy"].mean().item(),
        "eval/margin": metrics["margin"].mean().item(),
        "eval/ece": calibration["ece"],
    }
    return values, calibration


def write_calibration(run_dir: Path, step: int, calibration: dict[str, Any]) -> None:
    """`calibration.json`: the reliability bins of the latest evaluation (rewritten at each one)."""
    atomic_write_text(run_dir / CALIBRATION_FILE, json.dumps({"step": step, **calibration}, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------- the loop


def train(cfg: Config) -> Path:
    """Train a reward model on `cfg.data`; return the run directory (its `final/` holds the model)."""
    seed_everything(cfg.seed)
    out = Path(cfg.output_dir)
    tokenizer = load_model_tokenizer(cfg.model)
    splits = load_splits(cfg.data, "preference", tokenizer, seed=cfg.seed, whole_turns=True)
    if cfg.use_margin and all(ex.get("margin") is None for ex in splits.train):
        raise UserError(f"use_margin is set but no training row of {cfg.data.train} has a `margin` field")
    if not splits.eval:
        logger.warning("no held-out data (set data.eval or data.eval_fraction): eval/* metrics are not logged")
    total = count_steps(cfg.train, len(splits.train))
    torch.manual_seed(cfg.seed)  # the new score head's initialisation
    scalar_model = load_scalar_model(cfg.model, trainable=True)
    if cfg.disable_dropout:
        disable_dropout(scalar_model)
    scalar_model = apply_lora(scalar_model, cfg.model.lora, task_type="SEQ_CLS")
    share_prompt = cfg.share_prompt and supports_shared_prompt(scalar_model)
    if cfg.share_prompt and not share_prompt:
        logger.warning(
            "share_prompt: this model's attention takes no 4-D mask, or layers other than attention carry state "
            "along the row; scoring two rows per pair"
        )
    flat = share_prompt and cfg.data.padding_free and padding_free.enabled(scalar_model)
    engine = make_engine(SequenceScorer(scalar_model), cfg, total, data_report=splits.report)
    round_to = padding_free.row_multiple(scalar_model, engine.device) if flat else 1
    collate = make_collate(share_prompt, flat, round_to)
    with engine:
        group = cfg.data.group_by_length
        order = DataOrder.of_examples(splits.train, cfg.train.batch_size, seed=cfg.seed, group_by_length=group)
        engine.register_state("data_order", order)
        engine.resume()
        pad_id = tokenizer.pad_token_id
        loss_fn = make_loss_fn(cfg.use_margin, cfg.center_coef)
        while engine.step < total:
            if engine.should_stop():
                engine.interrupt()
            micro_batches = [
                to_device(collate([splits.train[i] for i in idx], pad_id), engine.device)
                for idx in engine.local_indices(order.next_batch(), None if flat else order.lengths)
            ]
            metrics = engine.train_step(micro_batches, loss_fn) or {}
            if splits.eval and eval_due(engine.step, total, cfg.train.eval_every):
                values, calibration = evaluate(
                    engine, splits.eval, pad_id, use_margin=cfg.use_margin, share_prompt=share_prompt, flat=flat
                )
                metrics |= values
                if engine.is_main:
                    write_calibration(out, engine.step, calibration)
            if metrics:
                engine.log(metrics | {"data/epoch": float(order.epoch)})
            engine.maybe_save_checkpoint()
        save_final(engine, engine.unwrapped_model.model, tokenizer, base_path=cfg.model.path)
    return out
