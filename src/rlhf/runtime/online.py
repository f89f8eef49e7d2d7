"""What the online trainers (PPO, GRPO, RLOO) share around their algorithm: the run's length in iterations, the
minibatch update loop over a rollout, the iteration's metrics, and the samples log.

An iteration draws one batch of prompts (`rollout.batch_size`), makes its experience, and runs `epochs` shuffled
passes of minibatch steps over it. Checkpoints and SIGTERM stops happen only between iterations (a rollout is
never saved); the data order, which counts the iterations, is in the checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from rlhf.errors import UserError
from rlhf.rollout.batch import RolloutBatch
from rlhf.runtime.data_order import DataOrder
from rlhf.runtime.engine import Engine
from rlhf.runtime.run_dir import SAMPLES_FILE, JsonlWriter

OnlineLoss = Callable[[nn.Module, RolloutBatch[Any]], tuple[Tensor, Tensor, dict[str, Tensor]]]
"""loss_fn(model, micro_batch) -> (loss_sum, units, metric_sums), as `Engine.train_step` takes it."""

LATEST = ("train/nonfinite_skips", "perf/elapsed_s")
"""Step metrics that are counters or clocks: an iteration reports their latest value, not their mean."""


def iterations_done(order: DataOrder) -> int:
    """Each iteration draws one batch of prompts, so the (checkpointed) data order counts the iterations."""
    return order.epoch * order.steps_per_epoch + order.position


def count_iterations(cfg: Any, num_prompts: int) -> int:
    """Iterations of the run, by the first setting given: `total_episodes` / episodes per iteration,
    `train.max_steps` / optimizer steps per iteration (both rounded up), or `train.epochs` x whole batches of
    prompts. `cfg` is an online trainer's Config (`episodes_per_iteration`, `steps_per_iteration`)."""
    if num_prompts < cfg.rollout.batch_size:
        raise UserError(f"only {num_prompts} prompts for rollout.batch_size {cfg.rollout.batch_size}: lower it")
    if cfg.total_episodes:
        return math.ceil(cfg.total_episodes / cfg.episodes_per_iteration)
    if cfg.train.max_steps:
        return math.ceil(cfg.train.max_steps / cfg.steps_per_iteration)
    return cfg.train.epochs * (num_prompts // cfg.rollout.batch_size)


def prompts_of_iteration(engine: Engine, order: DataOrder, prompts: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """This process's share of the iteration's prompt examples (every process draws the same global batch)."""
    if order.batch_size % engine.world_size:
        raise UserError(f"rollout.batch_size {order.batch_size} does not split over {engine.world_size} processes")
    return [prompts[i] for i in order.next_batch()[engine.rank :: engine.world_size]]


def run_updates(
    engine: Engine,
    batch: RolloutBatch[Any],
    loss_fn: OnlineLoss,
    *,
    epochs: int,
    minibatches: int,
    seed: int,
    iteration: int,
    flat: bool,
    stop_kl: float | None = None,
) -> tuple[list[dict[str, float]], int]:
    """`epochs` shuffled passes over this process's rollout rows, each in `minibatches` optimizer steps of equal
    shares (one apart at most), in micro-batches of at most `train.micro_batch_size` rows
    (`RolloutBatch.micro_batches`; padding-free with `flat`, when the model runs that way).

    The shuffles come from a generator seeded by (seed, iteration, epoch), not from the global RNG. `stop_kl`:
    end the remaining updates once a logged step's `policy/approx_kl` exceeds it. Returns the metrics of the
    steps that logged and the number of tokens (prompt + response) trained on.
    """
    n, micro = len(batch), engine.train_cfg.micro_batch_size
    engine.micro_batches_per_step()  # checks batch_size against micro_batch_size x processes
    if n < minibatches:
        raise UserError(f"{n} rollout rows per process cannot fill {minibatches} minibatches: raise rollout.batch_size")
    logged, tokens = [], 0
    for epoch in range(epochs):
        g = torch.Generator().manual_seed((seed * 1_000_003 + iteration * 1_009 + epoch) % 2**63)
        for rows in torch.randperm(n, generator=g).tensor_split(minibatches):
            step_batches = batch.micro_batches(rows, micro, flat=flat)
            tokens += sum(int(m.attention_mask.sum()) for m in step_batches)
            metrics = engine.train_step(step_batches, loss_fn)
            if metrics is None:
                continue
            logged.append(metrics)
            if stop_kl is not None and metrics["policy/approx_kl"] > stop_kl:
                return logged, tokens
    return logged, tokens


def mean_metrics(logged: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each step metric over the iteration's logged steps (counters and clocks: their latest value)."""
    out: dict[str, float] = {}
    for key in dict.fromkeys(k for m in logged for k in m):
        values = [m[key] for m in logged if key in m]
        out[key] = values[-1] if key in LATEST else sum(values) / len(values)
    return out


def global_mean(engine: Engine, stats: dict[str, Tensor]) -> dict[str, float]:
    """Python floats of scalar tensors averaged over processes (one host sync)."""
    vec = torch.stack([v.detach().float() for v in stats.values()])
    if engine.world_size > 1:
        vec = engine.accelerator.reduce(vec, reduction="mean")
    return dict(zip(stats, vec.tolist(), strict=True))


def checkpoint_if_due(engine: Engine, step_before: int) -> None:
    """Checkpoint at the end of an iteration whose steps reached a multiple of `checkpoint.every`."""
    every = engine.checkpoint_cfg.every
    if every > 0 and engine.step // every > step_before // every:
        engine.save_checkpoint()


class SampleLog:
    """samples.jsonl: `num` (prompt, response, score) rows every `every` iterations (main process only)."""

    def __init__(self, engine: Engine, every: int, num: int) -> None:
        self.every, self.num = every, num
        self.writer = JsonlWriter(engine.run_dir / SAMPLES_FILE) if engine.is_main and every and num else None

    def maybe_write(
        self, step: int, iteration: int, prompts: Sequence[Any], completions: Sequence[str], scores: Sequence[float]
    ) -> None:
        if self.writer is None or iteration % self.every:
            return
        for prompt, text, score in list(zip(prompts, completions, scores, strict=True))[: self.num]:
            self.writer.write(
                {"step": step, "iteration": iteration, "prompt": prompt, "response": text, "score": score}
            )

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
