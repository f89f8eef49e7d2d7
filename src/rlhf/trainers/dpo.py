"""Direct preference optimisation on preference pairs: the DPO family (sigmoid, ipo, hinge, robust), SimPO, ORPO.

    rlhf train dpo --config configs/dpo.yaml [--loss_type simpo] [--precompute_ref]

Each step: the global batch of pairs is split into micro-batches; a micro-batch's chosen and rejected
responses go through the policy together, as 2B rows of ONE forward, giving the summed and the
length-averaged response log-probs; the loss is the math-core function of `loss_type`
(`rlhf.losses.preference`), per pair; the engine averages it over the global batch. With `share_prompt`
(the default) the B prompts are encoded once instead of twice inside full [chosen; rejected] rows: for short
answers to long prompts that is most of the compute saved. With `data.padding_free` (the default, for models
on our attention) each pair is one tree sequence [prompt | chosen | rejected], the pairs back to back in one row
with no padding (`rlhf.models.sequence_logps.collate_flat`); else the prompts run in a forward of their own whose
KV cache both responses continue from (padded; with gradient checkpointing, which keeps no cache, full rows).

The reference (DPO family only; SimPO and ORPO are reference-free and never load one) is a frozen copy of
the initial policy, or `ref.path`, or with LoRA the base model under the adapters. `precompute_ref` scores
every example once before training and caches the numbers beside the run (`ref_logps/<key>.safetensors`,
see `rlhf.models.reference`), after which the reference model is not kept in memory at all.

Dropout is switched off in the policy and the reference (as TRL does): the log-ratios compare two
deterministic scorings of the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

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
from rlhf.data import collate_responses, longest_first, to_device
from rlhf.data.collate import Collate
from rlhf.losses.preference import PREFERENCE_LOSSES, dpo_loss, orpo_odds_ratio_loss, simpo_loss
from rlhf.models import padding_free
from rlhf.models.forward import mixes_by_attention_alone
from rlhf.models.loading import (
    apply_lora,
    disable_dropout,
    frozen_copy,
    load_causal_lm,
    load_model_tokenizer,
)
from rlhf.models.reference import ExampleLayout, Reference, cached_reference_tables, reference_cache_key
from rlhf.models.sequence_logps import ResponseLogps, collate_flat, response_logps
from rlhf.progress import progress
from rlhf.runtime.data_order import DataOrder
from rlhf.runtime.engine import Engine
from rlhf.runtime.finish import save_final
from rlhf.runtime.setup import count_steps, eval_due, load_splits, make_engine, seed_everything

RESPONSES = ("chosen_ids", "rejected_ids")
LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")
DEFAULT_BETA = {"simpo": 2.0}  # SimPO's beta scales a per-token average; 0.1 for everything else


@dataclass
class Config:
    output_dir: str = "runs/dpo"
    """Run directory: config.yaml, metrics.jsonl, checkpoints/, ref_logps/, final/."""
    seed: int = 0
    """Seed of the data order, the held-out split and every RNG."""
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "simpo", "orpo"] = "sigmoid"
    """sigmoid (DPO; cDPO with label_smoothing), ipo, hinge (SLiC), robust (rDPO), simpo or orpo (reference-free)."""
    beta: float | None = None
    """Inverse temperature of the implicit reward (IPO: its tau). Unset: 0.1, or 2.0 for simpo. Unused by orpo."""
    label_smoothing: float = 0.0
    """Probability that a preference label is flipped: cDPO for sigmoid (<= 0.5), rDPO for robust (< 0.5)."""
    ipo_average: bool = False
    """IPO on per-token average log-probs (as TRL does) instead of the paper's summed log-probs."""
    simpo_gamma: float = 1.0
    """SimPO target reward margin gamma (the paper tunes gamma / beta around 0.5)."""
    orpo_lambda: float = 0.1
    """ORPO weight lambda of the odds-ratio term added to the SFT loss (the paper's and TRL's default 0.1)."""
    precompute_ref: bool = False
    """Score the data with the reference once before training and cache it in run_dir/ref_logps/ (safetensors);
    several processes each score a share."""
    share_prompt: bool = True
    """Run each prompt through the model once for both responses, not twice: padding-free, one tree sequence
    [prompt | chosen | rejected] per pair (`data.padding_free`); else a KV cache, off with gradient
    checkpointing, which cannot keep one."""
    score_batch_size: int = 0
    """Examples per no-grad forward when precomputing reference log-probs and evaluating; 0: 4 x micro_batch_size."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy to train (usually an SFT checkpoint)."""
    ref: ModelConfig | None = None
    """A separate reference model; unset: a frozen copy of the initial policy (with LoRA: the base model)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Preference pairs: prompt + chosen + rejected."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Batches (of pairs), steps, precision, evaluation interval."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """metrics.jsonl and trackers."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Resumable checkpoints."""

    def validate(self) -> None:
        check(self.beta is None or self.beta > 0, "beta", f"must be > 0, got {self.beta}")
        eps = self.label_smoothing
        allowed = {"sigmoid": 0 <= eps <= 0.5, "robust": 0 <= eps < 0.5}.get(self.loss_type, eps == 0)
        check(
            allowed,
            "label_smoothing",
            f"must be in [0, 0.5] for sigmoid, [0, 0.5) for robust, 0 for the others; got {eps} for {self.loss_type}",
        )
        check(self.simpo_gamma >= 0, "simpo_gamma", f"must be >= 0, got {self.simpo_gamma}")
        check(self.orpo_lambda >= 0, "orpo_lambda", f"must be >= 0, got {self.orpo_lambda}")
        check(self.score_batch_size >= 0, "score_batch_size", f"must be >= 0, got {self.score_batch_size}")
        check(
            not (self.ref is not None and self.loss_type in REFERENCE_FREE),
            "ref",
            f"{self.loss_type} is reference-free and loads no reference model; unset ref",
        )
        check(
            not (self.precompute_ref and self.loss_type in REFERENCE_FREE),
            "precompute_ref",
            f"{self.loss_type} has no reference model; unset precompute_ref",
        )

    @property
    def beta_value(self) -> float:
        """`beta`, or the method's default when unset."""
        return self.beta if self.beta is not None else DEFAULT_BETA.get(self.loss_type, 0.1)

    @property
    def reference_free(self) -> bool:
        return self.loss_type in REFERENCE_FREE

    @property
    def scoring_batch(self) -> int:
        return self.score_batch_size or 4 * self.train.micro_batch_size


# ---------------------------------------------------------------------------------------------- objectives
# Each maps the policy's log-probs of a batch of pairs (and the reference's, (B, 2) summed, where used) to
# per-pair losses (B,) and per-pair metrics (B,); the formulas are the math core's.

Objective = Callable[[Config, ResponseLogps, ResponseLogps, Tensor | None, Tensor], tuple[Tensor, dict[str, Tensor]]]


def dpo_objective(
    cfg: Config, chosen: ResponseLogps, rejected: ResponseLogps, ref: Tensor | None, sft_scale: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """`dpo_loss` on summed log-probs, or for IPO with `ipo_average` on per-token averages (ref sums / tokens)."""
    assert ref is not None
    pc, pr, rc, rr = chosen.sum, rejected.sum, ref[:, 0], ref[:, 1]
    if cfg.loss_type == "ipo" and cfg.ipo_average:
        pc, pr = chosen.avg, rejected.avg
        rc, rr = rc / chosen.tokens.clamp(min=1.0), rr / rejected.tokens.clamp(min=1.0)
    return dpo_loss(pc, pr, rc, rr, beta=cfg.beta_value, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing)


def simpo_objective(
    cfg: Config, chosen: ResponseLogps, rejected: ResponseLogps, ref: Tensor | None, sft_scale: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """`simpo_loss` on per-token average log-probs."""
    return simpo_loss(chosen.avg, rejected.avg, beta=cfg.beta_value, gamma=cfg.simpo_gamma)


def orpo_objective(
    cfg: Config, chosen: ResponseLogps, rejected: ResponseLogps, ref: Tensor | None, sft_scale: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """SFT NLL of the chosen response + lambda * `orpo_odds_ratio_loss` (Hong et al. 2024, eq. 6).

    The SFT term is a token mean over the chosen responses of the whole global batch, as a per-pair share:
    pair i carries -sum_t log p(chosen_i,t) * sft_scale with sft_scale = pairs / chosen tokens of the global
    batch, so the engine's mean over pairs is exactly sum NLL / tokens however the batch is split.
    The ORPO rewards are the log odds of the averaged likelihoods (what its loss compares).
    """
    or_losses, m = orpo_odds_ratio_loss(chosen.avg, rejected.avg)
    sft = -chosen.sum * sft_scale  # (B,)
    losses = sft + cfg.orpo_lambda * or_losses
    return losses, {
        "rewards/chosen": m["log_odds_chosen"],
        "rewards/rejected": m["log_odds_rejected"],
        "rewards/accuracy": m["accuracy"],
        "rewards/margin": m["log_odds_ratio"],
        "loss/sft": sft.detach(),
        "loss/or": or_losses.detach(),
    }


OBJECTIVES: dict[str, Objective] = {
    **{name: dpo_objective for name in PREFERENCE_LOSSES},
    "simpo": simpo_objective,
    "orpo": orpo_objective,
}


def pair_losses(cfg: Config, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
    """One forward of both responses (`response_logps`), then the objective: per-pair losses and metrics (B,)."""
    chosen, rejected = response_logps(model, batch).chunk()  # (B,) each
    losses, metrics = OBJECTIVES[cfg.loss_type](cfg, chosen, rejected, batch.get("ref_logps"), batch["sft_scale"])
    metrics = {**metrics, "logps/chosen": chosen.sum.detach(), "logps/rejected": rejected.sum.detach()}
    return losses, metrics


def loss_fn(cfg: Config, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, int, dict[str, Tensor]]:
    """The engine's loss_fn: sums over the micro-batch's pairs (the units)."""
    losses, metrics = pair_losses(cfg, model, batch)
    return losses.sum(), losses.shape[0], {k: v.sum() for k, v in metrics.items()}


# ---------------------------------------------------------------------------------------------- batches


def pair_collator(cfg: Config, pad_id: int, flat: bool = False, round_to: int = 1, kv_cache: bool = True) -> Collate:
    """Examples -> a batch of [chosen; rejected] rows (2B): with `flat` (padding-free, needs `share_prompt`) each
    pair as one tree sequence [prompt | chosen | rejected] (`collate_flat`, filled up to a multiple of
    `round_to`); else padded, the prompt shared through a KV cache (`share_prompt`, where the models allow it:
    `kv_cache`, see `mixes_by_attention_alone`) or repeated."""
    if flat:
        return partial(collate_flat, pad_id=pad_id, response_keys=RESPONSES, round_to=round_to)
    share = cfg.share_prompt and kv_cache and not cfg.model.gradient_checkpointing
    return partial(collate_responses, pad_id=pad_id, response_keys=RESPONSES, share_prompt=share)


def chosen_tokens(examples: Sequence[dict[str, Any]], idx: Sequence[int]) -> int:
    return sum(len(examples[i]["chosen_ids"]) for i in idx)


def make_batch(
    examples: Sequence[dict[str, Any]],
    idx: Sequence[int],
    *,
    split: str,
    collate: Collate,
    device: torch.device,
    reference: Reference | None,
    sft_scale: float,
) -> dict[str, Any]:
    """A micro-batch on the device with its reference log-probs (cached or scored now) and the ORPO SFT scale."""
    batch = to_device(collate([examples[i] for i in idx]), device)
    if reference is not None:
        batch["ref_logps"] = reference.logps(batch, split, idx, 2)  # (B, 2): [chosen, rejected]
    batch["sft_scale"] = torch.tensor(sft_scale, device=device)
    return batch


@torch.no_grad()
def evaluate(
    cfg: Config,
    engine: Engine,
    examples: Sequence[dict[str, Any]],
    reference: Reference | None,
    *,
    collate: Collate,
    flat: bool,
) -> dict[str, float]:
    """The loss and every metric as means over the held-out pairs, under `eval/` (no gradient, no RNG drawn).

    The split's batches are dealt out to the processes in turn and their sums gathered, so every process gets the
    same numbers (only the main one logs them). Padded batches are cut from the pairs longest first
    (`longest_first`), flat ones in order.
    """
    if not examples:
        return {}
    scale = len(examples) / max(1, chosen_tokens(examples, range(len(examples))))
    order = list(range(len(examples))) if flat else longest_first(examples)
    batches = [order[s : s + cfg.scoring_batch] for s in range(0, len(order), cfg.scoring_batch)]
    model, device = engine.unwrapped_model, engine.device
    totals: dict[str, Tensor] = {}
    for idx in progress(batches[engine.rank :: engine.world_size], "eval", show=engine.shows_progress):
        batch = make_batch(
            examples, idx, split="eval", collate=collate, device=device, reference=reference, sft_scale=scale
        )
        with engine.accelerator.autocast():
            losses, metrics = pair_losses(cfg, model, batch)
        for k, v in {"loss": losses, **metrics}.items():
            totals[k] = totals[k] + v.double().sum() if k in totals else v.double().sum()
    mine = dict(zip(totals, torch.stack(list(totals.values())).tolist(), strict=True)) if totals else {}  # one sync
    sums: dict[str, float] = {}
    for share in engine.gather(mine):  # rank 0 has the first batch, so its keys come first
        for k, v in share.items():
            sums[k] = sums.get(k, 0.0) + v
    return {f"eval/{k}": v / len(examples) for k, v in sums.items()}


# ---------------------------------------------------------------------------------------------- setup


def load_models(cfg: Config) -> tuple[nn.Module, nn.Module | None]:
    """The policy (dropout off, LoRA applied) and, when scored on the fly, a separate frozen reference model.

    No reference model for SimPO/ORPO, for `precompute_ref` (loaded later, only on a cache miss), and for
    LoRA without `ref` (the base model under the adapters is the reference).
    """
    policy = load_causal_lm(cfg.model, trainable=True)
    disable_dropout(policy)
    ref_model = None
    if not cfg.reference_free and not cfg.precompute_ref:
        if cfg.ref is not None:
            ref_model = load_causal_lm(cfg.ref, trainable=False)
        elif cfg.model.lora.r == 0:
            ref_model = frozen_copy(policy)
    if ref_model is not None:
        disable_dropout(ref_model)
    return apply_lora(policy, cfg.model.lora), ref_model


def make_reference(cfg: Config, engine: Engine, ref_model: nn.Module | None) -> Reference:
    """The on-the-fly reference: `ref_model`, or the policy itself with its LoRA adapters switched off.

    Called before `engine.resume()`, so "the policy itself" is still the initial policy when precomputing.
    """
    autocast = engine.accelerator.autocast
    if ref_model is not None:
        return Reference(model=ref_model.to(engine.device), autocast=autocast)
    if cfg.ref is not None:  # precompute_ref on a cache miss
        model = load_causal_lm(cfg.ref, trainable=False)
        disable_dropout(model)
        return Reference(model=model.to(engine.device), autocast=autocast)
    policy = engine.unwrapped_model
    host = policy if cfg.model.lora.r > 0 else None
    return Reference(model=policy, adapter_host=host, autocast=autocast)


def setup_reference(
    cfg: Config, engine: Engine, ref_model: nn.Module | None, splits: dict[str, list[dict[str, Any]]], collate: Collate
) -> Reference | None:
    """None for SimPO/ORPO; the cached tables with `precompute_ref`; else the reference model."""
    if cfg.reference_free:
        return None
    if not cfg.precompute_ref:
        return make_reference(cfg, engine, ref_model)
    layout = ExampleLayout("preference", ("prompt_ids", *RESPONSES), collate, rows_per_example=2)
    key = reference_cache_key(cfg, splits, layout)
    make = partial(make_reference, cfg, engine, None)
    return Reference(tables=cached_reference_tables(engine, splits, layout, key, make, batch_size=cfg.scoring_batch))


# ---------------------------------------------------------------------------------------------- the loop


def train(cfg: Config) -> Path:
    """Train with the configured preference loss; return the run directory (final/ holds the HF model)."""
    run_dir = Path(cfg.output_dir)
    tokenizer = load_model_tokenizer(cfg.model)
    data = load_splits(cfg.data, "preference", tokenizer, seed=cfg.seed)
    total = count_steps(cfg.train, len(data.train))
    seed_everything(cfg.seed)
    policy, ref_model = load_models(cfg)
    engine = make_engine(policy, cfg, total, data_report=data.report)
    with engine:
        device = engine.device
        flat = cfg.share_prompt and cfg.data.padding_free and padding_free.enabled(policy, ref_model)
        round_to = padding_free.row_multiple(policy, device) if flat else 1
        kv_cache = all(mixes_by_attention_alone(m) for m in (policy, ref_model) if m is not None)
        collate = pair_collator(cfg, tokenizer.pad_token_id, flat, round_to, kv_cache)
        splits = {"train": data.train, **({"eval": data.eval} if data.eval else {})}
        reference = setup_reference(cfg, engine, ref_model, splits, collate)
        group = cfg.data.group_by_length
        order = DataOrder.of_examples(data.train, cfg.train.batch_size, seed=cfg.seed, group_by_length=group)
        engine.register_state("data_order", order)
        engine.resume()
        step_loss = partial(loss_fn, cfg)
        batch_kw = {"split": "train", "collate": collate, "device": device, "reference": reference}
        while engine.step < total:
            if engine.should_stop():
                engine.interrupt()
            idx = order.next_batch()
            scale = len(idx) / max(1, chosen_tokens(data.train, idx))  # ORPO: token mean over the global batch
            mbs = [
                make_batch(data.train, i, sft_scale=scale, **batch_kw)
                for i in engine.local_indices(idx, None if flat else order.lengths)
            ]
            metrics = engine.train_step(mbs, step_loss) or {}
            if data.eval and eval_due(engine.step, total, cfg.train.eval_every):
                metrics |= evaluate(cfg, engine, data.eval, reference, collate=collate, flat=flat)
            if metrics:
                engine.log(metrics | {"data/epoch": float(order.epoch)})
            engine.maybe_save_checkpoint()
        save_final(engine, engine.unwrapped_model, tokenizer, base_path=cfg.model.path)
    return run_dir
