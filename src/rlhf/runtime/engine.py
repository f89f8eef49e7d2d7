"""The shared step engine: one AdamW optimizer over one trainable module, on an `accelerate.Accelerator`.

Every trainer (SFT, reward model, DPO, KTO, PPO, ...) drives its updates through `Engine.train_step`, which
owns the parts that are easy to get subtly wrong and identical across algorithms:

* exact gradient accumulation: the step's gradient is that of (sum of per-unit losses over the whole global
  batch) / (global unit count), however the batch is split into micro-batches and processes;
* gradient clipping, a non-finite guard that skips a bad step without touching weights, optimizer or schedule;
* the LR schedule, deterministic metrics (`metrics.jsonl`), wall-clock figures (`perf.jsonl`), progress bar;
* atomic checkpoints and an exact resume (weights, optimizer, schedule, every RNG stream, registered states),
  refused when the config changed in a way that changes the computation, falling back to the previous
  checkpoint when one cannot be loaded, and never written while a non-finite streak is open;
* SIGTERM/SIGINT: finish the step, checkpoint, exit with EXIT_INTERRUPTED (75) so schedulers can requeue;
* at the end, `check_trained`: a run that made no update, or skipped too many, ends with an error, not a final/.

Host syncs: a step makes exactly one (reading the finite/stop flags after the all-reduce), plus one more on
logging steps (`logging.every`, and the last) to turn the metrics into Python floats, and a skipped step two to
print its loss and gradient norm. Nothing else calls `.item()`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, parse_flag_from_env, set_seed
from torch import Tensor, nn

from rlhf.config import CheckpointConfig, LoggingConfig, OptimConfig, ScheduleConfig, TrainConfig
from rlhf.errors import EXIT_INTERRUPTED, UserError
from rlhf.losses.reduce import wide_dtype
from rlhf.models import precision
from rlhf.runtime import allocator
from rlhf.runtime import checkpoint as ckpt
from rlhf.runtime.run_dir import RunLog, flatten, write_config
from rlhf.runtime.signals import StopSignals

logger = logging.getLogger(__name__)
T = TypeVar("T")


SCHEDULES = ("constant", "linear", "cosine")

LossFn = Callable[[nn.Module, Any], tuple[Tensor, Tensor | int | float, dict[str, Tensor]]]
"""loss_fn(model, micro_batch) -> (loss_sum, n_units, metric_sums); see `Engine.train_step`."""


class NonFiniteError(UserError, RuntimeError):
    """Training stopped because too many optimizer steps had a non-finite loss or gradient."""


class ConfigChangeError(UserError):
    """A resume whose config changes the computation of the checkpointed run. Exit status 2, like a config error."""

    exit_code = 2


IGNORED_ON_RESUME = ("logging.", "checkpoint.", "output_dir")
"""Config keys (prefixes) a resume may change freely: they change what is logged or saved, not what is computed."""
RUN_LENGTH = ("train.max_steps", "train.epochs", "total_episodes")
"""Config keys a resume may change with a report: the run gets longer (or shorter); the LR schedule keeps the
horizon it started with and holds its final value after it."""


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every setting that differs, keys of either side included."""
    a, b = flatten(old), flatten(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def lr_factor(step: int, schedule: ScheduleConfig, total_steps: int) -> float:
    """Multiplier of the peak LR for the optimizer step with 0-based index `step`.

    The curve of transformers' `get_*_schedule_with_warmup`, plus a floor: warmup `step / warmup_steps`
    (so the first step of a warmup has LR 0), then with `p = min(1, (step - warmup) / (total - warmup))`
    constant 1, linear `m + (1 - m)(1 - p)`, cosine `m + (1 - m) * 0.5 * (1 + cos(pi p))`, m = min_lr_ratio.

    Not `transformers.get_scheduler`, because it has no linear decay to a floor (`min_lr_ratio`): one function for
    the three curves rather than two sources. Where transformers has the curve (constant, linear and cosine
    without a floor, cosine with one), a test checks that ours equals it at every step up to the horizon; past it
    (a resumed run whose max_steps grew) ours stays at the floor where transformers' cosine rises again.
    """
    warmup, m = schedule.warmup_steps, schedule.min_lr_ratio
    if step < warmup:
        return step / warmup
    if schedule.name == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    decay = 1.0 - progress if schedule.name == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return m + (1.0 - m) * decay


def check_trackers(trackers: Sequence[str]) -> None:
    """Every requested tracker's package is installed (else it would log nothing, with only a Python warning)."""
    import accelerate.utils

    for name in trackers:
        available = getattr(accelerate.utils, f"is_{name}_available", None)
        if available is not None and not available():
            raise UserError(
                f"logging.trackers: {name} is not installed, so nothing would be logged there: "
                f"pip install 'rlhf[{name}]' (or {name}), or leave it out"
            )


def check_sharding() -> None:
    """Refuse a launch that asks for FSDP or DeepSpeed (`accelerate launch --use_fsdp / --use_deepspeed`, or an
    accelerate config saying so). The engine's checkpoints, the online trainers' generation and the scoring passes
    are written for whole parameters, not shards, and are untested under either; and on CPUs accelerate cannot
    shard at all: it quietly falls back to DDP, every process holding the whole model. See docs/scaling.md."""
    for name, flag in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED")):
        if parse_flag_from_env(flag):
            raise UserError(
                f"the launch asks for {name}, which rlhf does not support yet (its checkpoints, generation and "
                f"scoring passes work on whole parameters; on CPUs accelerate would run plain DDP instead). Launch "
                f"data parallelism: accelerate launch --multi_gpu --num_processes N -m rlhf train ... "
                f"(on CPUs with CUDA_VISIBLE_DEVICES=''); see docs/scaling.md"
            )


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two AdamW groups: decay on matrices, none on 1-D tensors (biases, norm scales)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    if not decay and not no_decay:
        raise ValueError("the model has no parameters with requires_grad=True: nothing to train")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class Engine:
    """One optimizer over one trainable module, on an accelerate.Accelerator. See the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        *,
        run_dir: Path,
        seed: int,
        optim: OptimConfig,
        schedule: ScheduleConfig,
        train: TrainConfig,
        logging: LoggingConfig,
        checkpoint: CheckpointConfig,
        total_steps: int,
        config_dict: dict[str, Any] | None = None,
        data_report: dict[str, float] | None = None,
    ) -> None:
        if schedule.name not in SCHEDULES:
            raise ValueError(f"schedule.name {schedule.name!r}: expected one of {', '.join(SCHEDULES)}")
        self.run_dir = Path(run_dir)
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise UserError(f"output_dir: {self.run_dir} exists and is not a directory")
        check_trackers(logging.trackers)
        check_sharding()
        self.seed, self.total_steps = seed, total_steps
        self.schedule_total = total_steps  # the LR schedule's horizon: the run's first total, kept on resume
        self.optim_cfg, self.schedule_cfg, self.train_cfg = optim, schedule, train
        self.logging_cfg, self.checkpoint_cfg = logging, checkpoint
        self.accelerator = Accelerator(
            mixed_precision=train.mixed_precision,
            cpu=not torch.cuda.is_available(),
            log_with=list(logging.trackers) or None,
            project_dir=str(self.run_dir),
            # accelerate would otherwise step the schedule num_processes times per optimizer step
            step_scheduler_with_optimizer=False,
        )
        self.world_size, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.is_main, self.device = self.accelerator.is_main_process, self.accelerator.device
        if self.device.type == "cpu":
            allocator.keep_freed_memory()
        set_seed(seed)
        # fused: one kernel over all parameters; measured 3-4x faster than the default per-tensor loop on CPU
        # (0.49 -> 0.11 ms at 0.1M parameters, 2.57 -> 0.79 ms at 2.7M).
        optimizer = torch.optim.AdamW(
            param_groups(model, optim.weight_decay),
            lr=optim.lr,
            betas=(optim.beta1, optim.beta2),
            eps=optim.eps,
            fused=self.device.type in ("cpu", "cuda"),
        )
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        precision.mark_autocast(model, train.mixed_precision)
        # Not prepared on purpose: accelerate's scheduler wrapper steps once per process per call.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer.optimizer, lambda s: lr_factor(s, schedule, self.schedule_total)
        )
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        self._acc_dtype = wide_dtype(self.device)
        self.step = self.nonfinite_skips = self.consecutive_nonfinite = self.bad_skips = 0
        self._config = config_dict
        self._states: dict[str, Any] = {}
        self._per_rank: set[str] = set()
        self._started = False
        self._last_saved_step = -1
        self._last_saved_at = time.monotonic()  # for checkpoint.every_minutes (read on the main process)
        self._save_due = False  # the main process found every_minutes passed (agreed at the last train_step)
        self._signals = StopSignals(announce=self.is_main)  # this process got SIGTERM/SIGINT
        self._stop_global = False  # any process did (agreed at the last train_step)
        tracker_log = self.accelerator.log if logging.trackers else None
        self._runlog = RunLog(self.run_dir, logging, total_steps, enabled=self.is_main, tracker_log=tracker_log)
        self._units_since_log = torch.zeros((), dtype=self._acc_dtype, device=self.device)
        self._data_report = dict(data_report or {})
        self._report_pending = False
        self._closed = False
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)  # config.yaml is written once the run (re)starts
        if logging.trackers:
            self.accelerator.init_trackers("rlhf", config=flatten(config_dict or {}))
            started = {t.name for t in self.accelerator.trackers}
            missing = [t for t in logging.trackers if t not in started]
            if self.is_main and missing:
                raise UserError(f"logging.trackers: {', '.join(missing)} did not start; nothing would be logged there")
        self._signals.install()
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ batches

    @property
    def unwrapped_model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    @property
    def shows_progress(self) -> bool:
        """Whether this process draws progress bars: the main one, with `logging.progress` on."""
        return self.is_main and self.logging_cfg.progress

    def gather(self, obj: T) -> list[T]:
        """Every process's `obj` (picklable), in rank order, on every process: `[obj]` in one process."""
        return gather_object([obj]) if self.world_size > 1 else [obj]

    def sum_over_processes(self, x: Tensor) -> Tensor:
        """`x` summed elementwise over the processes (one all-reduce; `x` itself in one process): the
        `rlhf.losses.reduce.SumOver` that makes batch statistics global under data parallelism."""
        return self.accelerator.reduce(x, reduction="sum") if self.world_size > 1 else x

    def micro_batches_per_step(self) -> int:
        """Micro-batches per process per optimizer step: batch_size // (micro_batch_size * world_size)."""
        per_pass = self.train_cfg.micro_batch_size * self.world_size
        if self.train_cfg.batch_size % per_pass:
            raise ValueError(
                f"train.batch_size ({self.train_cfg.batch_size}) must be a multiple of train.micro_batch_size "
                f"({self.train_cfg.micro_batch_size}) x processes ({self.world_size})"
            )
        return self.train_cfg.batch_size // per_pass

    def local_indices(self, global_indices: Sequence[int], lengths: Sequence[int] | None = None) -> list[list[int]]:
        """This process's micro-batches of a global batch: rank r takes items r, r+W, ... in chunks of micro size.

        Every process passes the same global batch. Its length must be a multiple of the world size; a final
        micro-batch may be shorter when the share is not a multiple of micro_batch_size.

        `lengths`: the token count of each dataset index (`rlhf.data.tokenize.example_tokens`), for micro-batches that
        are padded. A batch that is split at all (over processes, or into several micro-batches) is then first put
        longest first (a stable sort), so that each micro-batch holds examples of like length and pads little, and the
        first micro-batch is the largest, so a micro_batch_size too large for memory fails at once. Random micro-batches
        of 4 out of 64 examples of a long-tailed length distribution hold ~1.9x their real tokens, sorted ones ~1.14x;
        padded SFT at hidden 256 with lengths spread over 20-280 tokens trained 1.56x faster (benchmarks/README.md).
        Padding-free micro-batches gain nothing measurable from it (their attention blocks already group lengths) and
        would meet more distinct row counts, which oneDNN builds kernels for: trainers pass no lengths for them.
        The step's gradient is the same for any split (`train_step`): only the float summation order changes.
        """
        if len(global_indices) % self.world_size:
            raise ValueError(f"a global batch of {len(global_indices)} does not split over {self.world_size} processes")
        size = self.train_cfg.micro_batch_size
        batch = list(global_indices)
        if lengths is not None and (self.world_size > 1 or len(batch) > size):
            batch.sort(key=lambda i: -lengths[i])
        mine = batch[self.rank :: self.world_size]
        return [mine[i : i + size] for i in range(0, len(mine), size)]

    def register_state(self, name: str, obj: Any, *, per_rank: bool = False) -> None:
        """Save `obj.state_dict()` in every checkpoint and `obj.load_state_dict(...)` it on resume.

        Plain data (str-keyed dicts, lists, numbers, strings) is stored as JSON, anything else (tensors,
        tuples) with torch.save and loaded with weights_only=True. `per_rank=True` keeps one copy per
        process (e.g. a per-rank generator); otherwise the main process's copy is saved and every rank loads it.
        """
        ckpt.check_state_name(name)
        if name in self._states:
            raise ValueError(f"a state named {name!r} is already registered")
        self._states[name] = obj
        if per_rank:
            self._per_rank.add(name)

    # ------------------------------------------------------------------ the step

    def train_step(self, micro_batches: Sequence[Any], loss_fn: LossFn) -> dict[str, float] | None:
        """One optimizer step over this process's micro-batches of the global batch.

        `loss_fn(model, micro_batch) -> (loss_sum, n_units, metric_sums)`:
          loss_sum     the loss SUMMED over the micro-batch's units (tokens for token-mean losses, sequences
                       for per-sequence losses), a scalar tensor with grad; call `model` (the prepared one).
          n_units      how many units the sum is over (int or scalar tensor; need not be known in advance).
          metric_sums  detached scalar tensors, also SUMS over the same units; the engine reports
                       sum over the global batch / global units (a unit-weighted mean). Same keys every call.
        Each loss_sum is backpropagated as it is; once every micro-batch is done, the gradients are multiplied
        by world_size / global_units (DDP averaged them over processes), which makes the step's gradient
        exactly grad[(sum of loss_sum over the global batch) / (global units)] for any split. A step with zero
        units gets a zero gradient.
        Then clipping to optim.max_grad_norm (0: off) and the non-finite guard: if the loss or gradient norm
        is NaN/inf, weights, optimizer state and LR schedule are left untouched, gradients are zeroed, and
        the step is counted as skipped (`train/nonfinite_skips`); train.max_consecutive_nonfinite skips in
        a row (<= 0: never) raise NonFiniteError. A skipped step still advances `step`, so the data order
        stays aligned; the LR schedule does not advance (it counts applied updates).
        Returns Python floats on logging steps (step % logging.every == 0, and the run's last step), else None:
        `train/loss`, `train/grad_norm` (before clipping), `train/lr` (used by this step), `train/units`,
        `train/nonfinite_skips`, the loss_fn metrics under their own keys, and `perf/*` wall-clock figures.
        Pass the dict to `log()`.
        """
        if not micro_batches:
            raise ValueError("train_step needs at least one micro-batch on every process")
        self._ensure_started()
        is_log_step = (self.step + 1) % max(1, self.logging_cfg.every) == 0 or self.step + 1 == self.total_steps
        zero = torch.zeros((), dtype=self._acc_dtype, device=self.device)
        loss_sum_local, units_local = zero.clone(), zero.clone()
        metric_sums: dict[str, Tensor] = {}
        for i, mb in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(self.model):
                loss_sum, n_units, metrics = loss_fn(self.model, mb)
                self.accelerator.backward(loss_sum)
            loss_sum_local += loss_sum.detach().to(self._acc_dtype)
            units_local += torch.as_tensor(n_units, device=self.device).to(self._acc_dtype)
            if is_log_step:
                for k, v in metrics.items():
                    v = torch.as_tensor(v, device=self.device).detach().to(self._acc_dtype)
                    metric_sums[k] = metric_sums[k] + v if k in metric_sums else v

        # [loss_sum, units, stop, save due]: one all-reduce gives the normaliser, and a stop decision and a
        # time-based checkpoint decision that all ranks share.
        flags_local = torch.tensor(
            [float(self._signals.requested), float(self._minutes_passed())], dtype=self._acc_dtype, device=self.device
        )
        stats = torch.cat([torch.stack([loss_sum_local, units_local]), flags_local])
        if self.world_size > 1:
            stats = self.accelerator.reduce(stats, reduction="sum")
        units = torch.where(stats[1] > 0, stats[1], torch.ones_like(stats[1]))
        loss = stats[0] / units
        self._units_since_log += stats[1]

        self.accelerator.unscale_gradients()  # fp16 loss scaling; a no-op otherwise
        grads = [p.grad for p in self._params if p.grad is not None]
        scale = (self.world_size / units).float()
        # Normalising and clipping in one pass: ||scale * g|| = scale * ||g||.
        grad_norm = torch.nn.utils.get_total_norm(grads).float() * scale if grads else scale * 0
        mult = scale
        if self.optim_cfg.max_grad_norm > 0:
            mult = scale * torch.clamp(self.optim_cfg.max_grad_norm / (grad_norm + 1e-6), max=1.0)
        if grads:
            torch._foreach_mul_(grads, mult.to(grads[0].device))
        flags = torch.stack([torch.isfinite(loss), torch.isfinite(grad_norm), stats[2] > 0, stats[3] > 0])
        loss_ok, grad_ok, stop_any, save_due = flags.tolist()  # the step's one host sync

        lr = self.optimizer.optimizer.param_groups[0]["lr"]  # what this step applies (the schedule set it)
        if loss_ok and grad_ok:
            self.optimizer.step()
            self.scheduler.step()
            self.consecutive_nonfinite = 0
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self._stop_global = bool(stop_any)
        self._save_due = self._save_due or bool(save_due)
        self._runlog.advance(self.step)
        if not (loss_ok and grad_ok):
            self._skipped(loss_ok, f"loss {loss.item()}, gradient norm {grad_norm.item()}")
        return self._step_metrics(loss, grad_norm, stats[1], lr, metric_sums, units) if is_log_step else None

    def _skipped(self, loss_ok: bool, values: str) -> None:
        """Bookkeeping of a skipped update (weights, optimizer state and LR schedule were left alone)."""
        self.nonfinite_skips += 1
        scaler = self.accelerator.scaler
        if scaler is not None:
            scaler.update()  # let fp16 loss scaling back off (it recorded the inf in unscale_gradients)
        # An fp16 overflow with a finite loss is the loss scaler's normal business, not a divergence.
        if not (loss_ok and scaler is not None):
            self.consecutive_nonfinite += 1
            self.bad_skips += 1
        logger.warning(
            "step %d: update skipped, non-finite %s (%d in a row)", self.step, values, self.consecutive_nonfinite
        )
        limit = self.train_cfg.max_consecutive_nonfinite
        if limit > 0 and self.consecutive_nonfinite >= limit:  # 0: never
            raise NonFiniteError(
                f"{self.consecutive_nonfinite} optimizer steps in a row had a non-finite loss or gradient "
                f"(up to step {self.step}); stopping. Lower optim.lr, keep optim.max_grad_norm > 0, check the "
                "data for empty or broken examples, or use bf16 instead of fp16."
            )

    def _step_metrics(
        self, loss: Tensor, grad_norm: Tensor, units: Tensor, lr: float, metric_sums: dict[str, Tensor], denom: Tensor
    ) -> dict[str, float]:
        keys = sorted(metric_sums)
        if keys:
            vec = torch.stack([metric_sums[k] for k in keys])
            if self.world_size > 1:
                vec = self.accelerator.reduce(vec, reduction="sum")
            vec = vec / denom
        else:
            vec = torch.zeros(0, dtype=self._acc_dtype, device=self.device)
        head = torch.stack([loss, grad_norm.to(self._acc_dtype), units, self._units_since_log])
        values = torch.cat([head, vec]).tolist()  # the logging step's second host sync
        out = {
            "train/loss": values[0],
            "train/grad_norm": values[1],
            "train/lr": lr,
            "train/units": values[2],
            "train/nonfinite_skips": float(self.nonfinite_skips),
            **dict(zip(keys, values[4:], strict=True)),
            **self._runlog.throughput(self.step, self.train_cfg.batch_size, values[3]),
        }
        self._units_since_log.zero_()
        return out

    # ------------------------------------------------------------------ logging

    def log(self, metrics: dict[str, float], *, step: int | None = None) -> None:
        """Append {"step": N, **metrics} to metrics.jsonl (keys under `perf/` go to perf.jsonl instead),
        send everything to the configured trackers, and update the progress bar. Main process only; a no-op
        elsewhere. Values should be Python numbers (a tensor is converted, at the cost of a host sync).
        The run's first metrics line also carries the engine's `data_report` (what the data was)."""
        self._ensure_started()
        values = {k: float(v) if isinstance(v, Tensor) else v for k, v in metrics.items()}
        if self._report_pending and any(not k.startswith("perf/") for k in values):
            values = self._data_report | values
            self._report_pending = False
        self._runlog.log(values, self.step if step is None else step)

    def log_perf(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Append wall-clock figures to perf.jsonl (never to metrics.jsonl, which must be deterministic)."""
        self._ensure_started()
        self._runlog.log_perf(metrics, self.step if step is None else step)

    def _ensure_started(self) -> None:
        """First use without resume(): a fresh start, so stale step logs of an earlier run are cleared."""
        if not self._started:
            self._begin(self.step, fresh=True)

    def _begin(self, step: int, *, fresh: bool) -> None:
        if self.is_main and self._config is not None:
            write_config(self.run_dir, self._config)
        self._runlog.start(step, fresh=fresh)
        self._report_pending = bool(self._data_report) and not self._runlog.has_metrics()
        self._started = True
        self._units_since_log.zero_()

    # ------------------------------------------------------------------ checkpoints

    def _minutes_passed(self) -> bool:
        """On the main process: checkpoint.every_minutes (> 0) have passed since the last checkpoint or the start."""
        minutes = self.checkpoint_cfg.every_minutes
        return self.is_main and minutes > 0 and time.monotonic() - self._last_saved_at >= 60 * minutes

    def checkpoint_due(self, step_before: int | None = None) -> bool:
        """Whether a checkpoint is due now: the steps since `step_before` (default: the step before this one)
        reached a multiple of checkpoint.every, or checkpoint.every_minutes passed (agreed by all processes at a
        train_step). The same answer on every process."""
        if self.step == self._last_saved_step:
            return False
        every, before = self.checkpoint_cfg.every, self.step - 1 if step_before is None else step_before
        return (every > 0 and self.step // every > before // every) or self._save_due

    def maybe_save_checkpoint(self) -> None:
        """Save when a checkpoint is due (`checkpoint_due`; call after each train_step)."""
        if self.checkpoint_due():
            self.save_checkpoint()

    def save_checkpoint(self) -> Path | None:
        """Write `checkpoints/step-N` atomically (see checkpoint.py), then prune to checkpoint.keep_last.

        Not while a non-finite streak is open (the last step was skipped): weights that diverged may still be
        finite, and a checkpoint of them would push the good ones out. Returns None then.
        """
        if self.consecutive_nonfinite > 0:
            logger.warning(
                "step %d: no checkpoint while a non-finite streak is open (%d step(s)); the earlier ones are kept",
                self.step,
                self.consecutive_nonfinite,
            )
            return None
        root = self.run_dir / "checkpoints"
        final = root / ckpt.step_dir_name(self.step)
        model = self.unwrapped_model
        # every rank checks (DDP keeps weights identical), so all of them raise together
        ckpt.check_finite(model.state_dict().items(), f"checkpoint step-{self.step}")
        mine = (self.rank, ckpt.capture_rng_state(), {n: self._states[n].state_dict() for n in self._per_rank})
        per_rank = self.gather(mine)
        if self.is_main:
            ckpt.write_checkpoint(
                root,
                self.step,
                model,
                optimizer_state=self.optimizer.state_dict(),
                scheduler_state=self.scheduler.state_dict(),
                per_rank=per_rank,
                states={n: obj.state_dict() for n, obj in self._states.items() if n not in self._per_rank},
                trainer_state={"world_size": self.world_size, **self._counters()},
                keep_last=self.checkpoint_cfg.keep_last,
                config=self._config,
            )
        self.accelerator.wait_for_everyone()
        self._last_saved_step, self._last_saved_at, self._save_due = self.step, time.monotonic(), False
        return final

    def resume(self) -> bool:
        """Restore from the checkpoint that checkpoint.resume names; False means a fresh start.

        Restores weights, optimizer, LR schedule, every RNG stream of this process, registered states, the
        step and the non-finite counters, and cuts metrics.jsonl / perf.jsonl / samples.jsonl back to the
        restored step, so the resumed run's metrics.jsonl equals an uninterrupted run's byte for byte.
        With `auto`, a checkpoint that cannot be loaded is a warning and the previous one is tried; only when
        none loads is it an error. A config that differs from the checkpoint's in what it computes is refused
        (`ConfigChangeError`, listing the differences) unless checkpoint.allow_config_change is set.
        """
        choice: list[Any] = [[], None, False]  # candidate paths, an error, whether the user named the checkpoint
        if self.is_main:
            try:
                paths, named = ckpt.resume_candidates(self.run_dir, self.checkpoint_cfg.resume)
                choice = [[str(p) for p in paths], None, named]
            except ckpt.CheckpointError as e:
                choice[1] = str(e)
        if self.world_size > 1:
            broadcast_object_list(choice)
        candidates, error, named = choice
        if error is not None:
            raise ckpt.CheckpointError(error)
        if not candidates:
            self._begin(self.step, fresh=True)
            return False
        self._check_config(Path(candidates[0]))
        failures = []
        for path in map(Path, candidates):
            try:
                self._load_checkpoint(path)
                break
            except ckpt.CheckpointError as e:
                if named:
                    raise
                failures.append(str(e))
                logger.warning("cannot resume from %s: %s; trying the previous checkpoint", path.name, e)
        else:
            raise ckpt.CheckpointError(
                f"no checkpoint in {self.run_dir / 'checkpoints'} could be loaded ({len(failures)} tried; the "
                f"newest: {failures[0]}); start fresh with --checkpoint.resume never"
            )
        self._begin(self.step, fresh=False)
        if self.is_main:
            logger.info("resumed from %s at step %d", path, self.step)
        self.accelerator.wait_for_everyone()
        return True

    def _check_config(self, path: Path) -> None:
        """Refuse, or report, what the config of this run changes against the checkpoint's (`config.json`)."""
        old = ckpt.load_config_file(path)
        if old is None or self._config is None:
            return
        changes = [c for c in config_changes(old, self._config) if not c[0].startswith(IGNORED_ON_RESUME)]
        refused = [c for c in changes if c[0] not in RUN_LENGTH]
        listed = "; ".join(f"{k} {a!r} -> {b!r}" for k, a, b in (refused or changes))
        if refused and not self.checkpoint_cfg.allow_config_change:
            raise ConfigChangeError(
                f"{path} was written with another config: {listed}. Start fresh with --checkpoint.resume never (or "
                "another output_dir), or resume with these changes: --checkpoint.allow_config_change"
            )
        if changes and self.is_main:
            logger.warning("resuming %s with changed settings: %s", path, listed)

    def _counters(self) -> dict[str, int]:
        return {
            "nonfinite_skips": self.nonfinite_skips,
            "consecutive_nonfinite": self.consecutive_nonfinite,
            "bad_skips": self.bad_skips,
            "schedule_total_steps": self.schedule_total,
        }

    def _apply_optim_config(self) -> None:
        """The optimizer's hyperparameters as this run's config says, not as the checkpoint saved them: loading
        an optimizer state also restores each group's lr, betas, eps and weight decay, which would silently undo a
        change the user allowed (`checkpoint.allow_config_change`). Unchanged, they are the same numbers."""
        cfg = self.optim_cfg
        self.scheduler.base_lrs = [cfg.lr for _ in self.scheduler.base_lrs]
        factor = lr_factor(self.scheduler.last_epoch, self.schedule_cfg, self.schedule_total)
        for group in self.optimizer.optimizer.param_groups:
            decays = group["params"][0].ndim >= 2  # `param_groups`: matrices decay, 1-D tensors do not
            group.update(betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay if decays else 0.0)
            group.update(initial_lr=cfg.lr, lr=cfg.lr * factor)

    def _load_checkpoint(self, path: Path) -> None:
        state = ckpt.load_checkpoint(
            path,
            self.unwrapped_model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            states={(f"{n}-rank{self.rank}" if n in self._per_rank else n): obj for n, obj in self._states.items()},
            rank=self.rank,
            device=self.device,
        )
        self.step = self._last_saved_step = int(state["step"])
        self.nonfinite_skips = int(state["nonfinite_skips"])
        self.consecutive_nonfinite = int(state["consecutive_nonfinite"])
        self.bad_skips = int(state.get("bad_skips", self.nonfinite_skips))
        self.schedule_total = int(state.get("schedule_total_steps", self.total_steps))
        self._apply_optim_config()
        if self.schedule_total != self.total_steps and self.is_main:
            final = lr_factor(self.schedule_total, self.schedule_cfg, self.schedule_total) * self.optim_cfg.lr
            logger.warning(
                "the run is now %d steps (it was %d): the learning-rate schedule keeps its %d-step horizon and "
                "holds its final value %.3g after it%s",
                self.total_steps,
                self.schedule_total,
                self.schedule_total,
                final,
                " (0: the steps after it change nothing; set schedule.min_lr_ratio)" if final == 0 else "",
            )
        if state["world_size"] != self.world_size:
            logger.warning("checkpoint from %d processes, resuming on %d", state["world_size"], self.world_size)

    # ------------------------------------------------------------------ stopping and the end

    def should_stop(self) -> bool:
        """True once SIGTERM/SIGINT arrived (with several processes: on any of them, as of the last step)."""
        return self._signals.requested if self.world_size == 1 else self._stop_global

    def interrupt(self) -> NoReturn:
        """Checkpoint the current step (unless it just was), close, and exit with EXIT_INTERRUPTED (75)."""
        path = self.run_dir / "checkpoints" / ckpt.step_dir_name(self.step)
        saved: Path | None = path
        if self._last_saved_step != self.step or not (path / ckpt.MANIFEST).is_file():
            saved = self.save_checkpoint()
        if self.is_main:
            where = f"checkpoint {saved}" if saved is not None else "no checkpoint (a non-finite streak is open)"
            print(
                f"rlhf: interrupted at step {self.step}; {where}. Run the same command again to resume from the "
                "newest complete checkpoint (checkpoint.resume: auto).",
                file=sys.stderr,
                flush=True,
            )
        self.close()
        raise SystemExit(EXIT_INTERRUPTED)

    def check_trained(self) -> None:
        """Before the final model is saved: a run whose every step was skipped, or more than
        train.max_nonfinite_fraction of them for a non-finite loss or gradient, raises NonFiniteError (the
        weights are what they were, or worse), so it never looks like a finished run."""
        if self.step == 0:
            return
        advice = "Lower optim.lr, keep optim.max_grad_norm > 0, check the data and the reward for huge values."
        if self.nonfinite_skips == self.step:
            raise NonFiniteError(
                f"none of the {self.step} optimizer steps made an update (every loss or gradient was non-finite, see "
                f"train/nonfinite_skips); final/ is not written. {advice}"
            )
        limit, fraction = self.train_cfg.max_nonfinite_fraction, self.bad_skips / self.step
        if fraction > limit:
            raise NonFiniteError(
                f"{self.bad_skips} of {self.step} optimizer steps ({fraction:.0%}) were skipped for a non-finite loss "
                f"or gradient, more than train.max_nonfinite_fraction ({limit:g}); final/ is not written. {advice}"
            )

    def save_final(self, model_to_save: nn.Module, tokenizer: Any = None, *, subdir: str = "final") -> Path:
        """`save_pretrained` (safetensors) of the model and tokenizer into run_dir/<subdir>, atomically.

        Main process writes into a temporary sibling and renames it; all processes return the path. Refuses
        (CheckpointError) to write non-finite weights.
        """
        self.accelerator.wait_for_everyone()
        out = self.run_dir / subdir
        if self.is_main:
            ckpt.save_pretrained_atomic(self.accelerator.unwrap_model(model_to_save), tokenizer, out)
        self.accelerator.wait_for_everyone()
        return out

    def close(self) -> None:
        """Close the progress bar and logs, end trackers (and the process group), restore signal handlers."""
        if self._closed:
            return
        self._closed = True
        self._runlog.close()
        self.accelerator.end_training()
        self._signals.restore()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
