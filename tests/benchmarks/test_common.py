"""The benchmarks' shared helpers: the longer sequences (`--context`: filler before every prompt, nothing else
changed), the record of the machine a figure comes from, and the profile and per-op attribution of a window of
steps."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from _common import OpTimer, StepProfiler, lengths, machine, op_category, product_flops, write_data  # noqa: E402
from rlhf.tasks.tiny import build_tokenizer  # noqa: E402


def test_context_puts_that_many_tokens_before_every_prompt_and_keeps_the_rest(tmp_path):
    plain = write_data(tmp_path / "plain", n_train=16, n_eval=4)
    padded = write_data(tmp_path / "padded", n_train=16, n_eval=4, context=40)
    assert plain.keys() == padded.keys()
    tok = build_tokenizer("llama")
    for kind in plain:
        before = [json.loads(x) for x in plain[kind].read_text().splitlines()]
        after = [json.loads(x) for x in padded[kind].read_text().splitlines()]
        assert len(before) == len(after) > 0
        for b, a in zip(before, after, strict=True):
            filler, _, rest = a["prompt"][0]["content"].partition(" ")
            assert len(filler) == 40 and filler.isalpha() and rest == b["prompt"][0]["content"]
            assert {k: v for k, v in a.items() if k != "prompt"} == {k: v for k, v in b.items() if k != "prompt"}
            ids = [tok.apply_chat_template(r["prompt"], tokenize=True)["input_ids"] for r in (b, a)]
            assert len(ids[1]) - len(ids[0]) == 41  # byte-level: one token per letter, and the space
    assert lengths(40) == (64 + 40, 32 + 40)


def test_machine_names_the_cpu_family_and_model_numbers(monkeypatch):
    """Two processors, as /proc/cpuinfo lists them: the first one's name, numbers and flags are the record (the
    second differs in each, so a parser that kept the last would fail)."""
    cpuinfo = "".join(
        f"processor\t: {i}\nvendor_id\t: AuthenticAMD\ncpu family\t: {family}\nmodel\t\t: {model}\n"
        f"model name\t: {name}\nflags\t\t: fpu {flags} sse\n\n"
        for i, (family, model, name, flags) in enumerate(
            [(26, 2, "AMD EPYC", "avx2 avx512f avx512_bf16"), (25, 17, "AMD EPYC 9B14", "avx2")]
        )
    )
    real = Path.read_text
    monkeypatch.setattr(
        Path, "read_text", lambda self, *a, **k: cpuinfo if str(self) == "/proc/cpuinfo" else real(self, *a, **k)
    )
    info = machine()
    assert (info["cpu"], info["family_model"], info["flags"]) == (
        "AMD EPYC",
        "26/2",
        ["avx2", "avx512f", "avx512_bf16"],
    )


def six_steps(watch: StepProfiler | OpTimer) -> None:
    """Steps 1..6, step s doing s + 2 (8 x 8) products and tanhs, `watch` ticked after each: a window (2, 5] holds
    steps 3, 4 and 5, so 5 + 6 + 7 = 18 of each over 3 steps, 6 a step (a watch of every step, or from the start,
    would count otherwise)."""
    a = torch.randn(8, 8)
    for step in range(1, 7):
        for _ in range(step + 2):
            a = torch.mm(a, a).tanh()
        watch.tick(step)


def test_the_step_profile_counts_only_the_steps_of_its_window():
    profiler = StepProfiler(2, 5)
    six_steps(profiler)
    ops = {op["op"]: op for op in profiler.top_ops(n=100)["cpu"]}
    assert ops["aten::mm"]["calls_per_step"] == 6 and ops["aten::tanh"]["calls_per_step"] == 6
    assert ops["aten::mm"]["self_ms_per_step"] > 0


def test_a_step_profile_whose_window_is_not_over_reports_nothing():
    profiler = StepProfiler(2, 5)
    for step in range(1, 4):
        profiler.tick(step)
    assert profiler.top_ops() == {}
    with pytest.raises(ValueError, match="end step 2 must follow start step 2"):
        StepProfiler(2, 2)


def test_product_flops_count_two_per_multiply_add_from_the_shapes():
    """(M, K) @ (K, N) is M K N multiply-adds: 2 x 3 x 4 x 5 = 120 FLOPs; bias terms are not counted; batched
    products count each batch; oneDNN's x (.., in) @ w (out, in)^T counts every row of x."""
    a, b, bias = torch.ones(3, 4), torch.ones(4, 5), torch.ones(5)
    assert product_flops("aten.mm.default", (a, b)) == 120
    assert product_flops("aten.addmm.default", (bias, a, b)) == 120
    assert product_flops("aten.bmm.default", (torch.ones(2, 3, 4), torch.ones(2, 4, 5))) == 240
    assert product_flops("aten.baddbmm.default", (torch.ones(2, 3, 5), torch.ones(2, 3, 4), torch.ones(2, 4, 5))) == 240
    x, w = torch.ones(2, 3, 4), torch.ones(5, 4)
    assert product_flops("mkldnn._linear_pointwise.default", (x, w, None, "none", [], "")) == 240
    assert product_flops("aten.mul.Tensor", (a, a)) == 0
    assert [op_category(op) for op in ("aten.addmm.default", "aten.mm.out", "aten.mul.Tensor")] == [
        "products",
        "products",
        "other",
    ]
    assert op_category("aten._scaled_dot_product_flash_attention_for_cpu_backward.default") == "attention"
    assert op_category("aten._fused_adamw_.default") == op_category("aten._foreach_norm.Scalar") == "optimizer"


def test_the_attribution_times_the_ops_of_its_window_steps_only():
    """`six_steps`: 6 products and 6 tanhs a step in the window, and 6 x 2 x 8^3 = 6144 FLOPs a step. The
    categories add up to the total."""
    timer = OpTimer(2, 5)
    six_steps(timer)
    report = timer.attribution()
    calls = {op["op"]: op["calls_per_step"] for op in report["top_ops"]}
    assert calls == {"aten.mm.default": 6, "aten.tanh.default": 6} and report["ops_per_step"] == 12
    assert report["products_gflop_per_step"] == pytest.approx(6144e-9)
    assert [(p["shapes"], p["calls_per_step"]) for p in report["top_products"]] == [("(8, 8) @ (8, 8)", 6)]
    assert report["ms_per_step"]["products"] > 0 and report["ms_per_step"]["other"] > 0
    assert sum(report["ms_per_step"].values()) == pytest.approx(report["ops_ms_per_step"])
    assert torch._C._len_torch_dispatch_stack() == 0  # the timer let go of the dispatcher at the window's end


def test_an_attribution_whose_window_is_not_over_reports_nothing_and_stops_timing():
    timer = OpTimer(2, 5)
    for step in range(1, 4):
        torch.ones(2).add(1)
        timer.tick(step)
    assert torch._C._len_torch_dispatch_stack() == 1
    assert timer.attribution() == {}
    assert torch._C._len_torch_dispatch_stack() == 0
    with pytest.raises(ValueError, match="end step 2 must follow start step 2"):
        OpTimer(2, 2)
