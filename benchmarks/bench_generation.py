"""Generation throughput: our rollout decoding against `model.generate` (what TRL's online trainers call).

    /tmp/benchvenv/bin/python benchmarks/bench_generation.py [--hidden 256 --layers 4 --rows 64 --prompt 32
        --new-tokens 256 --rounds 3 --threads 2] [--prompt-min 10 --group 4 --chunk-size 16]

On the GPU when there is one (`--device`; `benchmarks/gpu.sh` runs it there in bf16), else the CPU, one tiny llama
(rlhf.tasks.tiny, random weights) samples `--new-tokens` tokens (temperature 1, no top-k/top-p)
for each of `--rows` random prompts of `--prompt` tokens (row i left-padded by i % 8), three ways, alternating
ABBA round by round in one process after one warm-up call each:

- `ours`: `rlhf.rollout.generation.decode` with our sampler, its KV cache reserving the rollout's length at
  the prefill (`reserved_cache`), on our attention function (`padding_free.enable`) and linear layers
  (`cpu_linear.enable`: oneDNN for fp32 on AMD CPUs), as every model our trainers load;
- `ours-concat`: the same with `transformers`' `DynamicCache`, which concatenates at every step (the lever
  `reserved_cache` pulls, measured side by side), and so with a copy of a shared prompt's cache for each of its
  rows (`decode` keeps it once only in its own cache);
- `hf`: `model.generate(do_sample=True)` on `transformers`' own sdpa attention and `nn.Linear`, as TRL calls it.

By default no side stops early: EOS is never a stop token, so every side makes rows x new tokens. With
`--stop-at-eos` a row ends at its first EOS, as in a rollout: ours drops it from the batch and the cache (the
cache's rows are then copied, which `ours-concat` does too), `model.generate` keeps it to the end; the figure is
then tokens up to and including each row's EOS per second. `ours` and `ours-concat` draw the same tokens (keyed
sampling); `hf` draws others. One JSON line per trial, then each side's median new tokens/s and the ratios
ours/hf and ours/ours-concat.

With `--prompt-min` the prompts have random lengths between it and `--prompt` (`--group` rows of each, as a
GRPO batch), and with `--chunk-size` every side samples through `rlhf.rollout.generation.generate_rollout` in
chunks of that many rows, as a rollout does (`rollout.forward_batch_size`): prompts of like length per chunk,
each without the left padding its rows share. The side `ours-row-order` then cuts the chunks in row order at the
batch's full width instead (the lever measured side by side; it draws the same tokens as `ours`).

Where rows share prompts (`--group` > 1, or `--repeated N`: the last N rows take the first N rows' prompts, as a
batch of distinct prompts drawn with a few repeats), the sides `ours-kept-once` and `ours-copied` decode with each
prompt's KV cache kept once for its rows (`rlhf.models.shared_prefix`) and copied to each row, whatever
`SHARED_PREFIX_MIN_REREAD` says (`ours` follows it): the choice measured side by side, with the same draws.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import PRECISIONS, alternating, device, emit, machine, median, set_threads  # noqa: E402

SIDES = ("ours", "ours-concat", "hf")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--rows", type=int, default=64, help="sequences generated at once")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens per row (before the left pads)")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens sampled per row")
    p.add_argument("--rounds", type=int, default=3, help="timed calls per side, alternating ABBA")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", choices=("cpu", "cuda"), default=device(), help="where every side runs (default: "
                   "the GPU when there is one)")  # fmt: skip
    p.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32", help="the weights' dtype on all sides")
    p.add_argument("--stop-at-eos", action="store_true", help="rows end at their first EOS (default: never)")
    p.add_argument("--prompt-min", type=int, default=0, help="random prompt lengths from this to --prompt (0: off)")
    p.add_argument("--group", type=int, default=1, help="rows per prompt (with --prompt-min)")
    p.add_argument("--repeated", type=int, default=0, help="the last N rows repeat the first N rows' prompts")
    p.add_argument("--chunk-size", type=int, default=0, help="rows per generate call, as a rollout (0: all)")
    extra = "ours-row-order with --chunk-size, ours-kept-once and ours-copied where rows share prompts"
    p.add_argument("--sides", default=None, help=f"which sides to run (default: {', '.join(SIDES)}, and {extra})")
    return p.parse_args(argv)


def generators(model: torch.nn.Module, n: int, eos: int, chunk_size: int, shared: bool) -> dict[str, Any]:
    """side -> fn(prompt_ids, prompt_mask, keys) -> (rows, <= n) new tokens, in chunks of `chunk_size` rows; with
    `shared` (rows share prompts) also the two ways to serve a shared prompt's cache."""
    from transformers import DynamicCache, GenerationConfig

    from rlhf.models import cpu_linear, padding_free
    from rlhf.rollout import generation

    sampling = generation.SamplingConfig(max_new_tokens=n, temperature=1.0)

    def ours(ids: torch.Tensor, mask: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        padding_free.enable(model)
        cpu_linear.enable(model)
        processors = generation.sampler(sampling, keys)
        return generation.decode(
            model, ids, mask, max_new_tokens=n, eos_token_id=eos, pad_token_id=0, logits_processor=processors
        )

    def ours_concat(ids: torch.Tensor, mask: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        reserved = generation.reserved_cache
        generation.reserved_cache = lambda model, capacity: DynamicCache(config=model.config)
        try:
            return ours(ids, mask, keys)
        finally:
            generation.reserved_cache = reserved

    config = GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=n,
        eos_token_id=eos if eos >= 0 else None,
        pad_token_id=0,
    )

    def hf(ids: torch.Tensor, mask: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        model.config._attn_implementation = "sdpa"
        for module in model.modules():
            if type(module) is cpu_linear.Linear:
                module.__class__ = torch.nn.Linear
        return model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.shape[1] :]

    def reread_from(threshold: float) -> Any:
        def side(ids: torch.Tensor, mask: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
            rule = generation.SHARED_PREFIX_MIN_REREAD
            generation.SHARED_PREFIX_MIN_REREAD = threshold
            try:
                return ours(ids, mask, keys)
            finally:
                generation.SHARED_PREFIX_MIN_REREAD = rule

        return side

    sides = {"ours": ours, "ours-concat": ours_concat, "hf": hf}
    if shared:
        sides |= {"ours-kept-once": reread_from(0), "ours-copied": reread_from(float("inf"))}
    if not chunk_size:
        return sides

    def rollout(fn: Any) -> Any:
        class Backend:
            def generate(self, ids: torch.Tensor, mask: torch.Tensor, sampling: Any, keys: torch.Tensor) -> Any:
                return fn(ids, mask, keys)

        def run(ids: torch.Tensor, mask: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
            out = generation.generate_rollout(
                Backend(), ids, mask, sampling, eos_token_id=eos, pad_token_id=0, chunk_size=chunk_size, keys=keys
            )
            return out.response_ids

        return run

    def row_order(ids: torch.Tensor, mask: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        parts = [ours(ids[s : s + chunk_size], mask[s : s + chunk_size], keys[s : s + chunk_size])
                 for s in range(0, ids.shape[0], chunk_size)]  # fmt: skip
        width = max(p.shape[1] for p in parts)
        return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts])

    return {**{side: rollout(fn) for side, fn in sides.items()}, "ours-row-order": row_order}


def synchronize(where: str) -> None:
    """Wait for the GPU's queue, so a timing covers the work and not its launches."""
    if where == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    from rlhf.rollout.generation import mask_after_eos
    from rlhf.tasks.tiny import build_model, build_tokenizer

    tokenizer = build_tokenizer("llama")
    model = build_model(
        tokenizer,
        "llama",
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        max_positions=args.prompt + args.new_tokens,
    ).eval()
    model.to(args.device, PRECISIONS[args.precision])
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, len(tokenizer), (args.rows, args.prompt), generator=gen)
    mask = torch.ones_like(ids)
    if args.prompt_min:
        n = -(-args.rows // args.group)
        lengths = torch.randint(args.prompt_min, args.prompt + 1, (n,), generator=gen)
        lengths = lengths.repeat_interleave(args.group)[: args.rows]
        ids = ids[torch.arange(args.rows) // args.group * args.group]  # a group's rows share their prompt
        for i, length in enumerate(lengths.tolist()):
            ids[i, : args.prompt - length], mask[i, : args.prompt - length] = 0, 0
    else:
        for i in range(args.rows):
            ids[i, : i % 8], mask[i, : i % 8] = 0, 0
    if args.repeated:
        ids[-args.repeated :], mask[-args.repeated :] = ids[: args.repeated], mask[: args.repeated]
    ids, mask = ids.to(args.device), mask.to(args.device)
    keys = torch.arange(args.rows, device=args.device)  # the same draws on every call
    emit({"bench": "generation", "machine": machine(), "torch": torch.__version__, **vars(args)})

    eos = tokenizer.eos_token_id if args.stop_at_eos else -1  # -1: no token id, no row ever stops
    fns = generators(model, args.new_tokens, eos, args.chunk_size, bool(args.repeated) or args.group > 1)
    sides = [s for s in args.sides.split(",") if s] if args.sides else list(fns)
    with torch.no_grad():
        for side in sides:
            fns[side](ids, mask, keys)  # warm-up
        rates: dict[str, list[float]] = {side: [] for side in sides}
        for r, side in alternating(args.rounds, sides):
            synchronize(args.device)
            start = time.perf_counter()
            out = fns[side](ids, mask, keys)
            synchronize(args.device)
            seconds = time.perf_counter() - start
            tokens = mask_after_eos(out, eos, 0)[1].sum().item()
            assert args.stop_at_eos or tokens == args.rows * args.new_tokens, f"{side} made {tuple(out.shape)}"
            rates[side].append(tokens / seconds)
            emit(
                {
                    "bench": "generation",
                    "side": side,
                    "round": r,
                    "tokens": tokens,
                    "seconds": seconds,
                    "new_tokens_per_s": rates[side][-1],
                }
            )
    summary = {side: median(v) for side, v in rates.items()}
    emit({"bench": "generation", "summary": "new_tokens_per_s", **summary})
    ratios = {
        f"ours/{other}": summary["ours"] / summary[other] for other in sides if other != "ours" and "ours" in sides
    }
    emit({"bench": "generation", "ratio": ratios})
    return 0


if __name__ == "__main__":
    sys.exit(main())
