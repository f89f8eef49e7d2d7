"""benchmarks/targets_table.py reads targets.sh's JSON lines into one row per target of issue 15."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from targets_table import table  # noqa: E402


def sft(speed: float, mfu: float) -> list[dict]:
    side = {"bench": "sft", "rounds": 5, "tokens_per_s": 1000.0}
    return [
        {"bench": "setup", "machine": {"cpu": "AMD EPYC"}},
        side | {"side": "ours", "mfu": mfu},
        side | {"side": "trl", "mfu": 0.1},
        {"bench": "sft", "ratio": "ours/trl", "speed": speed, "mean_loss_ours": 2.0, "mean_loss_trl": 2.0001},
    ]


def test_each_target_is_read_from_its_own_benchmark_and_judged_against_its_threshold():
    lines = [
        {"target": "sft_fp32"},
        *sft(1.31, 0.48),
        {"target": "rm_fp32"},
        *sft(1.49, 0.5),
        {"target": "dpo_fp32"},
        {"summary": "cached", "loop_speedup": 9.0, "speedup": 9.0},  # not the live reference: not read
        {"summary": "live", "loop_speedup": 2.35, "speedup": 3.25},
        {"target": "ppo_fp32"},
        {
            "summary": "median",
            "loop_speedup": 2.7,
            "speedup": 2.2,
            "ours_loop_episodes_per_s": 270.0,
            "trl_loop_episodes_per_s": 100.0,
            "ours_episodes_per_s": 150.0,
            "trl_episodes_per_s": 68.0,
        },
        {"target": "sft_bf16"},
        {"failed": "sft_bf16"},
        {"target": "mfu_512"},
        *sft(0.0, 0.71)[:2],
    ]
    rows = table(lines).splitlines()
    assert rows[0] == "| target (AMD EPYC) | figure | met |"
    assert rows[2:] == [
        "| SFT fp32, equal compute >= 1.3x | 1.31x (mean loss 2.0000 vs 2.0001) | met |",
        "| RM fp32, equal compute >= 1.5x | 1.49x (mean loss 2.0000 vs 2.0001) | not met |",
        "| DPO loop fp32 >= 1.5x | 2.35x (job 3.25x) | met |",
        "| PPO loop fp32 >= 3x | 2.70x (270 vs 100 episodes/s) | not met |",
        "| PPO whole job fp32 >= 2x | 2.20x (150 vs 68) | met |",
        "| SFT bf16 vs TRL bf16=True >= 1.3x | not run | |",
        "| DPO loop bf16 vs TRL bf16=True >= 1.3x | not run | |",
        "| useful-token MFU, SFT fp32 256 x 4 >= 0.7 | 0.48 (1000 tokens/s) | not met |",
        "| useful-token MFU, SFT fp32 512 x 6 >= 0.7 | 0.71 (1000 tokens/s) | met |",
    ]
