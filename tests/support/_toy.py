"""A tiny causal-LM training run through Engine + DataOrder, the way a trainer drives them; and test helpers.

Used as a subprocess by the resume (SIGKILL, SIGTERM) and multi-process (`accelerate launch`) tests:

    python tests/support/_toy.py --run-dir RUN --steps 12 --ckpt-every 2

Data: 64 random token sequences of length 16 with random lengths (so micro-batches have unequal token
counts), drawn from a generator seeded by --seed. Loss: token-mean next-token cross-entropy. Each step also
draws one number from each global RNG stream (python, numpy, torch) and logs their sum as `toy/rng`, so a
resume that restores any stream wrongly shows up in metrics.jsonl. `--dropout` turns on attention dropout,
which draws from the torch RNG inside the model.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlhf.config import CheckpointConfig, LoggingConfig, OptimConfig, ScheduleConfig, TrainConfig
from rlhf.runtime.data_order import DataOrder
from rlhf.runtime.engine import Engine
from rlhf.tasks.tiny import build_model, build_tokenizer

N_SAMPLES, SEQ_LEN = 64, 16


# ---------------------------------------------------------------- helpers for the in-process tests


class TokenModel(torch.nn.Module):
    """Embedding -> LayerNorm -> Linear: a per-token classifier with matrices, a norm and a bias, in 0.1 ms."""

    def __init__(self, vocab: int = 16, hidden: int = 8, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.norm = torch.nn.LayerNorm(hidden)
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(ids)))  # (B, T, V)


def token_batches(n_batches: int, batch: int = 8, seq: int = 6, vocab: int = 16, seed: int = 0) -> list[dict]:
    """Random (ids, targets, mask) batches whose rows have different numbers of real tokens (1..seq)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        lengths = torch.randint(1, seq + 1, (batch,), generator=g)
        out.append(
            {
                "ids": torch.randint(0, vocab, (batch, seq), generator=g),
                "targets": torch.randint(0, vocab, (batch, seq), generator=g),
                "mask": (torch.arange(seq)[None, :] < lengths[:, None]).float(),  # (B, T)
            }
        )
    return out


def split(batch: dict, size: int) -> list[dict]:
    n = batch["ids"].shape[0]
    return [{k: v[i : i + size] for k, v in batch.items()} for i in range(0, n, size)]


def token_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Masked token cross-entropy summed over real tokens; units = real tokens."""
    logits = model(batch["ids"])  # (B, T, V)
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["targets"], reduction="none")  # (B, T)
    nll = nll * batch["mask"]
    return nll.sum(), batch["mask"].sum(), {"loss/nll": nll.sum().detach()}


def make_engine(model: torch.nn.Module, run_dir: Path, **kw: Any) -> Engine:
    """An Engine with small defaults; keyword arguments override fields of the config sections."""
    train = TrainConfig(
        batch_size=kw.pop("batch_size", 8),
        micro_batch_size=kw.pop("micro_batch_size", 8),
        max_consecutive_nonfinite=kw.pop("max_consecutive_nonfinite", 3),
        mixed_precision=kw.pop("mixed_precision", "no"),
    )
    optim = OptimConfig(
        lr=kw.pop("lr", 1e-2), weight_decay=kw.pop("weight_decay", 0.1), max_grad_norm=kw.pop("max_grad_norm", 1.0)
    )
    schedule = ScheduleConfig(
        name=kw.pop("schedule", "constant"),
        warmup_steps=kw.pop("warmup_steps", 0),
        min_lr_ratio=kw.pop("min_lr_ratio", 0.0),
    )
    logging = LoggingConfig(every=kw.pop("log_every", 1), progress=False)
    checkpoint = CheckpointConfig(
        every=kw.pop("ckpt_every", 0),
        every_minutes=kw.pop("ckpt_every_minutes", 0.0),
        keep_last=kw.pop("keep_last", 2),
        resume=kw.pop("resume", "auto"),
    )
    return Engine(
        model,
        run_dir=run_dir,
        seed=kw.pop("seed", 0),
        optim=optim,
        schedule=schedule,
        train=train,
        logging=logging,
        checkpoint=checkpoint,
        total_steps=kw.pop("total_steps", 10),
        **kw,
    )


# ---------------------------------------------------------------- the toy run


def make_data(seed: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(7, vocab_size, (N_SAMPLES, SEQ_LEN), generator=g)  # (N, T); skip special ids
    lengths = torch.randint(4, SEQ_LEN + 1, (N_SAMPLES,), generator=g)
    attention_mask = (torch.arange(SEQ_LEN)[None, :] < lengths[:, None]).long()  # (N, T), right-padded
    return input_ids, attention_mask


def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Summed next-token NLL over real tokens; units = number of predicted tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    target = batch["input_ids"][:, 1:]  # (B, T-1)
    mask = batch["attention_mask"][:, 1:].float()  # (B, T-1)
    nll = -logp.gather(-1, target[..., None]).squeeze(-1) * mask
    correct = (logp.argmax(-1) == target).float() * mask
    return nll.sum(), mask.sum(), {"toy/accuracy": correct.sum().detach()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--ckpt-every", type=int, default=0)
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--resume", default="auto")
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds to sleep per step (gives tests time)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # bit-identical results need the same reduction order in every run

    tokenizer = build_tokenizer("llama")
    model = build_model(tokenizer, "llama", hidden_size=32, num_layers=2, num_heads=4, max_positions=64, seed=1)
    model.config.attention_dropout = args.dropout
    input_ids, attention_mask = make_data(args.seed + 100, len(tokenizer))
    train = TrainConfig(batch_size=args.batch_size, micro_batch_size=args.micro_batch_size)
    engine = Engine(
        model,
        run_dir=args.run_dir,
        seed=args.seed,
        optim=OptimConfig(lr=3e-3, weight_decay=0.01, max_grad_norm=1.0),
        schedule=ScheduleConfig(name="cosine", warmup_steps=2, min_lr_ratio=0.1),
        train=train,
        logging=LoggingConfig(every=1, progress=False),
        checkpoint=CheckpointConfig(every=args.ckpt_every, keep_last=args.keep_last, resume=args.resume),
        total_steps=args.steps,
        # what the run computes; the pacing of a test (step_sleep) is not part of it
        config_dict={
            "toy": {k: v for k, v in vars(args).items() if k != "step_sleep"} | {"run_dir": str(args.run_dir)}
        },
    )
    order = DataOrder(N_SAMPLES, train.batch_size, seed=args.seed)
    engine.register_state("data_order", order)
    if engine.resume() and engine.is_main:
        print(f"resumed at step {engine.step}", flush=True)
    if engine.is_main:
        (args.run_dir / "world.json").write_text(json.dumps({"world_size": engine.world_size}))

    def collate(idx: list[int]) -> dict[str, Any]:
        return {"input_ids": input_ids[idx].to(engine.device), "attention_mask": attention_mask[idx].to(engine.device)}

    while engine.step < args.steps:
        if engine.should_stop():
            engine.interrupt()
        rng_probe = random.random() + float(np.random.rand()) + torch.rand(()).item()
        micro_batches = [collate(idx) for idx in engine.local_indices(order.next_batch())]
        metrics = engine.train_step(micro_batches, loss_fn)
        if metrics is not None:
            engine.log(metrics | {"toy/rng": rng_probe, "data/epoch": order.epoch})
        engine.maybe_save_checkpoint()
        time.sleep(args.step_sleep)
    engine.save_final(engine.unwrapped_model, tokenizer)
    engine.close()


if __name__ == "__main__":
    main()
