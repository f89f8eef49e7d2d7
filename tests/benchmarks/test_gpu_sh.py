"""benchmarks/gpu.sh cannot rot: its benchmarks (SFT, DPO, GRPO in bf16, ours and, where `trl` imports, TRL's; then
decoding alone) run on the CPU at a tiny size, as the script runs them on a GPU at its full size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_script_runs_its_benchmarks_at_a_tiny_size_on_the_cpu(tmp_path):
    env = {
        **os.environ,
        "GPU_SH_TINY": "1",
        "PYTHON": sys.executable,
        "CUDA_VISIBLE_DEVICES": "",
        "TMPDIR": str(tmp_path),
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh")], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    setup = next(x for x in lines if x.get("bench") == "setup")
    assert setup["precision"] == "bf16" and setup["device"] == "cpu" and setup["matmul_peak_gflops"] > 0
    assert setup["context"] == 16 and setup["max_length"] == 64 + 16  # the filler reached the trainers' limits
    sft = next(x for x in lines if x.get("bench") == "sft" and x.get("side") == "ours" and "rounds" in x)
    assert sft["samples_per_s"] > 0 and 0 < sft["mfu"] < 1
    dpo = [x for x in lines if x.get("impl") == "ours" and "pairs_per_s" in x]
    grpo = [x for x in lines if x.get("impl") == "ours" and "completions_per_s" in x]
    assert len(dpo) == 2 and all(x["pairs_per_s"] > 0 for x in dpo)  # our flat tree layout, then TRL's padded rows
    assert abs(dpo[0]["mean_loss"] - dpo[1]["mean_loss"]) < 2e-3  # the same pairs and loss: bf16 rounding apart
    assert len(grpo) == 1 and grpo[0]["completions"] == 2 * 16 * 8
    decoding = next(x for x in lines if x.get("summary") == "new_tokens_per_s")
    assert set(decoding) == {"bench", "summary", "ours", "ours-kept-once", "ours-copied", "hf"}
