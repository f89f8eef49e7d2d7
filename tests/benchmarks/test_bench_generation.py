"""benchmarks/bench_generation.py cannot rot: its three sides run at a tiny size, with and without EOS stops."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_generation.py"


@pytest.mark.parametrize("stop", [False, True])
def test_the_generation_benchmark_runs_every_side(stop):
    args = ["--hidden", "32", "--layers", "1", "--rows", "6", "--prompt", "5", "--new-tokens", "12", "--rounds", "2"]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--threads", "1", *(["--stop-at-eos"] if stop else [])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    trials = [x for x in lines if "round" in x]
    assert sorted(x["side"] for x in trials) == sorted(["ours", "ours-concat", "hf"] * 2)
    by_side = {x["side"]: x["tokens"] for x in trials}
    if stop:  # ours and ours-concat draw the same tokens: the cache changes no sample
        assert by_side["ours"] == by_side["ours-concat"] <= 6 * 12
    else:
        assert set(by_side.values()) == {6 * 12}
    assert set(lines[-1]["ratio"]) == {"ours/ours-concat", "ours/hf"}
