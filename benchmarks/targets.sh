#!/usr/bin/env bash
# Every CPU target of issue 15 on this machine, with the commands of benchmarks/README.md, in one run (~11 minutes
# on a 2-core CPU, TRL installed): SFT and RM fp32 at equal compute, DPO's loop, PPO's loop and job, SFT and DPO in
# bf16 against TRL's bf16=True, and our SFT's useful-token MFU at hidden 256 and 512. Each benchmark is preceded
# by a {"target": ...} line; `targets_table.py` turns the whole output into the table "Where each target of issue
# 15 stands" holds, one column for this machine (whose CPU every benchmark's setup line names).
#
#   PYTHON=/tmp/benchvenv/bin/python bash benchmarks/targets.sh | tee targets.jsonl
#   python3 benchmarks/targets_table.py targets.jsonl
#
# Run it alone: the machine's two cores are the benchmark's (no tests beside it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
sft=(--hidden 256 --layers 4 --batch-size 32 --steps 60 --log-every 10 --rounds 5 --check-steps 10 --threads 2)
dpo=(--repeats 3 --threads 2 --settings live)
run() {  # run TARGET COMMAND...: the target's marker, then the benchmark's JSON lines; one that fails is named
    local target=$1
    shift
    echo "{\"target\": \"$target\"}"
    "$PY" "$@" | grep '^{' || echo "{\"failed\": \"$target\"}"
}
run sft_fp32 benchmarks/bench_sft_rm.py --stage sft "${sft[@]}"
run rm_fp32 benchmarks/bench_sft_rm.py --stage rm "${sft[@]}"
run dpo_fp32 benchmarks/bench_dpo.py "${dpo[@]}"
run ppo_fp32 benchmarks/bench_ppo.py --repeats 3 --iterations 12
run sft_bf16 benchmarks/bench_sft_rm.py --stage sft "${sft[@]}" --precision bf16
run dpo_bf16 benchmarks/bench_dpo.py "${dpo[@]}" --precision bf16
run mfu_512 benchmarks/bench_sft_rm.py --stage sft --hidden 512 --layers 6 --batch-size 32 --steps 40 --log-every 8 \
    --rounds 3 --check-steps 0 --threads 2 --impls ours
