"""The CPU targets of issue 15 from the JSON lines of `targets.sh`: one row a target, its figure and whether it is met.

    python3 benchmarks/targets_table.py targets.jsonl

Ratios are ours / TRL, medians of alternating trials, as the benchmarks print them; the MFU is our SFT's useful
tokens (padding excluded) against the fp32 matmul peak the same run measured.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

TARGETS = {  # target -> (what, the figure's threshold)
    "sft_fp32": ("SFT fp32, equal compute", 1.3),
    "rm_fp32": ("RM fp32, equal compute", 1.5),
    "dpo_fp32": ("DPO loop fp32", 1.5),
    "ppo_loop": ("PPO loop fp32", 3.0),
    "ppo_job": ("PPO whole job fp32", 2.0),
    "sft_bf16": ("SFT bf16 vs TRL bf16=True", 1.3),
    "dpo_bf16": ("DPO loop bf16 vs TRL bf16=True", 1.3),
    "mfu_256": ("useful-token MFU, SFT fp32 256 x 4", 0.70),
    "mfu_512": ("useful-token MFU, SFT fp32 512 x 6", 0.70),
}


def sections(lines: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """target -> the JSON lines its benchmark printed (after its marker line)."""
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    target = None
    for x in lines:
        if set(x) == {"target"}:
            target = x["target"]
        elif target is not None:
            out[target].append(x)
    return out


def figures(lines: list[dict[str, Any]]) -> tuple[str, dict[str, tuple[float, str]]]:
    """The machine's CPU and each target's (figure, how it was read)."""
    parts = sections(lines)
    cpu = next((x["machine"]["cpu"] for xs in parts.values() for x in xs if "machine" in x), "?")
    out: dict[str, tuple[float, str]] = {}
    for target in ("sft_fp32", "rm_fp32", "sft_bf16"):
        ratio = next((x for x in parts[target] if x.get("ratio") == "ours/trl"), None)
        if ratio:
            note = f"mean loss {ratio['mean_loss_ours']:.4f} vs {ratio['mean_loss_trl']:.4f}"
            out[target] = (ratio["speed"], note)
    for target in ("dpo_fp32", "dpo_bf16"):
        live = next((x for x in parts[target] if x.get("summary") == "live"), None)
        if live:
            out[target] = (live["loop_speedup"], f"job {live['speedup']:.2f}x")
    ppo = next((x for x in parts["ppo_fp32"] if x.get("summary") == "median"), None)
    if ppo:
        loop = f"{ppo['ours_loop_episodes_per_s']:.0f} vs {ppo['trl_loop_episodes_per_s']:.0f} episodes/s"
        out["ppo_loop"] = (ppo["loop_speedup"], loop)
        out["ppo_job"] = (ppo["speedup"], f"{ppo['ours_episodes_per_s']:.0f} vs {ppo['trl_episodes_per_s']:.0f}")
    for target, part in (("mfu_256", "sft_fp32"), ("mfu_512", "mfu_512")):
        ours = next((x for x in parts[part] if x.get("side") == "ours" and "rounds" in x), None)
        if ours:
            out[target] = (ours["mfu"], f"{ours['tokens_per_s']:.0f} tokens/s")
    return cpu, out


def table(lines: list[dict[str, Any]]) -> str:
    cpu, found = figures(lines)
    rows = [f"| target ({cpu}) | figure | met |", "|---|---|---|"]
    for target, (what, threshold) in TARGETS.items():
        unit = "" if target.startswith("mfu") else "x"
        if target not in found:
            rows.append(f"| {what} >= {threshold:g}{unit} | not run | |")
            continue
        value, note = found[target]
        met = "met" if value >= threshold else "not met"
        rows.append(f"| {what} >= {threshold:g}{unit} | {value:.2f}{unit} ({note}) | {met} |")
    return "\n".join(rows)


def main() -> None:
    lines = [json.loads(line) for line in Path(sys.argv[1]).read_text().splitlines() if line.startswith("{")]
    print(table(lines))


if __name__ == "__main__":
    main()
