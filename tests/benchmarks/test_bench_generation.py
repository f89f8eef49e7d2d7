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
    sides = ["ours", "ours-concat", "hf"] + (["ours-row-order"] if chunked else [])
    assert sorted(x["side"] for x in trials) == sorted(sides * 2)
    by_side = {x["side"]: x["tokens"] for x in trials}
    if stop:  # the ours sides draw the same tokens: neither the cache nor the chunks change a sample
        assert by_side["ours"] == by_side["ours-concat"] == by_side.get("ours-row-order", by_side["ours"]) <= 6 * 12
    else:
        assert set(by_side.values()) == {6 * 12}
    assert set(lines[-1]["ratio"]) == {f"ours/{side}" for side in sides[1:]}
