"""SFT and reward-model training side by side with TRL (SFTTrainer, RewardTrainer): speed, memory, MFU.

    /tmp/benchvenv/bin/python benchmarks/bench_sft_rm.py --stage both --rounds 3 --threads 2

Both sides train the same tiny llama (`rlhf.tasks.tiny`, default hidden 256, 4 layers) from the same weights
(the reward model from one seeded head saved to disk), on the same rows of the built-in sorting task, in the
same order (TRL gets the rows in the order our `DataOrder` draws them and samples sequentially), with the same
batch, sequence lengths (identical token ids: checked), optimizer settings (AdamW, constant LR, no weight
decay, clipping at 1.0), fp32, no gradient checkpointing, no evaluation, no checkpoint saving and the same
logging interval. TRL's own defaults differ (gradient checkpointing and bf16 on); we turn them off because
they change the computation, not the trainer. `--precision bf16` trains both sides in bf16 mixed precision
(autocast, fp32 master weights; ours `train.mixed_precision bf16`, TRL `bf16=True`) and measures the MFU peak
in bf16. `--context N` puts N filler tokens before every prompt (longer sequences). On a GPU both sides train
there (`use_cpu` is off) and memory is the allocator's peak.

Each trial is a fresh worker process; rounds alternate the sides (ABBA). The timed window runs from the end of
the first logging step to the end of the last step (model loading, tokenization and the first steps' warm-up
are outside it). Per trial and per side (median over rounds) the script prints JSON lines with samples/s,
tokens/s (real tokens, padding excluded), peak memory of the worker (RSS; GPU: allocated), the mean loss over
the timed steps (the same statistic on both sides), and MFU = 6 * N * tokens/s / peak, where N counts the
parameters in matmuls and the peak is measured here with a large torch.matmul loop in the run's precision on
the same number of threads; then the ratio ours/TRL. A separate short run per side logs every step and checks
that the two loss curves agree from the first step on; in bf16 ours also runs that check in fp32, so the record
says how far our bf16 curve lies from our fp32 one (`max_abs_diff_ours_fp32`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402 - the script's own folder first
    Setup,
    StepWindow,
    add_side_arguments,
    add_watch_arguments,
    alternating,
    device,
    emit,
    lengths,
    machine,
    make_setup,
    matmul_params,
    matmul_peak_flops,
    median,
    mfu,
    mixed_precision,
    peak_memory_mib,
    run_worker,
    set_threads,
    step_watch,
    traced_train_steps,
)

STAGE_DATA = {"sft": "sft", "rm": "preference"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", choices=("sft", "rm", "both"), default="both")
    p.add_argument("--hidden", type=int, default=256, help="hidden size of the tiny llama")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32, help="examples (SFT) or pairs (RM) per step")
    p.add_argument(
        "--micro-batch-size",
        type=int,
        default=0,
        help="examples per forward pass (ours train.micro_batch_size, TRL per_device_train_batch_size with gradient "
        "accumulation); 0: the whole batch",
    )
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per timed trial")
    p.add_argument("--log-every", type=int, default=10, help="logging interval of both sides; the window starts here")
    p.add_argument("--rounds", type=int, default=3, help="trials per side, alternating ABBA")
    p.add_argument("--check-steps", type=int, default=10, help="steps of the loss-curve check (0: skip it)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=2, help="torch threads of every worker and of the matmul peak")
    p.add_argument("--n-train", type=int, default=4096, help="rows of each task file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--trl-gradient-checkpointing",
        action="store_true",
        help="give TRL its shipped default gradient_checkpointing=True (more compute; same loss curve)",
    )
    p.add_argument("--peak-seconds", type=float, default=1.0, help="length of each burst of the matmul peak")
    add_side_arguments(p)
    p.add_argument("--ours-two-rows", action="store_true", help="RM: score chosen and rejected as two rows each")
    p.add_argument("--ours-padded", action="store_true", help="padded batches (data.padding_free false)")
    add_watch_arguments(p, "each side's timed window")
    p.add_argument("--workdir", default=None, help="where models, data and run directories go (default: a temp dir)")
    # worker mode (one trial), used by the orchestrator
    p.add_argument("--worker", choices=("ours", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--setup", help=argparse.SUPPRESS)
    p.add_argument("--rows", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- the data plan


def batch_plan(setup: Setup, stage: str, args: argparse.Namespace, workdir: Path) -> tuple[Path, list[int], list[int]]:
    """The rows our trainer will draw, in order, written for TRL's sequential sampler; real tokens per step of
    the sequences (RM: prompt + chosen and prompt + rejected) and of what shares the prompt (prompt once)."""
    from rlhf.config import DataConfig
    from rlhf.data import load_records, tokenize_records
    from rlhf.models.loading import load_tokenizer
    from rlhf.runtime.data_order import DataOrder

    path = Path(setup.data[STAGE_DATA[stage]])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    records, _ = load_records(path, STAGE_DATA[stage])
    max_length, max_prompt_length = lengths(args.context)
    cfg = DataConfig(max_length=max_length, max_prompt_length=max_prompt_length)
    examples, report = tokenize_records(records, STAGE_DATA[stage], load_tokenizer(setup.model_dir), cfg)
    assert len(examples) == len(rows), "every row must tokenize (no drops) so indices line up"
    order = DataOrder(len(rows), args.batch_size, seed=args.seed)
    keep = ("prompt", "completion") if stage == "sft" else ("prompt", "chosen", "rejected")
    ordered, tokens, shared = [], [], []
    for _ in range(args.steps):
        idx = order.next_batch()
        ordered += [{k: rows[i][k] for k in keep} for i in idx]
        tokens.append(sum(example_tokens(examples[i], stage) for i in idx))
        shared.append(sum(example_tokens(examples[i], stage, share_prompt=True) for i in idx))
    out = workdir / f"{stage}_ordered_{args.batch_size}x{args.steps}.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in ordered))
    return out, tokens, shared


def example_tokens(example: dict[str, Any], stage: str, *, share_prompt: bool = False) -> int:
    """Real (unpadded) tokens of one example: prompt + completion, or prompt + chosen plus prompt + rejected
    (with `share_prompt`, the prompt counted once)."""
    if stage == "sft":
        return len(example["input_ids"])
    prompts = 1 if share_prompt else 2
    return prompts * len(example["prompt_ids"]) + len(example["chosen_ids"]) + len(example["rejected_ids"])


# ---------------------------------------------------------------------------------------------- workers


class StepClock:
    """Wall-clock and process CPU time at the end of each optimizer step, and the thread count in use; `watch`, if
    given, sees every step end too: torch.profiler (`StepProfiler`) or the per-op timer (`OpTimer`) over the timed
    window, whose findings `report()` returns."""

    def __init__(self, watch: StepWindow | None = None) -> None:
        self.at: dict[int, tuple[float, float]] = {}
        self.threads = 0
        self.watch = watch

    def tick(self, step: int) -> None:
        if self.watch is not None:
            self.watch.tick(step)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the step's kernels have run, not only been queued
        self.at[step] = (time.perf_counter(), time.process_time())
        self.threads = torch.get_num_threads()

    def report(self) -> dict[str, Any]:
        return self.watch.report() if self.watch is not None else {}

    def window(self, start: int, end: int) -> dict[str, float]:
        """Seconds from the end of step `start` to the end of step `end`: wall clock and CPU (all threads)."""
        (w0, c0), (w1, c1) = self.at[start], self.at[end]
        return {"window_s": w1 - w0, "cpu_s": c1 - c0, "threads_in_use": self.threads}


def worker_ours(args: argparse.Namespace, setup: Setup, stage: str, run_dir: Path) -> dict[str, Any]:
    from rlhf.config import load_config
    from rlhf.trainers import reward, sft

    module = sft if stage == "sft" else reward
    overrides = {
        "output_dir": str(run_dir),
        "seed": args.seed,
        "model.path": setup.model_dir if stage == "sft" else setup.rm_init_dir,
        "data.train": setup.data[STAGE_DATA[stage]],
        "data.max_length": lengths(args.context)[0],
        "data.max_prompt_length": lengths(args.context)[1],
        "optim.lr": args.lr,
        "optim.weight_decay": 0.0,
        "optim.max_grad_norm": 1.0,
        "schedule.name": "constant",
        "train.batch_size": args.batch_size,
        "train.micro_batch_size": micro_batch_size(args),
        "train.max_steps": args.steps,
        "logging.every": args.log_every,
        "logging.progress": False,
        "checkpoint.every": 0,
        "checkpoint.resume": "never",
        "train.mixed_precision": mixed_precision(args.precision),
    }
    if stage == "rm":
        overrides["share_prompt"] = not args.ours_two_rows
    overrides["data.padding_free"] = not args.ours_padded
    cfg = load_config(module.Config, None, [f"--{k}={v}" for k, v in overrides.items()])
    clock = StepClock(step_watch(args, args.log_every, args.steps))
    # after the optimizer step, before logging: where TRL's on_step_end fires
    with traced_train_steps(lambda engine: clock.tick(engine.step)) as step_losses:
        module.train(cfg)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if stage == "sft" else AutoModelForSequenceClassification
    return {
        **clock.window(args.log_every, args.steps),
        "watched": clock.report(),
        "losses": {m["step"]: m["train/loss"] for m in metrics if "train/loss" in m},
        "step_losses": step_losses,
        "matmul_params": matmul_params(auto.from_pretrained(run_dir / "final")),
        "tokens": None,  # ours is the reference the plan was computed with
    }


def micro_batch_size(args: argparse.Namespace) -> int:
    return args.micro_batch_size or args.batch_size


def trl_settings(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    """TRL config values that make its run the same computation as ours (see the module docstring)."""
    return {
        "output_dir": str(run_dir),
        "per_device_train_batch_size": micro_batch_size(args),
        "gradient_accumulation_steps": args.batch_size // micro_batch_size(args),
        "max_steps": args.steps,
        "learning_rate": args.lr,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "adam_epsilon": 1e-8,
        "logging_steps": args.log_every,
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": "none",
        "use_cpu": device() == "cpu",
        "bf16": args.precision == "bf16",
        "gradient_checkpointing": args.trl_gradient_checkpointing,
        "train_sampling_strategy": "sequential",
        "disable_tqdm": True,
        "seed": args.seed,
        "dataloader_num_workers": 0,
        "max_length": lengths(args.context)[0],
    }


def worker_trl(args: argparse.Namespace, setup: Setup, stage: str, run_dir: Path) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

    class StepCallback(TrainerCallback):
        def __init__(self, clock: StepClock) -> None:
            self.clock = clock

        def on_step_end(self, _args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.clock.tick(state.global_step)

    rows = [json.loads(line) for line in Path(args.rows).read_text().splitlines()]
    common = trl_settings(args, run_dir)
    tokenizer = AutoTokenizer.from_pretrained(setup.model_dir)
    if stage == "sft":
        model = AutoModelForCausalLM.from_pretrained(setup.model_dir)
        trainer = SFTTrainer(
            model=model, args=SFTConfig(**common), train_dataset=Dataset.from_list(rows), processing_class=tokenizer
        )
        tokens = [len(r["input_ids"]) for r in trainer.train_dataset]
    else:
        model = AutoModelForSequenceClassification.from_pretrained(setup.rm_init_dir, num_labels=1)
        trainer = RewardTrainer(
            model=model, args=RewardConfig(**common), train_dataset=Dataset.from_list(rows), processing_class=tokenizer
        )
        tokens = [len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in trainer.train_dataset]
    clock = StepClock(step_watch(args, args.log_every, args.steps))
    trainer.add_callback(StepCallback(clock))
    trainer.train()
    b = args.batch_size
    return {
        **clock.window(args.log_every, args.steps),
        "watched": clock.report(),
        "losses": {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h},
        "matmul_params": matmul_params(model),
        "tokens": [sum(tokens[s * b : (s + 1) * b]) for s in range(args.steps)],
    }


def worker_main(args: argparse.Namespace) -> None:
    set_threads(args.threads)
    setup = Setup.from_json(Path(args.setup).read_text())
    stage = args.stage
    with tempfile.TemporaryDirectory(prefix=f"bench-{args.worker}-{stage}-") as tmp:
        run = worker_ours if args.worker == "ours" else worker_trl
        result = run(args, setup, stage, Path(tmp) / "run")
    result["peak_memory_mib"] = peak_memory_mib()
    Path(args.result).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------- orchestration


def trial(
    args: argparse.Namespace, side: str, stage: str, files: dict[str, Path], *, watched: bool = True, **extra: Any
) -> dict[str, Any]:
    """One worker process: `side` trains `stage` for `args.steps` steps (or what `extra` overrides), its timed
    window watched as `--profile` or `--attribute` ask unless not `watched`."""
    values = {
        "worker": side,
        "stage": stage,
        "setup": files["setup"],
        "rows": files[f"{stage}_rows"],
        "result": files["result"],
        "batch-size": args.batch_size,
        "micro-batch-size": micro_batch_size(args),
        "steps": args.steps,
        "log-every": args.log_every,
        "lr": args.lr,
        "threads": args.threads,
        "seed": args.seed,
        "precision": args.precision,
        "context": args.context,
    } | extra
    cmd = [sys.executable, __file__, *(f"--{k}={v}" for k, v in values.items())]
    flags = ["trl-gradient-checkpointing", "ours-two-rows", "ours-padded"]
    if watched:
        flags += ["profile", "attribute"]
    cmd += [f"--{flag}" for flag in flags if getattr(args, flag.replace("-", "_"))]
    result = run_worker(cmd, files["result"])
    result["losses"] = {int(k): v for k, v in result["losses"].items()}
    return result


def loss_check(
    args: argparse.Namespace, stage: str, files: dict[str, Path], tokens: list[int], sides: list[str], fp32_too: bool
) -> dict[str, Any]:
    """`check_steps` steps logging every step, of each of `sides`: ours and TRL's loss curves must coincide. With
    `fp32_too` (a bf16 run) ours runs in fp32 too, and the record says how far our bf16 curve lies from it."""
    short = {"steps": args.check_steps, "log-every": 1, "watched": False}
    runs = {side: trial(args, side, stage, files, **short) for side in sides}
    if fp32_too:
        runs["ours_fp32"] = trial(args, "ours", stage, files, **short, precision="fp32")
    if "trl" in runs:
        assert runs["trl"]["tokens"] == tokens[: args.check_steps], "TRL tokenized the rows differently"
    curves = {name: run["losses"] for name, run in runs.items()}
    steps = range(1, args.check_steps + 1)
    record: dict[str, Any] = {"bench": stage, "check": "loss_curve", "steps": args.check_steps}
    for name, curve in curves.items():
        record[f"first_loss_{name}"], record[f"last_loss_{name}"] = curve[1], curve[args.check_steps]
    if {"ours", "trl"} <= curves.keys():
        record["max_abs_diff"] = max(abs(curves["ours"][s] - curves["trl"][s]) for s in steps)
    if "ours_fp32" in curves:
        record["max_abs_diff_ours_fp32"] = max(abs(curves["ours"][s] - curves["ours_fp32"][s]) for s in steps)
    return record


def timed_mean_loss(result: dict[str, Any], args: argparse.Namespace) -> float:
    """Mean training loss over the timed steps (log_every, steps]. Ours from every step's loss; TRL from its
    logged values, each the mean over the `log_every` steps before it: the same statistic on both sides."""
    if "step_losses" in result:
        window = result["step_losses"][args.log_every : args.steps]
    else:
        window = [result["losses"][s] for s in range(2 * args.log_every, args.steps + 1, args.log_every)]
    return sum(window) / len(window)


def summarize(
    stage: str,
    side: str,
    results: list[dict[str, Any]],
    args: argparse.Namespace,
    timed_tokens: int,
    computed_tokens: int,
    peak: float,
) -> dict[str, Any]:
    """Median-window throughput of one side. tokens/s counts the sequences' real tokens (the same work for
    both sides); MFU counts the tokens this side actually runs through the model (RM with a shared prompt:
    the prompt once), so it measures how well the hardware is used, not how much work was avoided."""
    timed_steps = args.steps - args.log_every
    windows = [r["window_s"] for r in results]
    window = median(windows)
    tokens_per_s = timed_tokens / window
    final = results[0]["losses"][args.steps]
    return {
        "bench": stage,
        "side": side,
        "rounds": len(results),
        "samples_per_s": args.batch_size * timed_steps / window,
        "tokens_per_s": tokens_per_s,
        "step_ms": 1000 * window / timed_steps,
        "windows_s": windows,
        "best_samples_per_s": args.batch_size * timed_steps / min(windows),
        "cpu_ms_per_step": 1000 * median([r["cpu_s"] for r in results]) / timed_steps,
        "threads_in_use": results[0]["threads_in_use"],
        "peak_memory_mib": median([r["peak_memory_mib"] for r in results]),
        "final_loss": final,
        "mean_loss": timed_mean_loss(results[0], args),
        "mfu": mfu(results[0]["matmul_params"], computed_tokens / window, peak),
        "matmul_params": results[0]["matmul_params"],
    }


def bench_stage(
    args: argparse.Namespace, stage: str, files: dict[str, Path], tokens: tuple[list[int], list[int]], peak: float
) -> None:
    """The loss-curve check, then `rounds` alternating timed trials per side, their summary and the ratio."""
    plan, shared = tokens  # real tokens per step: of the sequences, and with the prompt once (RM)
    sides = args.impls.split(",")
    fp32_too = args.precision != "fp32" and "ours" in sides  # our bf16 loss curve against our fp32 one
    if args.check_steps and (len(sides) > 1 or fp32_too):
        emit(loss_check(args, stage, files, plan, sides, fp32_too))
    results: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    for rnd, side in alternating(args.rounds, sides):
        r = trial(args, side, stage, files)
        if side == "trl":
            assert r["tokens"] == plan, "TRL tokenized the rows differently"
        results[side].append(r)
        last = r["losses"][args.steps]
        emit(
            {
                "bench": stage,
                "side": side,
                "round": rnd,
                "window_s": r["window_s"],
                "cpu_s": r["cpu_s"],
                "final_loss": last,
                "mean_loss": timed_mean_loss(r, args),
            }
        )
        if r["watched"]:  # with --profile or --attribute the windows include the watcher's own overhead
            emit({"bench": stage, "side": side, "round": rnd, **r["watched"]})
    timed_tokens = sum(plan[args.log_every :])
    ours_runs = shared if stage == "rm" and not args.ours_two_rows else plan
    computed = {"ours": sum(ours_runs[args.log_every :]), "trl": timed_tokens}
    rows = {side: summarize(stage, side, results[side], args, timed_tokens, computed[side], peak) for side in results}
    for row in rows.values():
        emit(row)
    if len(rows) < 2:
        return
    ours, trl = rows["ours"], rows["trl"]
    emit(
        {
            "bench": stage,
            "ratio": "ours/trl",
            "speed": ours["samples_per_s"] / trl["samples_per_s"],
            "speed_best": ours["best_samples_per_s"] / trl["best_samples_per_s"],
            "speed_by_cpu_time": trl["cpu_ms_per_step"] / ours["cpu_ms_per_step"],
            "peak_memory": ours["peak_memory_mib"] / trl["peak_memory_mib"],
            "mean_loss_ours": ours["mean_loss"],  # over the timed steps, the same statistic on both sides
            "mean_loss_trl": trl["mean_loss"],
        }
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(args)
        return 0
    if args.steps % args.log_every or args.steps <= args.log_every:
        raise SystemExit("--steps must be a multiple of --log-every and larger than it")
    if args.batch_size % micro_batch_size(args):
        raise SystemExit("--batch-size must be a multiple of --micro-batch-size")
    if args.attribute and device() == "cuda":
        raise SystemExit("--attribute times each op on the host, which on a GPU only launches it: use --profile")
    set_threads(args.threads)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_sft_rm-"))
    workdir.mkdir(parents=True, exist_ok=True)
    setup = make_setup(
        workdir,
        hidden=args.hidden,
        layers=args.layers,
        heads=args.heads,
        n_train=args.n_train,
        context=args.context,
        spread=args.context_spread,
        seed=args.seed,
    )
    files = {"setup": workdir / "setup.json", "result": workdir / "result.json"}
    files["setup"].write_text(setup.to_json())
    stages = ["sft", "rm"] if args.stage == "both" else [args.stage]
    plans = {}
    for stage in stages:
        rows_file, plan, shared = batch_plan(setup, stage, args, workdir)
        files[f"{stage}_rows"], plans[stage] = rows_file, (plan, shared)
    peak = matmul_peak_flops(threads=args.threads, precision=args.precision, seconds=args.peak_seconds)
    emit(
        {
            "bench": "setup",
            "argv": sys.argv[1:],
            "threads": args.threads,
            "precision": args.precision,
            "device": device(),
            "machine": machine(),
            "matmul_peak_gflops": peak / 1e9,
            "hidden": args.hidden,
            "layers": args.layers,
            "context": args.context,
            "max_length": lengths(args.context)[0],
            "batch_size": args.batch_size,
            "micro_batch_size": micro_batch_size(args),
            "context_spread": args.context_spread,
            "steps": args.steps,
            "timed_steps": args.steps - args.log_every,
            "torch": __import__("torch").__version__,
            "trl": __import__("trl").__version__ if "trl" in args.impls else None,
        }
    )

    for stage in stages:
        bench_stage(args, stage, files, plans[stage], peak)
    again = matmul_peak_flops(threads=args.threads, precision=args.precision, seconds=args.peak_seconds)
    emit({"bench": "end", "matmul_peak_gflops_again": again / 1e9})
    return 0


if __name__ == "__main__":
    sys.exit(main())
