"""What the online trainers (PPO, GRPO, RLOO) share around their algorithm: the run's length in iterations, the
loop over iterations (`IterationLoop`), the minibatch update loop over a rollout, the iteration's metrics, the
reward-hacking signals and the rules that stop a run on them, the evaluation on held-out prompts during training,
and the samples log.

An iteration draws one batch of prompts (`rollout.batch_size`), makes its experience, and runs `epochs` shuffled
passes of minibatch steps over it. Checkpoints and SIGTERM stops happen only between iterations (a rollout is
never saved); the data order, which counts the iterations, is in the checkpoint.

    loop = IterationLoop(engine, cfg, prompts, iterations, name="grpo", evaluator=..., ...)
    for it in loop:                                   # it.examples, it.keys, it.kl_coef
        experience, stats = ...                       # the algorithm's rollout
        stats = loop.rollout_stats(stats, experience)  # means over processes; the KL controller updated
        logged, tokens = run_updates(engine, batch, loss_fn, ...)
        loop.end(it, logged, stats, policy=..., completions=..., scores=..., perf={...})
    loop.close()
"""

from __future__ import annotations

import logging
import math
import operator
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from rlhf.errors import ConfigError, UserError
from rlhf.evaluation.policies import evaluate_policy
from rlhf.evaluation.stats import repetition
from rlhf.losses.reduce import SumOver
from rlhf.rollout.batch import RolloutBatch
from rlhf.rollout.config import OnlineEvalConfig, kl_controller
from rlhf.rollout.experience import Experience
from rlhf.rollout.generation import stream_keys
from rlhf.rollout.rewards import FunctionReward, RewardSource, load_reward_function
from rlhf.runtime.data_order import DataOrder
from rlhf.runtime.engine import Engine
from rlhf.runtime.run_dir import SAMPLES_FILE, JsonlWriter

logger = logging.getLogger(__name__)

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


def share_of_iteration(
    engine: Engine, order: DataOrder, prompts: Sequence[dict[str, Any]], *, seed: int, iteration: int, group_size: int
) -> tuple[list[dict[str, Any]], Tensor]:
    """This process's share of the iteration: its prompt examples and the sampling keys of their rollout rows.

    Every process draws the same global batch and takes positions rank, rank + W, ... of it. Completion m of the
    prompt at position p is row p * group_size + m of stream (seed, iteration), so a prompt's completions are the
    same whether 1 or N processes share the batch, and on resume. Keys: (prompts * group_size,), prompt-major.
    """
    if order.batch_size % engine.world_size:
        raise UserError(f"rollout.batch_size {order.batch_size} does not split over {engine.world_size} processes")
    batch = order.next_batch()
    positions = torch.arange(engine.rank, order.batch_size, engine.world_size)  # (prompts,)
    rows = positions[:, None] * group_size + torch.arange(group_size)  # (prompts, group_size)
    return [prompts[batch[p]] for p in positions.tolist()], stream_keys(seed, iteration, rows.flatten())


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
    group_size: int = 1,
) -> tuple[list[dict[str, float]], int]:
    """`epochs` shuffled passes over this process's rollout rows, each in `minibatches` optimizer steps of equal
    shares (one apart at most), in micro-batches of at most `train.micro_batch_size` rows
    (`RolloutBatch.micro_batches`; padding-free with `flat`, when the model runs that way).

    The shuffles come from a generator seeded by (seed, iteration, epoch), not from the global RNG. With
    `group_size` k > 1 (rows in groups of k, a prompt's completions) the groups are shuffled, not the rows, so that a
    group's rows share a minibatch and with it their prompt's forward (`rlhf.models.forward.Unpadded`). `stop_kl`:
    end the remaining updates once a logged step's `policy/approx_kl` exceeds it. Returns the metrics of the
    steps that logged and the number of tokens (prompt + response) trained on.
    """
    n, micro = len(batch), engine.train_cfg.micro_batch_size
    engine.micro_batches_per_step()  # checks batch_size against micro_batch_size x processes
    if n < minibatches:
        raise UserError(f"{n} rollout rows per process cannot fill {minibatches} minibatches: raise rollout.batch_size")
    k = group_size if n % group_size == 0 else 1
    logged, tokens = [], 0
    for epoch in range(epochs):
        g = torch.Generator().manual_seed((seed * 1_000_003 + iteration * 1_009 + epoch) % 2**63)
        order = (torch.randperm(n // k, generator=g)[:, None] * k + torch.arange(k)).flatten()
        for rows in order.tensor_split(minibatches):
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
    """Python floats of scalar tensors averaged over processes (one host sync). The stats may sit on different
    devices (rollout statistics on the accelerator, the reward's on the CPU): they meet on the engine's."""
    vec = torch.stack([v.detach().float().to(engine.device) for v in stats.values()])
    if engine.world_size > 1:
        vec = engine.accelerator.reduce(vec, reduction="mean")
    return dict(zip(stats, vec.tolist(), strict=True))


def checkpoint_if_due(engine: Engine, step_before: int) -> None:
    """Checkpoint at the end of an iteration whose steps reached a multiple of `checkpoint.every`, or when
    `checkpoint.every_minutes` passed during it (`Engine.checkpoint_due`)."""
    if engine.checkpoint_due(step_before):
        engine.save_checkpoint()


class SampleLog:
    """samples.jsonl: `num` (prompt, response, score) rows every `every` iterations (main process only), spread
    evenly over the rollout (so a group method shows several prompts, not one prompt's group)."""

    def __init__(self, engine: Engine, every: int, num: int) -> None:
        self.every, self.num = every, num
        self.writer = JsonlWriter(engine.run_dir / SAMPLES_FILE) if engine.is_main and every and num else None

    def maybe_write(
        self, step: int, iteration: int, prompts: Sequence[Any], completions: Sequence[str], scores: Sequence[float]
    ) -> None:
        if self.writer is None or iteration % self.every:
            return
        rows = list(zip(prompts, completions, scores, strict=True))
        for prompt, text, score in (rows[i * len(rows) // self.num] for i in range(min(self.num, len(rows)))):
            self.writer.write(
                {"step": step, "iteration": iteration, "prompt": prompt, "response": text, "score": score}
            )

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ---------------------------------------------------------------------------------------------- hacking signals


class HackingMonitor:
    """The reward-hacking signals of every rollout (Gao et al. 2023; Singhal et al. 2023 on length):

        hacking/length_drift    mean response length / that of the run's first rollout
        hacking/repetition      mean seq-rep-2 of the responses' tokens (`evaluation.stats.repetition`)
        hacking/ensemble_std    mean std of an ensemble's member scores (only with several reward sources)

    The first rollout's length is checkpointed (`state_dict`), so a resumed run measures drift from the same start.
    """

    def __init__(self) -> None:
        self.first_length: float | None = None

    def stats(self, exp: Experience, sum_over: SumOver | None = None) -> dict[str, Tensor]:
        """This process's signals; the drift is of the global batch's mean length with `sum_over` (the other
        signals are means over equal shares of the rows, so their mean over processes is the global one)."""
        lengths = exp.lengths  # (N,)
        total = torch.stack([lengths.sum().float(), torch.tensor(float(len(lengths)), device=lengths.device)])
        total = sum_over(total) if sum_over is not None else total
        mean_length = total[0] / total[1].clamp(min=1)
        if self.first_length is None:
            self.first_length = float(mean_length)
        responses = exp.sequences.input_ids[:, -exp.mask.shape[1] :].tolist()  # (N, T) response ids
        tokens = [row[: int(n)] for row, n in zip(responses, lengths.tolist(), strict=True)]
        out = {
            "hacking/length_drift": mean_length / max(self.first_length, 1e-9),
            "hacking/repetition": torch.tensor(sum(repetition(t, 2) for t in tokens) / max(len(tokens), 1)),
        }
        if exp.score_spread is not None:
            out["hacking/ensemble_std"] = exp.score_spread.mean()
        return out

    def state_dict(self) -> dict[str, float | None]:
        return {"first_length": self.first_length}

    def load_state_dict(self, state: dict[str, float | None]) -> None:
        self.first_length = state["first_length"]


_RULE = re.compile(r"^\s*([\w/.-]+)\s*(>=|<=|>|<)\s*(-?[\d.]+(?:e-?\d+)?)\s*$")
_OPS = {">": operator.gt, "<": operator.lt, ">=": operator.ge, "<=": operator.le}


@dataclass(frozen=True)
class StopRule:
    """`metric>value` (or <, >=, <=) on an iteration's metrics line, e.g. `hacking/length_drift>1.5`."""

    key: str
    op: str
    value: float

    @classmethod
    def parse(cls, spec: str) -> StopRule:
        match = _RULE.match(spec)
        if match is None:
            raise ConfigError(f"{spec!r}: expected METRIC>VALUE (or <, >=, <=), e.g. hacking/length_drift>1.5")
        return cls(match[1], match[2], float(match[3]))

    def holds(self, metrics: dict[str, float]) -> bool:
        return self.key in metrics and _OPS[self.op](metrics[self.key], self.value)

    def __str__(self) -> str:
        return f"{self.key} {self.op} {self.value:g}"


def check_stop_rules(specs: Sequence[str]) -> None:
    """In a config's validate(): every `stop_when` entry parses."""
    for i, spec in enumerate(specs):
        try:
            StopRule.parse(spec)
        except ConfigError as exc:
            raise ConfigError(exc.message, key=f"stop_when[{i}]") from None


def stop_reason(specs: Sequence[str], metrics: dict[str, float]) -> str | None:
    """The first rule of `specs` that holds on `metrics`, as text (with the value), or None."""
    for rule in map(StopRule.parse, specs):
        if rule.holds(metrics):
            return f"{rule} ({rule.key} = {metrics[rule.key]:.4g})"
    return None


# ---------------------------------------------------------------------------------------------- evaluation


class OnlineEvaluator:
    """`eval.every`: the policy's greedy answers to held-out prompts scored by the training reward and a gold
    function, and its KL to the reference from its own samples (`evaluation.policies.evaluate_policy`).

    The KL samples are drawn under a forked RNG seeded by (seed, iteration), so evaluating never changes what
    the training run samples, and a resumed run evaluates exactly as an uninterrupted one.
    """

    def __init__(
        self, cfg: OnlineEvalConfig, examples: Sequence[dict[str, Any]], proxy: RewardSource, *, seed: int
    ) -> None:
        if cfg.every and not examples:
            raise UserError("eval.every: no held-out prompts (set data.eval or data.eval_fraction)")
        self.cfg, self.examples, self.proxy, self.seed = cfg, list(examples)[: cfg.prompts], proxy, seed
        self.gold = FunctionReward(load_reward_function(cfg.gold), name=cfg.gold) if cfg.gold else None

    def due(self, iteration: int, iterations: int) -> bool:
        every = self.cfg.every
        return every > 0 and (iteration % every == 0 or iteration == iterations)

    def __call__(
        self,
        policy: nn.Module,
        reference: nn.Module | None,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_new_tokens: int,
        iteration: int,
        show_progress: bool = False,
    ) -> dict[str, float]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + iteration) % 2**63)
            result = evaluate_policy(
                policy,
                tokenizer,
                self.examples,
                gold=self.gold,
                proxy=self.proxy,
                reference=reference,
                kl_samples=self.cfg.kl_samples,
                max_new_tokens=max_new_tokens,
                show_progress=show_progress,
            )
        summary = result.summary()
        keys = ("gold", "proxy", "kl", "length", "eos_rate", "repetition")
        return {f"eval/{k}": float(summary[k]) for k in keys if k in summary}


# ---------------------------------------------------------------------------------------------- the iteration loop


@dataclass(frozen=True)
class Iteration:
    """One iteration as `IterationLoop` hands it out."""

    index: int  # iterations done before this one
    examples: list[dict[str, Any]]  # this process's share of the batch's prompt examples
    keys: Tensor  # (len(examples) * group_size,) sampling keys of their rollout rows (`share_of_iteration`)
    kl_coef: float  # the KL coefficient of this iteration's rewards or loss
    step_before: int  # the engine's optimizer step when the iteration began


FLAT_ITERATIONS = 3
"""Iterations from a run's start whose completions all got one score before `IterationLoop` warns that the reward
gives no signal."""


class IterationLoop:
    """The loop of an online trainer around its algorithm, inside `with engine:`.

    It registers the data order, the KL controller and the hacking monitor with the engine and resumes the run
    (`engine.resume`); iterating yields the `Iteration`s left, stopping the process with a checkpoint first if a
    SIGTERM asked for it; `end` logs the iteration's metrics line (step metrics averaged over the iteration, the
    rollout's stats, `objective/kl_coef`, `<name>/iteration`, `<name>/episodes`, the evaluation when due, then
    the `perf` figures), writes samples, checkpoints when due and ends the loop when a stop rule fires.
    """

    def __init__(
        self,
        engine: Engine,
        cfg: Any,
        prompts: Sequence[dict[str, Any]],
        iterations: int,
        *,
        name: str,
        evaluator: OnlineEvaluator,
        reference: nn.Module | None,
        tokenizer: PreTrainedTokenizerBase,
    ) -> None:
        self.engine, self.cfg, self.prompts, self.iterations = engine, cfg, prompts, iterations
        self.name = name
        self.group_size = cfg.episodes_per_iteration // cfg.rollout.batch_size  # completions per prompt
        self.evaluator, self.reference, self.tokenizer = evaluator, reference, tokenizer
        group = cfg.data.group_by_length
        self.order = DataOrder.of_examples(prompts, cfg.rollout.batch_size, seed=cfg.seed, group_by_length=group)
        self.kl = kl_controller(cfg.kl)
        self.hacking = HackingMonitor()
        engine.register_state("data_order", self.order)
        engine.register_state("kl_controller", self.kl)
        engine.register_state("hacking", self.hacking)
        if engine.resume() and engine.is_main:
            print(f"rlhf: resumed at step {engine.step} (iteration {iterations_done(self.order)})", file=sys.stderr)
        self.samples = SampleLog(engine, cfg.samples_every, cfg.num_samples)
        self._stopped = False
        self._flat: int | None = 0  # iterations so far whose completions all got one score (None: some varied)

    def __iter__(self) -> Iterator[Iteration]:
        while not self._stopped and (done := iterations_done(self.order)) < self.iterations:
            if self.engine.should_stop():
                self.engine.interrupt()
            examples, keys = share_of_iteration(
                self.engine, self.order, self.prompts, seed=self.cfg.seed, iteration=done, group_size=self.group_size
            )
            yield Iteration(done, examples, keys, self.kl.value, self.engine.step)

    def rollout_stats(self, stats: dict[str, Tensor], experience: Experience) -> dict[str, float]:
        """The rollout's stats and hacking signals as means over the processes; the KL controller steered by their
        `objective/kl` (absent where no reference runs) over the iteration's episodes."""
        out = global_mean(self.engine, stats | self.hacking.stats(experience, self.engine.sum_over_processes))
        if "objective/kl" in out:
            self.kl.update(out["objective/kl"], self.cfg.episodes_per_iteration)
        self._check_signal(out, experience)
        return out

    def _check_signal(self, stats: dict[str, float], experience: Experience) -> None:
        """Warn once when every completion of the run's first `FLAT_ITERATIONS` iterations got the same score: the
        reward then teaches nothing (a reward function that fails to parse every completion, say)."""
        if self._flat is None:
            return
        self._flat = self._flat + 1 if stats["reward/score_std"] == 0 else None
        if self._flat == FLAT_ITERATIONS:
            self._flat = None
            if self.engine.is_main:
                logger.warning(
                    "every completion of the first %d iterations got the same score, %g (e.g. %r): the reward gives "
                    "no learning signal. Check the reward on such completions, or sample more varied ones "
                    "(rollout.temperature)",
                    FLAT_ITERATIONS,
                    stats["reward/score"],
                    experience.completions[0][:80],
                )

    def end(
        self,
        it: Iteration,
        logged: list[dict[str, float]],
        stats: dict[str, float],
        *,
        policy: nn.Module,
        completions: Sequence[str],
        scores: Tensor,
        perf: dict[str, float],
        extra: dict[str, float] | None = None,
    ) -> None:
        """Log, sample, checkpoint and check the stop rules after iteration `it` (`extra`: the algorithm's own
        metrics, after the loop's)."""
        done = it.index + 1
        line = (
            mean_metrics(logged)
            | stats
            | {
                "objective/kl_coef": it.kl_coef,
                f"{self.name}/iteration": float(done),
                f"{self.name}/episodes": float(done * self.cfg.episodes_per_iteration),
            }
            | (extra or {})
        )
        if self.evaluator.due(done, self.iterations):
            n = self.cfg.rollout.max_new_tokens
            show = self.engine.shows_progress
            line |= self.evaluator(
                policy, self.reference, self.tokenizer, max_new_tokens=n, iteration=done, show_progress=show
            )
        self.engine.log(line | perf)
        prompts = [ex["prompt"] for ex in it.examples for _ in range(self.group_size)]
        self.samples.maybe_write(self.engine.step, done, prompts, completions, scores.tolist())
        checkpoint_if_due(self.engine, it.step_before)
        if (reason := stop_reason(self.cfg.stop_when, line)) is not None:
            if self.engine.is_main:
                print(f"rlhf: stopping at iteration {done}: {reason}", file=sys.stderr)
            self._stopped = True

    def close(self) -> None:
        self.samples.close()
