"""KTO: alignment from unpaired desirable / undesirable examples (Ethayarajh et al. 2024).

    rlhf train kto --config configs/kto.yaml

Each example is a prompt, one completion and a label. The loss (`rlhf.losses.preference.kto_loss`) compares
the implied reward r = log pi(y|x) - log pi_ref(y|x) with a reference point z, an estimate of
KL(pi || pi_ref): as in the paper, z is the mean over the global batch of the policy-to-reference log-ratio of
MISMATCHED pairs - each prompt with the next row's completion (shifted by one within the batch) - computed
before the step without gradient (kto_loss clamps it at 0 and detaches it). Because z is a property of the
whole global batch, it is computed once per step, not per micro-batch, so the gradient does not depend on
how the batch is split.

The reference is a frozen copy of the initial policy, or `ref.path`, or with LoRA the base model under the
adapters. `precompute_ref` caches the reference log-probs of the matched examples (`ref_logps/`); those of
the mismatched pairs depend on the batch, so the reference model stays loaded to score them. Dropout is off
in the policy and the reference. With `data.padding_free` (models on our attention), a micro-batch's examples run
back to back in one row with no pads (`rlhf.models.sequence_logps.collate_flat`), as DPO's pairs do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
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
from rlhf.data import collate_responses, to_device
from rlhf.data.collate import Collate
from rlhf.losses.preference import kto_loss
from rlhf.models import padding_free
from rlhf.models.loading import (
    apply_lora,
    disable_dropout,
    frozen_copy,
    load_causal_lm,
    load_model_tokenizer,
)
from rlhf.models.reference import ExampleLayout, Reference, cached_reference_tables, reference_cache_key
from rlhf.models.sequence_logps import collate_flat, response_logps
from rlhf.progress import progress
from rlhf.runtime.data_order import DataOrder
from rlhf.runtime.engine import Engine
from rlhf.runtime.finish import save_final
from rlhf.runtime.setup import count_steps, eval_due, load_splits, make_engine, seed_everything

SUMS = "sum/"
"""Prefix of helper metric sums that become per-class means after the step (never logged as such)."""


@dataclass
class Config:
    output_dir: str = "runs/kto"
    """Run directory: config.yaml, metrics.jsonl, checkpoints/, ref_logps/, final/."""
    seed: int = 0
    """Seed of the data order, the held-out split and every RNG."""
    beta: float = 0.1
    """Inverse temperature of the implied reward beta * (log pi - log pi_ref)."""
    desirable_weight: float = 1.0
    """lambda_D, the weight of desirable examples' losses. The paper keeps lambda_D n_D / (lambda_U n_U) in [1, 4/3]."""
    undesirable_weight: float = 1.0
    """lambda_U, the weight of undesirable examples' losses."""
    precompute_ref: bool = False
    """Cache the reference log-probs of the examples in run_dir/ref_logps/ (the mismatched pairs are scored live);
    several processes each score a share."""
    score_batch_size: int = 0
    """Examples per no-grad forward when precomputing reference log-probs and evaluating; 0: 4 x micro_batch_size."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy to train (usually an SFT checkpoint)."""
    ref: ModelConfig | None = None
    """A separate reference model; unset: a frozen copy of the initial policy (with LoRA: the base model)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Unpaired data: prompt + completion + label (true = desirable)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Batches (of examples; at least 2 for the mismatched KL pairs), steps, precision, evaluation interval."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """metrics.jsonl and trackers."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Resumable checkpoints."""

    def validate(self) -> None:
        check(self.beta > 0, "beta", f"must be > 0, got {self.beta}")
        check(self.desirable_weight > 0, "desirable_weight", f"must be > 0, got {self.desirable_weight}")
        check(self.undesirable_weight > 0, "undesirable_weight", f"must be > 0, got {self.undesirable_weight}")
        check(self.score_batch_size >= 0, "score_batch_size", f"must be >= 0, got {self.score_batch_size}")
        check(self.train.batch_size >= 2, "train.batch_size", "must be >= 2: KTO's KL pairs mismatch rows of a batch")

    @property
    def scoring_batch(self) -> int:
        return self.score_batch_size or 4 * self.train.micro_batch_size


# ---------------------------------------------------------------------------------------------- batches


def collate(examples: Sequence[dict[str, Any]], pad_id: int, flat: bool = False, round_to: int = 1) -> dict[str, Any]:
    """prompt+completion rows plus `label` (B,) bool: right padded (one response per prompt, so sharing the prompt
    pass would save nothing: the rows are scored in full), or with `flat` back to back in one padding-free row
    (`collate_flat`, filled up to a multiple of `round_to`)."""
    if flat:
        batch = collate_flat(examples, pad_id, ("completion_ids",), round_to)
    else:
        batch = collate_responses(examples, pad_id, ("completion_ids",), share_prompt=False)
    batch["label"] = torch.tensor([bool(ex["label"]) for ex in examples], dtype=torch.bool)  # (B,)
    return batch


def mismatched(examples: Sequence[dict[str, Any]], max_length: int) -> list[dict[str, Any]]:
    """The KL pairs: prompt k with the completion of row k+1 (cyclically), cut to `max_length` tokens in total."""
    n = len(examples)
    return [
        {
            "prompt_ids": ex["prompt_ids"],
            "completion_ids": examples[(k + 1) % n]["completion_ids"][: max(1, max_length - len(ex["prompt_ids"]))],
            "label": False,
        }
        for k, ex in enumerate(examples)
    ]


@torch.no_grad()
def kl_logratio_sum(
    model: nn.Module, reference: Reference, kl_examples: Sequence[dict[str, Any]], batch_size: int, **kw: Any
) -> Tensor:
    """Sum over the KL pairs of log pi(y|x) - log pi_ref(y|x), scored in no-grad batches. A float64 scalar."""
    total = torch.zeros((), dtype=torch.float64, device=kw["device"])
    for s in range(0, len(kl_examples), batch_size):
        batch = to_device(kw["collate"](kl_examples[s : s + batch_size]), kw["device"])
        with kw["autocast"]():
            policy = response_logps(model, batch).sum  # (b,)
        total += (policy.double() - reference.score(batch, 1)[:, 0].double()).sum()
    return total


def kl_reference_point(engine: Engine, reference: Reference, examples: Sequence[dict[str, Any]], **kw: Any) -> Tensor:
    """z: the mean mismatched-pair log-ratio over the global batch `examples` (this process scores its share)."""
    pairs = mismatched(examples, kw.pop("max_length"))
    mine = [pairs[i] for chunk in engine.local_indices(range(len(pairs))) for i in chunk]
    total = kl_logratio_sum(engine.unwrapped_model, reference, mine, kw.pop("batch_size"), **kw)
    if engine.world_size > 1:
        total = engine.accelerator.reduce(total, reduction="sum")
    return (total / len(pairs)).float()


# ---------------------------------------------------------------------------------------------- the loss


def kto_terms(
    cfg: Config, policy: Tensor, ref: Tensor, desirable: Tensor, kl_ref: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """`kto_loss` per example (B,), and metric terms (B,) whose means `class_means` turns into per-class means."""
    losses, m = kto_loss(
        policy,
        ref,
        desirable,
        kl_ref,
        beta=cfg.beta,
        desirable_weight=cfg.desirable_weight,
        undesirable_weight=cfg.undesirable_weight,
    )
    d = m["desirable"]
    u = 1.0 - d
    logps = policy.detach().float()
    return losses, {
        f"{SUMS}desirable": d,
        f"{SUMS}undesirable": u,
        f"{SUMS}rewards/chosen": m["rewards"] * d,
        f"{SUMS}rewards/rejected": m["rewards"] * u,
        f"{SUMS}logps/chosen": logps * d,
        f"{SUMS}logps/rejected": logps * u,
        "kto/kl": m["kl_ref"].expand_as(d),
        "data/desirable_fraction": d,
    }


def example_losses(cfg: Config, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
    """One forward over the micro-batch's prompt+completion rows, then `kto_terms` with the step's z."""
    policy = response_logps(model, batch).sum  # (B,)
    return kto_terms(cfg, policy, batch["ref_logps"][:, 0], batch["label"], batch["kl_ref"])


def loss_fn(cfg: Config, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, int, dict[str, Tensor]]:
    """The engine's loss_fn: sums over the micro-batch's examples (the units)."""
    losses, metrics = example_losses(cfg, model, batch)
    return losses.sum(), losses.shape[0], {k: v.sum() for k, v in metrics.items()}


def class_means(metrics: dict[str, float]) -> dict[str, float]:
    """Turn the `sum/` helper means into per-class means: rewards/chosen = mean reward of desirable examples, ...

    A class absent from the batch gets 0. rewards/margin = rewards/chosen - rewards/rejected.
    """
    out = {k: v for k, v in metrics.items() if not k.startswith(SUMS)}
    n_d, n_u = metrics.get(f"{SUMS}desirable"), metrics.get(f"{SUMS}undesirable")
    if n_d is None or n_u is None:
        return out
    for name in ("rewards", "logps"):
        out[f"{name}/chosen"] = metrics[f"{SUMS}{name}/chosen"] / n_d if n_d > 0 else 0.0
        out[f"{name}/rejected"] = metrics[f"{SUMS}{name}/rejected"] / n_u if n_u > 0 else 0.0
    out["rewards/margin"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


def pairwise_accuracy(rewards: Tensor, desirable: Tensor) -> float:
    """P(reward of a desirable example > reward of an undesirable one), ties counted half (the ROC AUC).

    The unpaired analogue of DPO's pair accuracy: 0.5 is chance, 1 a reward that separates the labels.
    """
    good, bad = rewards[desirable.bool()].double(), rewards[~desirable.bool()].double()
    if good.numel() == 0 or bad.numel() == 0:
        return 0.5
    wins = torch.zeros((), dtype=torch.float64, device=good.device)
    for s in range(0, good.numel(), 1024):  # (1024, n_bad) comparisons at a time
        diff = good[s : s + 1024, None] - bad[None, :]
        wins += (diff > 0).sum() + 0.5 * (diff == 0).sum()
    return float(wins / (good.numel() * bad.numel()))


@torch.no_grad()
def evaluate(
    cfg: Config, engine: Engine, examples: Sequence[dict[str, Any]], reference: Reference, **kw: Any
) -> dict[str, float]:
    """Loss and metrics over the held-out examples, under `eval/`; z from mismatched pairs within each eval batch.

    The batches (in file order, which fixes the mismatched pairs) are dealt out to the processes in turn; their
    log-probs and KL sums are gathered, so every process gets the same numbers (only the main one logs them).
    eval/rewards/accuracy is `pairwise_accuracy` of the implied reward against the labels.
    `kw`: collate, device, autocast, max_length.
    """
    if not examples:
        return {}
    bs, model, policy, refs, labels = cfg.scoring_batch, engine.unwrapped_model, [], [], []
    kl_sum = torch.zeros((), dtype=torch.float64, device=kw["device"])
    starts = range(0, len(examples), bs)[engine.rank :: engine.world_size]
    for s in progress(starts, "eval", show=engine.shows_progress):
        chunk = examples[s : s + bs]
        batch = to_device(kw["collate"](chunk), kw["device"])
        with kw["autocast"]():
            policy.append(response_logps(model, batch).sum.float())
        refs.append(reference.logps(batch, "eval", range(s, s + len(chunk)), 1)[:, 0])
        labels.append(batch["label"])
        pairs = mismatched(chunk, kw["max_length"])
        kl_sum += kl_logratio_sum(
            model, reference, pairs, bs, collate=kw["collate"], device=kw["device"], autocast=kw["autocast"]
        )
    mine = [torch.cat(x).cpu() if x else torch.zeros(0) for x in (policy, refs, labels)]
    shares = engine.gather((*mine, kl_sum.item()))
    pol, ref, desirable = (torch.cat([share[i] for share in shares]) for i in range(3))
    kl_ref = torch.tensor(sum(share[3] for share in shares) / len(examples), dtype=torch.float32)
    losses, metrics = kto_terms(cfg, pol, ref, desirable.bool(), kl_ref)
    names = ["loss", *metrics]
    values = torch.stack([losses.double().mean(), *(v.double().mean() for v in metrics.values())]).tolist()
    out = class_means(dict(zip(names, values, strict=True)))
    out["rewards/accuracy"] = pairwise_accuracy(pol - ref, desirable.bool())
    return {f"eval/{k}": v for k, v in out.items()}


# ---------------------------------------------------------------------------------------------- setup


def setup_reference(
    cfg: Config, engine: Engine, ref_model: nn.Module | None, splits: dict[str, list[dict[str, Any]]], collate: Collate
) -> Reference:
    """The reference model (a frozen copy, `ref.path`, or the LoRA policy's base), plus cached tables if asked.

    Built before `engine.resume()`: the LoRA base and the cache must be the initial policy's.
    """
    if ref_model is not None:
        reference = Reference(model=ref_model.to(engine.device), autocast=engine.accelerator.autocast)
    else:  # LoRA without a separate reference: the base model under the adapters
        policy = engine.unwrapped_model
        reference = Reference(model=policy, adapter_host=policy, autocast=engine.accelerator.autocast)
    if not cfg.precompute_ref:
        return reference
    layout = ExampleLayout("unpaired", ("prompt_ids", "completion_ids"), collate, 1)
    key = reference_cache_key(cfg, splits, layout)
    tables = cached_reference_tables(engine, splits, layout, key, lambda: reference, batch_size=cfg.scoring_batch)
    return Reference(
        model=reference.model, tables=tables, adapter_host=reference.adapter_host, autocast=reference.autocast
    )


def load_models(cfg: Config) -> tuple[nn.Module, nn.Module | None]:
    """The policy (dropout off, LoRA applied) and the reference model (None with LoRA and no `ref`)."""
    policy = load_causal_lm(cfg.model, trainable=True)
    disable_dropout(policy)
    if cfg.ref is not None:
        ref_model = load_causal_lm(cfg.ref, trainable=False)
    else:
        ref_model = frozen_copy(policy) if cfg.model.lora.r == 0 else None
    if ref_model is not None:
        disable_dropout(ref_model)
    return apply_lora(policy, cfg.model.lora), ref_model


# ---------------------------------------------------------------------------------------------- the loop


def train(cfg: Config) -> Path:
    """Train with KTO on unpaired labelled completions; return the run directory (final/ holds the HF model)."""
    run_dir = Path(cfg.output_dir)
    tokenizer = load_model_tokenizer(cfg.model)
    data = load_splits(cfg.data, "unpaired", tokenizer, seed=cfg.seed)
    total = count_steps(cfg.train, len(data.train))
    seed_everything(cfg.seed)
    policy, ref_model = load_models(cfg)
    engine = make_engine(policy, cfg, total, data_report=data.report)
    with engine:
        device, autocast = engine.device, engine.accelerator.autocast
        flat = cfg.data.padding_free and padding_free.enabled(policy, ref_model)
        round_to = padding_free.row_multiple(policy, device) if flat else 1
        batch_of = partial(collate, pad_id=tokenizer.pad_token_id, flat=flat, round_to=round_to)
        splits = {"train": data.train, **({"eval": data.eval} if data.eval else {})}
        reference = setup_reference(cfg, engine, ref_model, splits, batch_of)
        group = cfg.data.group_by_length
        order = DataOrder.of_examples(data.train, cfg.train.batch_size, seed=cfg.seed, group_by_length=group)
        engine.register_state("data_order", order)
        engine.resume()
        step_loss = partial(loss_fn, cfg)
        score_kw = {"collate": batch_of, "device": device, "autocast": autocast, "max_length": cfg.data.max_length}
        while engine.step < total:
            if engine.should_stop():
                engine.interrupt()
            idx = order.next_batch()
            kl_ref = kl_reference_point(
                engine, reference, [data.train[i] for i in idx], batch_size=cfg.scoring_batch, **score_kw
            )
            mbs = []
            for local in engine.local_indices(idx, None if flat else order.lengths):
                batch = to_device(batch_of([data.train[i] for i in local]), device)
                batch["ref_logps"] = reference.logps(batch, "train", local, 1)  # (b, 1)
                mbs.append(batch | {"kl_ref": kl_ref})
            metrics = engine.train_step(mbs, step_loss)
            metrics = class_means(metrics) if metrics is not None else {}
            if data.eval and eval_due(engine.step, total, cfg.train.eval_every):
                metrics |= evaluate(cfg, engine, data.eval, reference, **score_kw)
            if metrics:
                engine.log(metrics | {"data/epoch": float(order.epoch)})
            engine.maybe_save_checkpoint()
        save_final(engine, engine.unwrapped_model, tokenizer, base_path=cfg.model.path)
    return run_dir
