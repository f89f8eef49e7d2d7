#!/usr/bin/env bash
# How cost grows with the model: SFT, DPO and GRPO, ours vs TRL, fp32 on the CPU, at hidden 128 / 256 / 512 / 1024
# (2 / 4 / 6 / 8 layers) and at two sequence lengths (the task as it is, ~20-40 tokens; and with 96 filler tokens
# before every prompt, ~120-140). One trial per side per cell (alternating), short runs: a map of where the
# lead holds, not a precise ratio (benchmarks/README.md has the repeated measurements at the default sizes).
#
#   PYTHON=/tmp/benchvenv/bin/python bash benchmarks/scaling.sh | tee scaling.jsonl
#   python3 benchmarks/scaling_table.py scaling.jsonl        # the markdown table of benchmarks/README.md
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
threads=${THREADS:-2}
for context in 0 96; do
    for size in "128 2" "256 4" "512 6" "1024 8"; do
        set -- $size
        shape=(--hidden "$1" --layers "$2" --context "$context")
        $PY benchmarks/bench_sft_rm.py --stage sft "${shape[@]}" --batch-size 16 --steps 20 --log-every 5 --rounds 1 \
            --check-steps 0 --n-train 1024 --threads "$threads" --peak-seconds 0.5
        $PY benchmarks/bench_dpo.py "${shape[@]}" --pairs 128 --epochs 1 --repeats 1 --settings live --threads "$threads"
        $PY benchmarks/bench_grpo.py "${shape[@]}" --iterations 2 --repeats 1 --sft-steps 20 --threads "$threads"
    done
done
