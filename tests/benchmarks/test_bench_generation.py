"""benchmarks/bench_generation.py cannot rot: its sides run at a tiny size, with and without EOS stops, whole or
in a rollout's chunks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_generation.py"
CHUNKS = ["--prompt", "9", "--prompt-min", "2", "--group", "2", "--chunk-size", "2"]


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("stop", [False, True])
def test_the_generation_benchmark_runs_every_side(stop, chunked):
    args = ["--hidden", "32", "--layers", "1", "--rows", "6", "--prompt", "5", "--new-tokens", "12", "--rounds", "2"]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--threads", "1", *(["--stop-at-eos"] if stop else []),
         *(CHUNKS if chunked else [])],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    trials = [x for x in lines if "round" in x]
    sides = ["ours", "ours-concat", "hf"] + (["ours-kept-once", "ours-copied", "ours-row-order"] if chunked else [])
    assert sorted(x["side"] for x in trials) == sorted(sides * 2)
    by_side = {x["side"]: x["tokens"] for x in trials}
    if stop:  # the ours sides draw the same tokens: neither the cache nor the chunks change a sample
        assert len({tokens for side, tokens in by_side.items() if side != "hf"}) == 1 and by_side["ours"] <= 6 * 12
    else:
        assert set(by_side.values()) == {6 * 12}
    assert set(lines[-1]["ratio"]) == {f"ours/{side}" for side in sides[1:]}


def test_repeated_prompts_add_the_sides_that_keep_their_cache_once_or_copy_it():
    args = ["--hidden", "32", "--layers", "1", "--rows", "6", "--prompt", "5", "--new-tokens", "4", "--rounds", "2",
            "--threads", "1", "--repeated", "2", "--sides", "ours-kept-once,ours-copied"]  # fmt: skip
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines[0]["repeated"] == 2
    assert sorted(x["side"] for x in lines if "round" in x) == ["ours-copied"] * 2 + ["ours-kept-once"] * 2
