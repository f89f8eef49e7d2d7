"""The scaling table of benchmarks/README.md from the JSON lines of `scaling.sh`.

    python3 benchmarks/scaling_table.py scaling.jsonl

One row per (sequence length, model size): SFT samples/s ratio and MFU; DPO's loop and whole-job ratios; GRPO's
loop and job ratios, and generation throughput (new tokens/s) next to the loop's completions/s on each side.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any


def cells(lines: list[dict[str, Any]]) -> dict[tuple[int, int, int], dict[str, Any]]:
    """(context, hidden, layers) -> the figures of the three benchmarks run at that shape."""
    out: dict[tuple[int, int, int], dict[str, Any]] = defaultdict(dict)
    key: tuple[int, int, int] | None = None
    for x in lines:
        setup = x.get("setup") if isinstance(x.get("setup"), dict) else x if x.get("bench") == "setup" else None
        if setup is not None:
            key = (setup["context"], setup["hidden"], setup["layers"])
            continue
        if key is None:
            continue
        cell = out[key]
        if x.get("bench") == "sft" and "side" in x and "rounds" in x:
            cell[f"sft_{x['side']}"] = x
        elif x.get("bench") == "sft" and x.get("ratio"):
            cell["sft_ratio"] = x["speed"]
        elif x.get("summary") == "live":
            cell["dpo"] = x
        elif x.get("summary") == "median":
            cell["grpo"] = x
    return out


def table(lines: list[dict[str, Any]]) -> str:
    rows = [
        "| sequences | hidden x layers | SFT ours/TRL (ours tokens/s; MFU ours, TRL) | DPO loop / job | "
        "GRPO loop / job | GRPO loop completions/s, ours vs TRL | generation new tokens/s, ours vs TRL |",
        "|---|---|---|---|---|---|---|",
    ]
    for (context, hidden, layers), c in sorted(cells(lines).items()):
        seq = "short" if context == 0 else f"+{context} tokens"
        sft = "-"
        if "sft_ratio" in c:
            o, t = c["sft_ours"], c["sft_trl"]
            sft = f"{c['sft_ratio']:.2f}x ({o['tokens_per_s']:.0f}; {o['mfu']:.2f}, {t['mfu']:.2f})"
        dpo = f"{c['dpo']['loop_speedup']:.2f}x / {c['dpo']['speedup']:.2f}x" if "dpo" in c else "-"
        g = c.get("grpo")
        grpo = f"{g['loop_speedup']:.2f}x / {g['speedup']:.2f}x" if g else "-"
        loop = f"{g['ours_loop_completions_per_s']:.0f} vs {g['trl_loop_completions_per_s']:.0f}" if g else "-"
        gen = f"{g['ours_generation_tokens_per_s']:.0f} vs {g['trl_generation_tokens_per_s']:.0f}" if g else "-"
        rows.append(f"| {seq} | {hidden} x {layers} | {sft} | {dpo} | {grpo} | {loop} | {gen} |")
    return "\n".join(rows)


def main() -> None:
    text = Path(sys.argv[1]).read_text() if len(sys.argv) > 1 else sys.stdin.read()
    print(table([json.loads(line) for line in text.splitlines() if line.startswith("{")]))


if __name__ == "__main__":
    main()
