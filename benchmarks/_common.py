"""Shared helpers of the side-by-side benchmarks (ours vs TRL): timing, memory, matmul peak, output, setup.

Each benchmark runs every trial in a fresh worker process (so peak RSS is per trial and neither side inherits
the other's allocator or thread state) and alternates the sides round by round, so background load on a
shared machine hits both alike. The orchestrating process prints one JSON object per line.

    setup = make_setup(out_dir, hidden=256, layers=4)        # tiny llama + seeded RM init + task files
    peak = matmul_peak_flops(threads=2)                      # FLOP/s of big products (torch.matmul, or oneDNN)
    result = run_worker([sys.executable, script, "--worker", ...], result_file)
    emit({"bench": "sft", "side": "ours", **result})
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.utils._python_dispatch


def emit(record: dict[str, Any]) -> None:
    """Print one JSON object on its own line (floats rounded to 5 significant digits), flushed."""

    def tidy(v: Any) -> Any:
        if isinstance(v, float):
            return float(f"{v:.5g}")
        if isinstance(v, dict):
            return {k: tidy(x) for k, x in v.items()}
        if isinstance(v, list):
            return [tidy(x) for x in v]
        return v

    print(json.dumps(tidy(record)), flush=True)


def machine() -> dict[str, Any]:
    """The CPU a figure was measured on: model name, family/model numbers (a VM's "AMD EPYC" alone does not tell
    Zen 3 or 4, family 25, from Zen 5, family 26), cores, and the flags that decide matmul speed (AVX-512, its
    BF16 extension, AMX tiles), read from /proc/cpuinfo (empty where there is none)."""
    info: dict[str, Any] = {"cpu": "", "family_model": "", "cores": os.cpu_count(), "flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    numbers: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not info["cpu"]:
            info["cpu"] = value.strip()
        elif key in ("cpu family", "model") and key not in numbers:
            numbers[key] = value.strip()
        elif key == "flags" and not info["flags"]:
            wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8")
            info["flags"] = [f for f in value.split() if f in wanted]
    info["family_model"] = "/".join(numbers[k] for k in ("cpu family", "model") if k in numbers)
    info["torch_threads"] = torch.get_num_threads()
    return info


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (`ru_maxrss` is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def set_threads(threads: int) -> None:
    """Pin torch's intra-op threads (and the OpenMP default of any child) to `threads`."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""--precision of the benchmarks: fp32 throughout, or bf16 mixed precision (ours: `mixed_precision(p)` as
train.mixed_precision; TRL: bf16=True; both autocast with fp32 master weights)."""


def mixed_precision(precision: str) -> str:
    """Our train.mixed_precision for a --precision."""
    return "bf16" if precision == "bf16" else "no"


def add_context_argument(parser: Any) -> None:
    """--context: filler tokens before every prompt, for longer sequences (`write_data`, `lengths`); --context-spread:
    a filler of random length up to --context instead, for lengths that vary as in real data."""
    parser.add_argument(
        "--context", type=int, default=0, help="filler tokens before every prompt (0: the task's short prompts)"
    )
    parser.add_argument(
        "--context-spread",
        action="store_true",
        help="each prompt's filler a random length from 0 to --context tokens (lengths that vary as in real data)",
    )


def lengths(context: int) -> tuple[int, int]:
    """(max_length, max_prompt_length) of both sides: the task's 64 and 32 tokens, plus the filler."""
    return 64 + context, 32 + context


def write_data(
    out_dir: str | Path, *, n_train: int, n_eval: int, context: int = 0, spread: bool = False, seed: int = 0
) -> dict[str, Path]:
    """The built-in task's files (`write_task_files`), each prompt preceded by `context` random letters and a
    space (the tiny tokenizer is byte-level: one token per letter), so a benchmark can lengthen every sequence
    without changing what is learnt; with `spread`, by a random number of letters from 0 to `context` (uniform),
    so that lengths vary from row to row. Rows keep their other fields, so reward functions still see `letters`."""
    import random

    from rlhf.tasks.sorting import ALPHABET, write_task_files

    files = write_task_files(out_dir, n_train=n_train, n_eval=n_eval, seed=seed)
    if context:
        rng = random.Random(seed)
        for path in files.values():
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            for row in rows:
                message = row["prompt"][0]
                n = rng.randint(0, context) if spread else context
                message["content"] = "".join(rng.choice(ALPHABET) for _ in range(n)) + " " + message["content"]
            path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return files


def add_side_arguments(parser: Any, *, device_flag: bool = False) -> None:
    """The options every side-by-side script shares: --precision, --impls, --context (and --device where the
    script hides CUDA from its trials by default)."""
    add_context_argument(parser)
    parser.add_argument(
        "--precision", choices=tuple(PRECISIONS), default="fp32", help="bf16: mixed precision, both sides"
    )
    parser.add_argument(
        "--impls", default="ours,trl", help="which sides to run (ours alone where TRL is not installed)"
    )
    if device_flag:
        parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: both sides on the GPU")


def device() -> str:
    """Where both sides train: the GPU when there is one (as accelerate and the HF Trainer choose), else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def matmul_peak_flops(
    *, n: int | None = None, seconds: float = 1.0, repeats: int = 5, threads: int | None = None, precision: str = "fp32"
) -> float:
    """Measured matmul throughput (FLOP/s) in `precision` on `device()`: the best of `repeats` bursts of
    (n x n) @ (n x n) products (n: 1024 on a CPU, 8192 on a GPU, which smaller products leave half idle), through
    `torch.matmul` and, for fp32 on a CPU, through oneDNN too, whichever is faster.

    The MFU denominator: what this machine reaches through the libraries torch ships on large, well-shaped
    products with `threads` threads, rather than a datasheet number that a shared 2-core VM never sees. (A 2-core
    Intel Xeon with AMX gave 320-330 GFLOP/s in fp32 and 1200-2600 in bf16, rising with n. On a 2-core AMD EPYC
    Zen 5, `torch.matmul` in fp32 (MKL, which runs its AVX2 code on AMD CPUs) gave 203-221 and oneDNN 440-455:
    before oneDNN was measured too, fp32 MFU figures from that machine were against the lower rate.)
    """
    if threads is not None:
        torch.set_num_threads(threads)
    where, dtype = device(), PRECISIONS[precision]
    n = n or (8192 if where == "cuda" else 1024)
    a, b = torch.randn(n, n, device=where, dtype=dtype), torch.randn(n, n, device=where, dtype=dtype)
    out = torch.empty(n, n, device=where, dtype=dtype)
    products: list[Callable[[], object]] = [lambda: torch.matmul(a, b, out=out)]
    if where == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available():
        products.append(lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""))  # a @ b^T
    sync = torch.cuda.synchronize if where == "cuda" else (lambda: None)
    best = 0.0
    for product in products:
        for _ in range(3):
            product()
        for _ in range(repeats):
            count = 0
            sync()
            start = time.perf_counter()
            while (elapsed := time.perf_counter() - start) < seconds:
                for _ in range(8):
                    product()
                count += 8
                sync()
            best = max(best, 2 * n**3 * count / elapsed)
    return best


def peak_memory_mib() -> float:
    """Peak memory of this process so far in MiB: the GPU's allocator peak on CUDA, else the peak RSS."""
    if device() == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mib()


def mfu(matmul_params: int, tokens_per_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: 6 * N * tokens/s / peak (forward 2N + backward 4N FLOPs per token)."""
    return 6 * matmul_params * tokens_per_s / peak_flops


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters that take part in matmuls: all of them but the input embedding (a lookup, no FLOPs)."""
    embedding = model.get_input_embeddings()
    skip = {id(p) for p in embedding.parameters()} if embedding is not None else set()
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


class StepWindow:
    """A watch over the optimizer steps after `start` up to `end`: `tick(step)` at the end of every step starts it
    at `start` and stops it at `end`, `report()` once it is over. Subclasses say how to `_begin` and `_finish`
    watching, and read what they saw only `_over()` (which stops a watch the run left inside its window, so it
    reports nothing)."""

    def __init__(self, start: int, end: int) -> None:
        if end <= start:
            raise ValueError(f"watched window: end step {end} must follow start step {start}")
        self.start, self.end = start, end
        self.active = self.done = False

    def tick(self, step: int) -> None:
        if step == self.end and self.active:
            self._finish()
            self.active, self.done = False, True
        if step == self.start:
            self._begin()
            self.active = True

    def _over(self) -> bool:
        if self.active and not self.done:
            self._finish()
            self.active = False
        return self.done

    def report(self) -> dict[str, Any]:
        """What a benchmark adds to its trial's record, under the watch's own key."""
        raise NotImplementedError

    def _begin(self) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError


class StepProfiler(StepWindow):
    """torch.profiler over a `StepWindow` (each tick waits for the GPU's queued kernels first); `top_ops()` once
    the window is over."""

    profiler: Any = None

    def tick(self, step: int) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the step's kernels have run, not only been queued
        super().tick(step)

    def _begin(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(activities=activities)
        self.profiler.__enter__()

    def _finish(self) -> None:
        self.profiler.__exit__(None, None, None)

    def report(self) -> dict[str, Any]:
        """{"top_ops": `top_ops()`}: what a benchmark adds to its trial's record."""
        return {"top_ops": self.top_ops()}

    def top_ops(self, n: int = 15) -> dict[str, list[dict[str, Any]]]:
        """The `n` ops with the most self time per profiled step: {"cpu": [...]} (host time: on a GPU, launching
        and waiting), and on a GPU also {"device": [...]} (kernel time); each op with its calls per step, which
        on a GPU are kernel launches. Empty where the run ended inside the window (the profiler is then stopped)."""
        if not self._over():
            return {}
        steps = self.end - self.start
        events = self.profiler.key_averages()
        kinds = {"cpu": "self_cpu_time_total"}
        if torch.cuda.is_available():
            kinds["device"] = "self_device_time_total"
        return {
            kind: [
                {"op": e.key, "self_ms_per_step": getattr(e, attr) / 1000 / steps, "calls_per_step": e.count / steps}
                for e in sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:n]
            ]
            for kind, attr in kinds.items()
        }


PRODUCTS = ("aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm", "mkldnn._linear_pointwise")
"""The matrix products as the dispatcher names them (without the overload): aten's, and oneDNN's product that our
fp32 CPU linear layers call (`rlhf.models.cpu_linear`)."""


def product_flops(op: str, args: Sequence[Any]) -> int:
    """Floating-point operations (2 per multiply-add) of one dispatched op, from its operands' shapes: mm (M, K) @
    (K, N), addmm (bias, a, b), bmm and baddbmm batched alike, `_linear_pointwise(x (.., in), w (out, in), ..)`;
    0 for an op not in `PRODUCTS`."""
    packet = op.rsplit(".", 1)[0]
    if packet == "mkldnn._linear_pointwise":
        return 2 * args[0].numel() * args[1].shape[0]
    if packet in ("aten.mm", "aten.bmm"):
        return 2 * args[0].numel() * args[1].shape[-1]
    if packet in ("aten.addmm", "aten.baddbmm"):
        return 2 * args[1].numel() * args[2].shape[-1]
    return 0


def op_category(op: str) -> str:
    """Where a dispatched op's time goes in `OpTimer`'s summary: products (`PRODUCTS`), attention (its kernels,
    forward and backward), optimizer (fused AdamW and the `_foreach_` ops of clipping and optimizers), or other
    (elementwise, reductions, gathers, copies, the loss)."""
    if op.rsplit(".", 1)[0] in PRODUCTS:
        return "products"
    if "attention" in op:
        return "attention"
    if "_fused_adam" in op or "_foreach_" in op:
        return "optimizer"
    return "other"


class _OpTimes(torch.utils._python_dispatch.TorchDispatchMode):
    """Seconds and calls of every op dispatched while the mode is on; the matrix products also by operand shapes,
    with their FLOPs (`product_flops`)."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.shapes: dict[tuple[str, str], list[float]] = {}  # (op, shapes) -> [seconds, calls, flops]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        t = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        dt = time.perf_counter() - t
        op = str(func)
        self.seconds[op] = self.seconds.get(op, 0.0) + dt
        self.calls[op] = self.calls.get(op, 0) + 1
        flops = product_flops(op, args)
        if flops:
            key = (op, " @ ".join(str(tuple(a.shape)) for a in args[:3] if isinstance(a, torch.Tensor)))
            entry = self.shapes.setdefault(key, [0.0, 0, 0])
            entry[0] += dt
            entry[1] += 1
            entry[2] += flops
        return out


class OpTimer(StepWindow):
    """Host time of every aten op of a `StepWindow` (forward, backward and optimizer alike), each op timed alone as
    it is dispatched (`_OpTimes`); `attribution()` once the window is over. Unlike torch.profiler (whose per-op
    bookkeeping more than doubles the ops this small), it adds a few microseconds per op outside the timed calls
    only. On a GPU it would time launches, not kernels: CPU runs only."""

    def __init__(self, start: int, end: int) -> None:
        super().__init__(start, end)
        self.times = _OpTimes()

    def _begin(self) -> None:
        self.times.__enter__()

    def _finish(self) -> None:
        self.times.__exit__(None, None, None)

    def report(self) -> dict[str, Any]:
        """{"attribution": `attribution()`}: what a benchmark adds to its trial's record."""
        return {"attribution": self.attribution()}

    def attribution(self, n: int = 15) -> dict[str, Any]:
        """Per step of the window: ms and count of all timed ops, ms of each `op_category`, the products' GFLOP and
        rate, the `n` costliest ops (ms and calls) and the `n` costliest product shapes (ms, calls, GFLOP/s). Empty
        where the run ended inside the window (the timer is then stopped)."""
        if not self._over():
            return {}
        steps = self.end - self.start
        t = self.times
        categories = dict.fromkeys(("products", "attention", "other", "optimizer"), 0.0)
        for op, seconds in t.seconds.items():
            categories[op_category(op)] += seconds * 1e3 / steps
        product_s = sum(e[0] for e in t.shapes.values())
        product_flops_total = sum(e[2] for e in t.shapes.values())
        top = sorted(t.seconds, key=t.seconds.__getitem__, reverse=True)[:n]
        shapes = sorted(t.shapes.items(), key=lambda kv: kv[1][0], reverse=True)[:n]
        return {
            "ops_ms_per_step": sum(t.seconds.values()) * 1e3 / steps,
            "ops_per_step": sum(t.calls.values()) / steps,
            "ms_per_step": categories,
            "products_gflop_per_step": product_flops_total / 1e9 / steps,
            "products_gflops_per_s": product_flops_total / 1e9 / product_s if product_s else 0.0,
            "top_ops": [
                {"op": op, "ms_per_step": t.seconds[op] * 1e3 / steps, "calls_per_step": t.calls[op] / steps}
                for op in top
            ],
            "top_products": [
                {
                    "op": op,
                    "shapes": shape,
                    "ms_per_step": s * 1e3 / steps,
                    "calls_per_step": calls / steps,
                    "gflops_per_s": flops / 1e9 / s if s else 0.0,
                }
                for (op, shape), (s, calls, flops) in shapes
            ],
        }


def add_watch_arguments(parser: Any, window: str) -> None:
    """`--profile` (torch.profiler's top ops) or `--attribute` (`OpTimer`: every op timed alone, CPU) over the
    steps each trial watches, which `window` names for the help."""
    watching = parser.add_mutually_exclusive_group()
    watching.add_argument("--profile", action="store_true", help=f"torch.profiler's top ops of {window}")
    watching.add_argument(
        "--attribute",
        action="store_true",
        help=f"every op of {window} timed alone (CPU): ms a step in products, attention, other ops and the "
        "optimizer, ops a step, and the products' GFLOP/s",
    )


def step_watch(args: Any, start: int, end: int) -> StepWindow | None:
    """What watches the steps after `start` up to `end`, as `add_watch_arguments`' flags ask, if anything."""
    if args.profile:
        return StepProfiler(start, end)
    if args.attribute:
        return OpTimer(start, end)
    return None


@contextlib.contextmanager
def traced_train_steps(after_step: Callable[[Any], None] | None = None) -> Iterator[list[float]]:
    """Our `Engine.train_step`, patched for the block: it records every step's loss (the sum of its micro-batches'
    loss sums over the sum of their units, one process) and calls `after_step(engine)` after each step. The
    yielded list holds the step losses once the block has exited: they are read then, so the timed loop gets no
    extra host sync."""
    from rlhf.runtime.engine import Engine

    train_step = Engine.train_step
    steps: list[list[tuple[torch.Tensor, Any]]] = []  # per step, (loss_sum, units) of each micro-batch

    def traced_step(engine: Engine, micro_batches: Any, loss_fn: Any) -> Any:
        sums: list[tuple[torch.Tensor, Any]] = []

        def traced(model: Any, mb: Any) -> Any:
            loss_sum, units, metrics = loss_fn(model, mb)
            sums.append((loss_sum.detach(), units))
            return loss_sum, units, metrics

        out = train_step(engine, micro_batches, traced)
        if after_step is not None:
            after_step(engine)
        steps.append(sums)
        return out

    losses: list[float] = []
    Engine.train_step = traced_step  # type: ignore[method-assign]
    try:
        yield losses
    finally:
        Engine.train_step = train_step  # type: ignore[method-assign]
        losses.extend(float(sum(x for x, _ in s) / sum(float(u) for _, u in s)) for s in steps)


@dataclass
class Setup:
    """What both sides of a benchmark train from: the same weights, the same data files."""

    model_dir: str  # causal LM (SFT starts here)
    rm_init_dir: str  # the same backbone with a seeded one-label head (both RM sides start here)
    data: dict[str, str]  # write_task_files paths by name: sft, preference, ... (+ _eval)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Setup:
        return cls(**json.loads(text))


def make_setup(
    out_dir: str | Path,
    *,
    hidden: int,
    layers: int,
    heads: int = 4,
    n_train: int = 4096,
    context: int = 0,
    spread: bool = False,
    seed: int = 0,
) -> Setup:
    """A tiny llama (rlhf.tasks.tiny), its reward-model initialisation, and the built-in task's data files
    (`write_data`: `context` filler tokens before each prompt, or up to `context` with `spread`)."""
    from rlhf.config import ModelConfig
    from rlhf.models.loading import load_scalar_model, load_tokenizer
    from rlhf.tasks.tiny import make_tiny_checkpoint

    out = Path(out_dir)
    model_dir = make_tiny_checkpoint(
        out / "model", "llama", hidden_size=hidden, num_layers=layers, num_heads=heads, seed=seed
    )
    torch.manual_seed(seed)  # the new score head
    rm = load_scalar_model(ModelConfig(path=str(model_dir)), trainable=False)
    rm.save_pretrained(out / "rm_init")
    load_tokenizer(str(model_dir)).save_pretrained(out / "rm_init")
    data = write_data(out / "data", n_train=n_train, n_eval=64, context=context, spread=spread, seed=seed)
    return Setup(str(model_dir), str(out / "rm_init"), {k: str(v) for k, v in data.items()})


def sft_policy(root: Path, base: str | Path, sft_data: str | Path, *, steps: int, context: int = 0) -> Path:
    """`base` briefly supervised on the task (`rlhf train sft` for `steps` steps of 32 at a constant 3e-3, as
    `rlhf demo` does), for the online benchmarks: their policies then answer with EOS at different lengths. Returns
    the `final/` directory under `root / "sft"`."""
    from rlhf.config import load_config
    from rlhf.trainers import sft

    max_length, max_prompt_length = lengths(context)
    overrides = [
        f"--output_dir={root / 'sft'}",
        f"--model.path={base}",
        f"--data.train={sft_data}",
        f"--train.max_steps={steps}",
        "--train.batch_size=32",
        "--train.micro_batch_size=32",
        "--optim.lr=3e-3",
        "--schedule.name=constant",
        "--logging.progress=false",
        f"--data.max_length={max_length}",
        f"--data.max_prompt_length={max_prompt_length}",
    ]
    return sft.train(load_config(sft.Config, None, overrides)) / "final"


def trial_env(threads: int, device: str = "cpu") -> dict[str, str]:
    """The environment of a trial process: offline, no progress bars or tokenizer threads, `threads` OpenMP and MKL
    threads, and no GPU unless `device` is cuda."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    if device == "cpu":
        env.setdefault("CUDA_VISIBLE_DEVICES", "")
    return env


RESULT = "RESULT "
"""How a trial process marks its record among the lines it prints (`print_result`, `run_trial`)."""


def print_result(record: dict[str, Any]) -> None:
    """A trial's record, for `run_trial` to find in its output."""
    print(RESULT + json.dumps(record), flush=True)


def run_trial(cmd: Sequence[str], env: dict[str, str], name: str) -> dict[str, Any]:
    """Run one trial process, which prints its record with `print_result`; print the record as a JSON line and
    return it. A trial that fails ends the benchmark with its name and the tail of its stderr."""
    proc = subprocess.run(list(cmd), env=env, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith(RESULT)), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-4000:]}")
    record = json.loads(line.removeprefix(RESULT))
    print(json.dumps(record), flush=True)
    return record


def run_worker(cmd: Sequence[str], result_file: Path, *, timeout: float = 1800) -> dict[str, Any]:
    """Run one trial in a fresh process; it writes its result as JSON to `result_file`, which is returned."""
    result_file.unlink(missing_ok=True)
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not result_file.is_file():
        raise RuntimeError(f"worker failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    return json.loads(result_file.read_text())


def alternating(rounds: int, sides: Sequence[str]) -> list[tuple[int, str]]:
    """(round, side) in ABBA order (A B, B A, A B, ...), so a drift in background load favours neither side."""
    order = []
    for r in range(rounds):
        for side in sides if r % 2 == 0 else list(reversed(sides)):
            order.append((r, side))
    return order


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
