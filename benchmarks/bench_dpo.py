"""DPO throughput and memory against TRL's DPOTrainer: same model, data, batch, lengths, steps and optimizer.

    /tmp/benchvenv/bin/python benchmarks/bench_dpo.py [--hidden 256 --layers 4 --pairs 256 --epochs 2 --repeats 2]

The driver builds one tiny llama (rlhf.tasks.tiny, hidden 256 x 4 layers by default, so the model's compute
dominates) and the built-in task's preference pairs, then runs trials in child processes, alternating ours
and TRL's so that background load hits both alike:

    ours/live   `rlhf train dpo`, the reference (a frozen copy) scored on the fly every step
    trl/live    trl.DPOTrainer with its defaults for the reference (a copy, scored every step)
    ours/cache  `precompute_ref: true`: the reference scores the data once, cached in run_dir/ref_logps/
    trl/cache   DPOConfig(precompute_ref_log_probs=True), TRL's own precomputation

Each child times the whole job a user waits for - load the model and tokenizer, tokenize the data, (precompute),
train every step, save the final model - and, separately, the training loop alone. It reports peak RSS (a
sampler thread reading /proc/self/statm every 2 ms; `rss_growth_mb` is the part above the RSS after the imports,
i.e. what the job itself allocated) and the final logged loss.
One JSON object per trial goes to stdout, then a summary with the medians and the ours/TRL ratios. `--profile`
adds each trial's top ops (torch.profiler over the steps after the first log line up to the second: host time,
and kernel time on a GPU, with calls per step), `--attribute` (CPU) every op of those steps timed alone, by kind,
with the ops a step; both at the cost of their overhead in the timings.

Settings shared by both: sigmoid loss, beta 0.1, batch 16 pairs in one micro-batch, AdamW lr 5e-4 with a linear
decay and no warmup, gradient clipping at 1.0, fp32 (`--precision bf16`: bf16 mixed precision on both sides), no
gradient checkpointing, dropout off, a log line every 8 steps, no evaluation, no intermediate checkpoints, CPU
(`--device cuda`: the GPU), one intra-op thread by default (`--threads`): on a small machine shared with other
jobs, a 2-thread run mostly measures how often the other thread was preempted (torch's parallel regions wait for
their slowest thread), which swamps any difference between the two trainers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import (  # noqa: E402
    StepWindow,
    add_side_arguments,
    add_watch_arguments,
    device,
    lengths,
    machine,
    mixed_precision,
    peak_memory_mib,
    print_result,
    run_trial,
    step_watch,
    traced_train_steps,
    trial_env,
    write_data,
)

BATCH = 16
LR = 5e-4
LOG_EVERY = 8
FLAGS = ("profile", "attribute", "ours-padded")
"""The switches a trial gets from the driver's command line as they are."""


# ---------------------------------------------------------------------------------------------- memory


class PeakRSS:
    """Peak resident set size of this process while active, sampled from /proc/self/statm every 2 ms."""

    def __init__(self) -> None:
        self.peak = self.start = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


# ---------------------------------------------------------------------------------------------- the two jobs


def run_ours(args: argparse.Namespace, out: str, watch: StepWindow | None) -> dict[str, Any]:
    """Our job on the trial's `args` (model, data, epochs, reference setting, precision, context)."""
    from rlhf.config import load_config
    from rlhf.trainers import dpo

    overrides = {
        "output_dir": out,
        "loss_type": "sigmoid",
        "beta": 0.1,
        "precompute_ref": args.ref == "cache",
        "model.path": args.model,
        "data.train": args.data,
        "data.max_length": lengths(args.context)[0],
        "data.max_prompt_length": lengths(args.context)[1],
        "optim.lr": LR,
        "optim.max_grad_norm": 1.0,
        "schedule.name": "linear",
        "train.batch_size": BATCH,
        "train.micro_batch_size": BATCH,
        "train.epochs": args.epochs,
        "logging.every": LOG_EVERY,
        "logging.progress": False,
        "checkpoint.resume": "never",
        "train.mixed_precision": mixed_precision(args.precision),
    }
    if args.ours_padded:  # TRL's layout: [prompt | chosen] and [prompt | rejected] as two padded rows
        overrides |= {"share_prompt": False, "data.padding_free": False}
    from rlhf.runtime.engine import Engine

    marks: dict[str, float] = {}
    resume, save_final = Engine.resume, Engine.save_final

    def timed_resume(self: Engine) -> bool:
        marks["begin"] = time.process_time()
        return resume(self)

    def timed_save_final(self: Engine, *a: Any, **kw: Any) -> Any:
        marks["end"] = time.process_time()
        return save_final(self, *a, **kw)

    Engine.resume, Engine.save_final = timed_resume, timed_save_final  # type: ignore[method-assign]
    cfg = load_config(
        dpo.Config, None, [f"--{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in overrides.items()]
    )
    tick = None if watch is None else lambda engine: watch.tick(engine.step)
    with traced_train_steps(tick) as step_losses:
        run_dir = dpo.train(cfg)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    perf = [json.loads(line) for line in (run_dir / "perf.jsonl").read_text().splitlines()]
    return {
        "steps": lines[-1]["step"],
        "final_loss": lines[-1]["train/loss"],
        "mean_loss": sum(step_losses) / len(step_losses),
        "loop_s": perf[-1]["perf/elapsed_s"],
        "loop_cpu_s": marks["end"] - marks["begin"],
    }


def run_trl(args: argparse.Namespace, out: str, watch: StepWindow | None) -> dict[str, Any]:
    """TRL's job on the trial's `args`, as `run_ours`."""
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    marks: dict[str, float] = {}

    class LoopClock(TrainerCallback):  # CPU time of the training loop alone (after TRL's __init__ precompute)
        def on_train_begin(self, *a: Any, **kw: Any) -> None:
            marks["begin"] = time.process_time()

        def on_train_end(self, *a: Any, **kw: Any) -> None:
            marks["end"] = time.process_time()

    class Watch(TrainerCallback):
        def on_step_end(self, _args: Any, state: Any, *a: Any, **kw: Any) -> None:
            watch.tick(state.global_step)

    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()]
    dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    config = DPOConfig(
        output_dir=out,
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1,
        num_train_epochs=args.epochs,
        learning_rate=LR,
        lr_scheduler_type="linear",
        warmup_steps=0,
        max_grad_norm=1.0,
        beta=0.1,
        loss_type=["sigmoid"],
        max_length=lengths(args.context)[0],
        precompute_ref_log_probs=args.ref == "cache",
        gradient_checkpointing=False,
        bf16=args.precision == "bf16",
        fp16=False,
        use_cpu=device() == "cpu",
        logging_steps=LOG_EVERY,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = DPOTrainer(
        model=args.model,
        args=config,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(args.model),
        callbacks=[LoopClock()] + ([] if watch is None else [Watch()]),
    )
    result = trainer.train()
    trainer.save_model(out + "/final")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "steps": trainer.state.global_step,
        "final_loss": losses[-1],
        "mean_loss": result.training_loss,  # the Trainer's mean of every step's loss
        "loop_s": result.metrics["train_runtime"],
        "loop_cpu_s": marks["end"] - marks["begin"],
    }


def child(args: argparse.Namespace) -> None:
    """One trial; prints one JSON line. Imports happen before the clock starts (TRL's are the heavier)."""
    if args.impl == "trl":
        import datasets  # noqa: F401
        import trl  # noqa: F401
    else:
        import rlhf.trainers.dpo  # noqa: F401
    with tempfile.TemporaryDirectory() as tmp, PeakRSS() as rss:
        start, cpu_start = time.perf_counter(), time.process_time()
        job = run_ours if args.impl == "ours" else run_trl
        watch = step_watch(args, LOG_EVERY, 2 * LOG_EVERY)
        result = job(args, tmp + "/run", watch)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    pairs = result["steps"] * BATCH
    record = {
        "impl": args.impl,
        "ref": args.ref,
        "pairs": pairs,
        "wall_s": round(wall, 3),
        "pairs_per_s": round(pairs / wall, 2),
        "cpu_s": round(cpu, 3),
        "loop_pairs_per_s": round(pairs / result["loop_s"], 2),
        "cpu_pairs_per_s": round(pairs / cpu, 2),
        "loop_cpu_pairs_per_s": round(pairs / result["loop_cpu_s"], 2),
        "peak_rss_mb": round(rss.peak / 2**20, 1),
        "rss_growth_mb": round((rss.peak - rss.start) / 2**20, 1),
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_memory_mib": round(peak_memory_mib(), 1),  # the GPU allocator's peak on CUDA
        "final_loss": round(result["final_loss"], 4),  # ours: the last step's; TRL: its last interval's mean
        "mean_loss": round(result["mean_loss"], 4),  # over every step of the run, the same statistic on both sides
    }
    if watch is not None:
        record |= watch.report()
    print_result(record)


# ---------------------------------------------------------------------------------------------- driver


def prepare(root: Path, args: argparse.Namespace) -> tuple[str, str]:
    from rlhf.tasks.tiny import make_tiny_checkpoint

    files = write_data(root / "data", n_train=args.pairs, n_eval=8, context=args.context, spread=args.context_spread)
    model = make_tiny_checkpoint(
        root / "model", "llama", hidden_size=args.hidden, num_layers=args.layers, num_heads=4, seed=0
    )
    return str(model), str(files["preference"])


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for ref in ("live", "cache"):
        med = {}
        for impl in ("ours", "trl"):
            rs = [r for r in records if r["impl"] == impl and r["ref"] == ref]
            if rs:
                med[impl] = {
                    k: round(statistics.median(r[k] for r in rs), 3) for k in rs[0] if isinstance(rs[0][k], float | int)
                }
        if len(med) == 2:
            out.append(
                {
                    "summary": ref,
                    "ours_pairs_per_s": med["ours"]["pairs_per_s"],
                    "trl_pairs_per_s": med["trl"]["pairs_per_s"],
                    "speedup": round(med["ours"]["pairs_per_s"] / med["trl"]["pairs_per_s"], 2),
                    "loop_speedup": round(med["ours"]["loop_pairs_per_s"] / med["trl"]["loop_pairs_per_s"], 2),
                    "cpu_speedup": round(med["ours"]["cpu_pairs_per_s"] / med["trl"]["cpu_pairs_per_s"], 2),
                    "loop_cpu_speedup": round(
                        med["ours"]["loop_cpu_pairs_per_s"] / med["trl"]["loop_cpu_pairs_per_s"], 2
                    ),
                    "ours_peak_rss_mb": med["ours"]["peak_rss_mb"],
                    "trl_peak_rss_mb": med["trl"]["peak_rss_mb"],
                    "ours_peak_memory_mib": med["ours"]["peak_memory_mib"],
                    "trl_peak_memory_mib": med["trl"]["peak_memory_mib"],
                    "ours_rss_growth_mb": med["ours"]["rss_growth_mb"],
                    "trl_rss_growth_mb": med["trl"]["rss_growth_mb"],
                    "ours_mean_loss": med["ours"]["mean_loss"],
                    "trl_mean_loss": med["trl"]["mean_loss"],
                }
            )
    live_trl = [r for r in records if r["impl"] == "trl" and r["ref"] == "live"]
    cached = [r for r in records if r["impl"] == "ours" and r["ref"] == "cache"]
    if live_trl and cached:  # the comparison: our cache against TRL's default (live reference)

        def ratio(key: str) -> float:
            return round(statistics.median(r[key] for r in cached) / statistics.median(r[key] for r in live_trl), 2)

        out.append(
            {
                "summary": "ours/cache vs trl/live",
                "speedup": ratio("pairs_per_s"),
                "cpu_speedup": ratio("cpu_pairs_per_s"),
            }
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--pairs", type=int, default=256, help="training pairs (steps per epoch = pairs // 16)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="trials per (implementation, reference) setting")
    p.add_argument("--settings", default="live,cache", help="which reference settings to run")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads in each trial (OMP_NUM_THREADS)")
    add_watch_arguments(p, f"each trial's steps {LOG_EVERY + 1}-{2 * LOG_EVERY}")
    add_side_arguments(p, device_flag=True)
    p.add_argument(
        "--ours-padded",
        action="store_true",
        help="ours on TRL's layout: each pair as two padded rows [prompt | chosen], [prompt | rejected] "
        "(share_prompt and data.padding_free off)",
    )
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=("ours", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--ref", choices=("live", "cache"), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    if args.pairs // BATCH * args.epochs < LOG_EVERY:  # TRL logs every LOG_EVERY steps, and not at the last
        p.error(f"--pairs {args.pairs} x --epochs {args.epochs}: under {LOG_EVERY} steps of {BATCH}, TRL logs no loss")
    env = trial_env(args.threads, args.device)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        model, data = prepare(Path(tmp), args)
        setup = vars(args) | {"batch": BATCH, "max_length": lengths(args.context)[0], "lr": LR, "machine": machine()}
        print(json.dumps({"setup": setup}), flush=True)
        for _ in range(args.repeats):
            for ref in args.settings.split(","):
                for impl in args.impls.split(","):
                    cmd = [
                        sys.executable,
                        __file__,
                        "--child",
                        "--impl",
                        impl,
                        "--ref",
                        ref,
                        "--model",
                        model,
                        "--data",
                        data,
                        "--epochs",
                        str(args.epochs),
                        "--precision",
                        args.precision,
                        "--context",
                        str(args.context),
                        *(f"--{flag}" for flag in FLAGS if getattr(args, flag.replace("-", "_"))),
                    ]
                    records.append(run_trial(cmd, env, f"{impl}/{ref}"))
    for s in summarize(records):
        print(json.dumps(s), flush=True)


if __name__ == "__main__":
    main()
