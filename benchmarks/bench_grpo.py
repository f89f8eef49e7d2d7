"""GRPO throughput against TRL's GRPOTrainer: same model, prompts, group size, lengths, beta, epochs, reduction.

    /tmp/benchvenv/bin/python benchmarks/bench_grpo.py [--hidden 64 --layers 2 --iterations 8 --repeats 3]

The driver builds one tiny llama (rlhf.tasks.tiny; hidden 64 x 2 layers by default, the `rlhf demo` model) and
trains it for 100 supervised steps on the built-in sorting task (`rlhf train sft`: GRPO starts from an SFT
policy, whose completions end with EOS at different lengths), then runs trials in child processes, alternating
ours and TRL's so that background load hits both alike. Each child times the whole job (imports, load policy and
reference, tokenize the prompts, train, save) and, separately, the training loop alone, and reports the share of
the loop spent in generation (TRL: inside `model.generate`; ours: `perf/generation_s`). TRL gets the prompts in
the order ours draws them (`DataOrder`, seed 0) and reads them in that order, so both sides answer the same
prompts in the same iterations. One JSON line per trial,
then the medians and the ours/TRL ratios of completions per second.

Settings shared by both: 16 prompts per iteration x 8 completions (at most 32 new tokens, temperature 1, stop at
EOS), rewarded by the task's Python gold function (`rlhf.tasks.sorting:gold_reward`); group-normalised advantages
(the group's std; TRL's eps 1e-4, ours 1e-6); beta 0.04 with the k3 KL in the loss against a frozen copy of the
policy; one epoch (mu = 1) of ONE optimizer step over the 128 completions in 4 micro-batches of 32 (TRL:
per_device_train_batch_size 32, gradient_accumulation_steps 4, steps_per_generation 4); clip 0.2; the GRPO
paper's reduction (each sequence's token mean, then the mean over sequences: TRL's loss_type "grpo", ours
seq_mean_token_mean); AdamW lr 1e-5, constant, gradient clipping at 1.0; fp32, dropout off, no gradient
checkpointing, no checkpoints, CPU, one torch thread per trial (`--threads`). `--precision bf16` trains both
sides in bf16 mixed precision, `--device cuda` on the GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import (  # noqa: E402
    add_side_arguments,
    device,
    lengths,
    machine,
    mixed_precision,
    peak_memory_mib,
    print_result,
    run_trial,
    sft_policy,
    trial_env,
    write_data,
)

PROMPTS, GROUP, MICRO, NEW_TOKENS = 16, 8, 32, 32
LR, BETA = 1e-5, 0.04


def run_ours(policy: str, prompts: str, out: str, iterations: int, precision: str, context: int) -> dict[str, Any]:
    from rlhf.config import load_config
    from rlhf.trainers import grpo

    overrides = {
        "output_dir": out,
        "total_episodes": PROMPTS * GROUP * iterations,
        "group_size": GROUP,
        "ppo_epochs": 1,
        "loss_aggregation": "seq_mean_token_mean",
        "samples_every": 0,
        "model.path": policy,
        "data.train": prompts,
        "data.max_length": lengths(context)[0],
        "data.max_prompt_length": lengths(context)[1],
        "rollout.batch_size": PROMPTS,
        "rollout.forward_batch_size": PROMPTS * GROUP,
        "rollout.max_new_tokens": NEW_TOKENS,
        "reward.function": "rlhf.tasks.sorting:gold_reward",
        "kl.coef": BETA,
        "kl.estimator": "k3",
        "optim.lr": LR,
        "schedule.name": "constant",
        "train.batch_size": PROMPTS * GROUP,
        "train.micro_batch_size": MICRO,
        "logging.progress": "false",
        "checkpoint.resume": "never",
        "train.mixed_precision": mixed_precision(precision),
    }
    cfg = load_config(grpo.Config, None, [f"--{k}={v}" for k, v in overrides.items()])
    run_dir = grpo.train(cfg)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    perf = [json.loads(line) for line in (run_dir / "perf.jsonl").read_text().splitlines()]
    return {
        "completions": int(lines[-1]["grpo/episodes"]),
        "loop_s": perf[-1]["perf/elapsed_s"],
        "generation_s": sum(p["perf/generation_s"] for p in perf if "perf/generation_s" in p),
        "final_score": lines[-1]["reward/score"],
        "response_length": statistics.mean(m["response/length"] for m in lines),
    }


def gold(prompts: list[Any], completions: list[Any], letters: list[str], **_: Any) -> list[float]:
    """The task's gold reward on TRL's conversational completions ([{"role": "assistant", "content": ...}])."""
    from rlhf.tasks.sorting import gold_reward

    return gold_reward(prompts, [c[0]["content"] for c in completions], letters)


def run_trl(policy: str, prompts: str, out: str, iterations: int, precision: str, context: int) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from rlhf.runtime.data_order import DataOrder

    rows = [json.loads(line) for line in Path(prompts).read_text().splitlines()]
    order = DataOrder(len(rows), PROMPTS, seed=0)  # ours draws its prompts so; TRL reads them in this order
    drawn = [rows[i] for _ in range(iterations) for i in order.next_batch()]
    dataset = Dataset.from_list([{"prompt": r["prompt"], "letters": r["letters"]} for r in drawn])
    args = GRPOConfig(
        output_dir=out,
        per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=PROMPTS * GROUP // MICRO,
        steps_per_generation=PROMPTS * GROUP // MICRO,
        num_generations=GROUP,
        max_completion_length=NEW_TOKENS,
        max_steps=iterations,
        temperature=1.0,
        beta=BETA,
        num_iterations=1,
        epsilon=0.2,
        loss_type="grpo",
        scale_rewards="group",
        learning_rate=LR,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        gradient_checkpointing=False,
        bf16=precision == "bf16",
        fp16=False,
        use_cpu=device() == "cpu",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
        shuffle_dataset=False,
    )
    tokenizer = AutoTokenizer.from_pretrained(policy, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(policy)
    generation = {"s": 0.0}
    generate = model.generate

    def timed_generate(*a: Any, **kw: Any) -> Any:
        start = time.perf_counter()
        try:
            return generate(*a, **kw)
        finally:
            generation["s"] += time.perf_counter() - start

    model.generate = timed_generate
    trainer = GRPOTrainer(model=model, reward_funcs=gold, args=args, train_dataset=dataset, processing_class=tokenizer)
    start = time.perf_counter()
    trainer.train()
    loop_s = time.perf_counter() - start
    trainer.save_model(out + "/final")
    logs = [h for h in trainer.state.log_history if "reward" in h]
    return {
        "completions": trainer.state.global_step * PROMPTS * GROUP,
        "loop_s": loop_s,
        "generation_s": generation["s"],
        "final_score": logs[-1]["reward"],
        "response_length": statistics.mean(h["completions/mean_length"] for h in logs),
    }


def child(args: argparse.Namespace) -> None:
    """One trial; prints one JSON line."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        job = run_ours if args.impl == "ours" else run_trl
        result = job(args.policy, args.prompts, tmp + "/run", args.iterations, args.precision, args.context)
        wall = time.perf_counter() - start
    record = {
        "impl": args.impl,
        "completions": result["completions"],
        "wall_s": round(wall, 3),
        "completions_per_s": round(result["completions"] / wall, 2),
        "loop_completions_per_s": round(result["completions"] / result["loop_s"], 2),
        "generation_share": round(result["generation_s"] / result["loop_s"], 3),
        "generation_tokens_per_s": round(result["completions"] * result["response_length"] / result["generation_s"]),
        "final_score": round(result["final_score"], 4),
        "mean_response_length": round(result["response_length"], 2),
        "peak_memory_mib": round(peak_memory_mib(), 1),  # the GPU allocator's peak on CUDA, else peak RSS
    }
    print_result(record)


def prepare(root: Path, args: argparse.Namespace) -> tuple[str, str]:
    """Prompt data and a tiny llama briefly supervised on the task (`rlhf train sft`, as in `rlhf demo`)."""
    from rlhf.tasks.tiny import make_tiny_checkpoint

    n_train = max(PROMPTS * args.iterations, 512)
    files = write_data(root / "data", n_train=n_train, n_eval=8, context=args.context, spread=args.context_spread)
    base = make_tiny_checkpoint(root / "base", "llama", hidden_size=args.hidden, num_layers=args.layers, seed=0)
    return str(sft_policy(root, base, files["sft"], steps=args.sft_steps, context=args.context)), str(files["prompt"])


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("completions_per_s", "loop_completions_per_s", "generation_share", "generation_tokens_per_s")
    med = {
        impl: {k: statistics.median(r[k] for r in records if r["impl"] == impl) for k in keys}
        for impl in ("ours", "trl")
    }
    return {
        "summary": "median",
        "ours_completions_per_s": med["ours"]["completions_per_s"],
        "trl_completions_per_s": med["trl"]["completions_per_s"],
        "speedup": round(med["ours"]["completions_per_s"] / med["trl"]["completions_per_s"], 2),
        "ours_loop_completions_per_s": med["ours"]["loop_completions_per_s"],
        "trl_loop_completions_per_s": med["trl"]["loop_completions_per_s"],
        "loop_speedup": round(med["ours"]["loop_completions_per_s"] / med["trl"]["loop_completions_per_s"], 2),
        "ours_generation_share": med["ours"]["generation_share"],
        "trl_generation_share": med["trl"]["generation_share"],
        "ours_generation_tokens_per_s": med["ours"]["generation_tokens_per_s"],
        "trl_generation_tokens_per_s": med["trl"]["generation_tokens_per_s"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--iterations", type=int, default=8, help=f"iterations of {PROMPTS} x {GROUP} completions per trial")
    p.add_argument("--repeats", type=int, default=3, help="trials per implementation")
    p.add_argument("--sft-steps", type=int, default=100, help="supervised steps before GRPO")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each trial (OMP_NUM_THREADS)")
    add_side_arguments(p, device_flag=True)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=("ours", "trl"), help=argparse.SUPPRESS)
    for name in ("--policy", "--prompts"):
        p.add_argument(name, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    env = trial_env(args.threads, args.device)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        policy, prompts = prepare(Path(tmp), args)
        shape = {
            "prompts_per_iteration": PROMPTS,
            "group_size": GROUP,
            "micro_batch": MICRO,
            "max_new_tokens": NEW_TOKENS,
        }
        setup = {k: v for k, v in vars(args).items() if k not in ("child", "impl", "policy", "prompts")} | shape
        print(json.dumps({"setup": setup, "machine": machine()}), flush=True)
        for _ in range(args.repeats):
            for impl in args.impls.split(","):
                cmd = [sys.executable, __file__, "--child", "--impl", impl, "--iterations", str(args.iterations)]
                cmd += ["--precision", args.precision, "--context", str(args.context)]
                cmd += ["--policy", policy, "--prompts", prompts, "--threads", str(args.threads)]
                records.append(run_trial(cmd, env, impl))
    if len(set(args.impls.split(","))) == 2:
        print(json.dumps(summarize(records)), flush=True)


if __name__ == "__main__":
    main()
