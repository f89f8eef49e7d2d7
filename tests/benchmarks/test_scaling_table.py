"""benchmarks/scaling_table.py reads the three benchmarks' JSON lines into one row per shape."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from scaling_table import table  # noqa: E402


def test_one_row_per_shape_with_each_benchmarks_figures():
    sft_setup = {"bench": "setup", "hidden": 128, "layers": 2, "context": 0}
    sft_side = {"bench": "sft", "rounds": 1, "tokens_per_s": 1000.0}
    lines = [
        sft_setup,
        sft_side | {"side": "ours", "mfu": 0.2},
        sft_side | {"side": "trl", "mfu": 0.1},
        {"bench": "sft", "ratio": "ours/trl", "speed": 1.5},
        {"setup": {"hidden": 128, "layers": 2, "context": 0}},
        {"summary": "live", "loop_speedup": 1.3, "speedup": 2.0},
        {"setup": {"hidden": 128, "layers": 2, "context": 0}},
        {
            "summary": "median",
            "loop_speedup": 2.1,
            "speedup": 1.4,
            "ours_loop_completions_per_s": 500.0,
            "trl_loop_completions_per_s": 250.0,
            "ours_generation_tokens_per_s": 9000,
            "trl_generation_tokens_per_s": 7000,
        },
        sft_setup | {"hidden": 256, "layers": 4, "context": 96},
        {"bench": "sft", "ratio": "ours/trl", "speed": 0.9},
        sft_side | {"side": "ours", "mfu": 0.3},
        sft_side | {"side": "trl", "mfu": 0.35},
    ]
    rows = table(lines).splitlines()[2:]
    assert rows == [
        "| short | 128 x 2 | 1.50x (1000; 0.20, 0.10) | 1.30x / 2.00x | 2.10x / 1.40x | 500 vs 250 | 9000 vs 7000 |",
        "| +96 tokens | 256 x 4 | 0.90x (1000; 0.30, 0.35) | - | - | - | - |",
    ]
