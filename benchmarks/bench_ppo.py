"""PPO throughput against TRL's PPOTrainer (`trl.experimental.ppo`): same model, batch, lengths and PPO epochs.

    /tmp/benchvenv/bin/python benchmarks/bench_ppo.py [--hidden 64 --layers 2 --iterations 8 --repeats 3]

The driver builds one tiny llama (rlhf.tasks.tiny; hidden 64 x 2 layers by default, the `rlhf demo` model),
trains it for 100 supervised steps on the built-in task (`rlhf train sft`, as the demo does: PPO starts from an
SFT policy, whose responses end with EOS at different lengths), makes a reward model from it (a seeded one-label
head), then runs trials in child processes, alternating ours and TRL's so that background load hits both alike.
Each child times the whole job a user waits for (imports, load policy, reference, reward and value models,
tokenize the prompts, train, save the final policy) and, separately, the training loop alone; one JSON line per
trial, then the medians and the ours/TRL ratios of episodes (prompt + sampled response) per second.

Settings shared by both, TRL's usual shape: 64 prompts per iteration (one response each, at most 32 new tokens,
temperature 1, stop at EOS); reference = a frozen copy of the policy; value model initialised from the reward
model; 4 PPO epochs, each ONE optimizer step over the whole batch in 4 micro-batches of 16 (TRL:
per_device_train_batch_size 16, gradient_accumulation_steps 4, num_mini_batches 1); rollout scoring passes over
all 64 rows at once; fixed KL coefficient 0.05 (k1); clip 0.2, value clip 0.2, vf_coef 0.1 (both put the 1/2 of
the squared error inside the value loss); gamma 1, lam 0.95, whitened advantages; AdamW lr 1e-5, linear decay;
no gradient clipping (TRL's loop has none); fp32 (`--precision bf16`: ours `train.mixed_precision bf16`, TRL
`bf16=True`), no gradient checkpointing, dropout off, no sample generations,
no checkpoints, CPU, one torch thread per trial (`--threads`; on a shared 2-core machine two threads per process
contend and make both sides several times slower and noisier).
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
    add_context_argument,
    add_watch_arguments,
    lengths,
    machine,
    mixed_precision,
    print_result,
    run_trial,
    sft_policy,
    step_watch,
    trial_env,
    write_data,
)

BATCH, MICRO, EPOCHS, NEW_TOKENS = 64, 16, 4, 32
LR, KL_COEF, VF_COEF = 1e-5, 0.05, 0.1
WATCHED = (4, 8)
"""`--profile` / `--attribute` watch iterations 5-8 of each trial (after those that warm the caches up)."""
WATCHES = ("profile", "attribute")


def run_ours(
    policy: str, rm: str, prompts: str, out: str, iterations: int, context: int, precision: str, watch: Any = None
) -> dict[str, Any]:
    from rlhf.config import load_config
    from rlhf.runtime.online import IterationLoop
    from rlhf.trainers import ppo

    if watch is not None:  # ticks at the end of every iteration, as TRL's on_step_end below
        end = IterationLoop.end

        def watched_end(loop: IterationLoop, it: Any, *a: Any, **kw: Any) -> None:
            end(loop, it, *a, **kw)
            watch.tick(it.index + 1)

        IterationLoop.end = watched_end  # type: ignore[method-assign]  # this trial's process only

    overrides = {
        "output_dir": out,
        "total_episodes": BATCH * iterations,
        "ppo_epochs": EPOCHS,
        "vf_coef": VF_COEF,
        "samples_every": 0,
        "model.path": policy,
        "data.train": prompts,
        "data.max_length": lengths(context)[0],
        "data.max_prompt_length": lengths(context)[1],
        "rollout.batch_size": BATCH,
        "rollout.forward_batch_size": BATCH,
        "rollout.max_new_tokens": NEW_TOKENS,
        "reward.model": rm,
        "kl.coef": KL_COEF,
        "value.init": "reward",
        "optim.lr": LR,
        "optim.max_grad_norm": 0.0,
        "schedule.name": "linear",
        "train.batch_size": BATCH,
        "train.micro_batch_size": MICRO,
        "train.mixed_precision": mixed_precision(precision),
        "logging.progress": "false",
        "checkpoint.resume": "never",
    }
    cfg = load_config(ppo.Config, None, [f"--{k}={v}" for k, v in overrides.items()])
    run_dir = ppo.train(cfg)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    perf = [json.loads(line) for line in (run_dir / "perf.jsonl").read_text().splitlines()]
    return {
        "episodes": int(lines[-1]["ppo/episodes"]),
        "loop_s": perf[-1]["perf/elapsed_s"],
        "final_score": lines[-1]["reward/score"],
        "response_length": statistics.mean(m["response/length"] for m in lines),
    }


def run_trl(
    policy: str, rm: str, prompts: str, out: str, iterations: int, context: int, precision: str, watch: Any = None
) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    class Watch(TrainerCallback):  # TRL's PPO counts one global step per iteration (rollout and its updates)
        def on_step_end(self, _args: Any, state: Any, *a: Any, **kw: Any) -> None:
            watch.tick(state.global_step)

    tokenizer = AutoTokenizer.from_pretrained(policy, padding_side="left")
    rows = [json.loads(line) for line in Path(prompts).read_text().splitlines()]
    ids = [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True)["input_ids"] for r in rows]
    dataset = Dataset.from_dict({"input_ids": [x[-lengths(context)[1] :] for x in ids]})
    args = PPOConfig(
        output_dir=out,
        per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=BATCH // MICRO,
        num_mini_batches=1,
        num_ppo_epochs=EPOCHS,
        total_episodes=BATCH * iterations,
        local_rollout_forward_batch_size=BATCH,
        response_length=NEW_TOKENS,
        temperature=1.0,
        stop_token="eos",
        kl_coef=KL_COEF,
        kl_estimator="k1",
        cliprange=0.2,
        cliprange_value=0.2,
        vf_coef=VF_COEF,
        gamma=1.0,
        lam=0.95,
        learning_rate=LR,
        lr_scheduler_type="linear",
        gradient_checkpointing=False,
        bf16=precision == "bf16",
        fp16=False,
        use_cpu=True,
        num_sample_generations=0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    trainer = PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=AutoModelForCausalLM.from_pretrained(policy),
        ref_model=AutoModelForCausalLM.from_pretrained(policy),
        reward_model=AutoModelForSequenceClassification.from_pretrained(rm, num_labels=1),
        value_model=AutoModelForSequenceClassification.from_pretrained(rm, num_labels=1),
        train_dataset=dataset,
        eval_dataset=dataset,
        callbacks=[] if watch is None else [Watch()],
    )
    start = time.perf_counter()
    trainer.train()
    loop_s = time.perf_counter() - start
    trainer.save_model(out + "/final")
    logs = [h for h in trainer.state.log_history if "objective/scores" in h]
    return {"episodes": trainer.state.episode, "loop_s": loop_s, "final_score": logs[-1]["objective/scores"]}


def child(args: argparse.Namespace) -> None:
    """One trial; prints one JSON line."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        job = run_ours if args.impl == "ours" else run_trl
        watch = step_watch(args, *WATCHED)
        run = (args.policy, args.rm, args.prompts, tmp + "/run", args.iterations, args.context, args.precision)
        result = job(*run, watch)
        wall = time.perf_counter() - start
    record = {
        "impl": args.impl,
        "episodes": result["episodes"],
        "wall_s": round(wall, 3),
        "episodes_per_s": round(result["episodes"] / wall, 2),
        "loop_episodes_per_s": round(result["episodes"] / result["loop_s"], 2),
        "final_score": round(result["final_score"], 4),
    }
    if "response_length" in result:
        record["mean_response_length"] = round(result["response_length"], 2)
    if watch is not None:
        record |= watch.report()
    print_result(record)


def prepare(root: Path, args: argparse.Namespace) -> tuple[str, str, str]:
    """Data, a tiny llama briefly supervised on the task (`rlhf train sft`, as in `rlhf demo`: PPO starts from an
    SFT policy, whose responses end with EOS at different lengths), and a reward model initialised from it."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf.tasks.tiny import make_tiny_checkpoint

    n_train = max(BATCH * args.iterations, 512)
    files = write_data(root / "data", n_train=n_train, n_eval=8, context=args.context, spread=args.context_spread)
    base = make_tiny_checkpoint(root / "base", "llama", hidden_size=args.hidden, num_layers=args.layers, seed=0)
    policy = base
    if args.sft_steps:
        policy = sft_policy(root, base, files["sft"], steps=args.sft_steps, context=args.context)
    torch.manual_seed(1)
    rm = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1)
    rm.config.pad_token_id = AutoTokenizer.from_pretrained(policy).pad_token_id
    rm.save_pretrained(root / "rm")
    AutoTokenizer.from_pretrained(policy).save_pretrained(root / "rm")
    return str(policy), str(root / "rm"), str(files["prompt"])


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    med = {
        impl: {
            k: statistics.median(r[k] for r in records if r["impl"] == impl)
            for k in ("episodes_per_s", "loop_episodes_per_s")
        }
        for impl in ("ours", "trl")
    }
    return {
        "summary": "median",
        "ours_episodes_per_s": med["ours"]["episodes_per_s"],
        "trl_episodes_per_s": med["trl"]["episodes_per_s"],
        "speedup": round(med["ours"]["episodes_per_s"] / med["trl"]["episodes_per_s"], 2),
        "ours_loop_episodes_per_s": med["ours"]["loop_episodes_per_s"],
        "trl_loop_episodes_per_s": med["trl"]["loop_episodes_per_s"],
        "loop_speedup": round(med["ours"]["loop_episodes_per_s"] / med["trl"]["loop_episodes_per_s"], 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--iterations", type=int, default=8, help=f"PPO iterations of {BATCH} episodes per trial")
    p.add_argument("--repeats", type=int, default=3, help="trials per implementation")
    p.add_argument("--sft-steps", type=int, default=100, help="supervised steps before PPO (0: a random policy)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each trial (OMP_NUM_THREADS)")
    add_context_argument(p)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="both sides (bf16: mixed precision)")
    add_watch_arguments(p, f"each trial's iterations {WATCHED[0] + 1}-{WATCHED[1]} (figures per iteration)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=("ours", "trl"), help=argparse.SUPPRESS)
    for name in ("--policy", "--rm", "--prompts"):
        p.add_argument(name, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    env = trial_env(args.threads)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        policy, rm, prompts = prepare(Path(tmp), args)
        setup = vars(args) | {"batch": BATCH, "micro_batch": MICRO, "ppo_epochs": EPOCHS, "max_new_tokens": NEW_TOKENS}
        print(json.dumps({"setup": setup, "machine": machine()}), flush=True)
        for _ in range(args.repeats):
            for impl in ("ours", "trl"):
                cmd = [sys.executable, __file__, "--child", "--impl", impl, "--iterations", str(args.iterations)]
                cmd += ["--policy", policy, "--rm", rm, "--prompts", prompts, "--context", str(args.context)]
                cmd += [
                    "--precision",
                    args.precision,
                    *(f"--{f}" for f in ("profile", "attribute") if getattr(args, f)),
                ]
                records.append(run_trial(cmd, env, impl))
    print(json.dumps(summarize(records)), flush=True)


if __name__ == "__main__":
    main()
