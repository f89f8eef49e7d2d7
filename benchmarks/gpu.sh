#!/usr/bin/env bash
# The bf16 path on one GPU, side by side with TRL: SFT, DPO and GRPO steps on CUDA, then decoding alone (ours
# against `model.generate`).
# Nothing is downloaded there: the model is a random llama built from a transformers config (hidden 1024 x 24
# layers, ~0.3B parameters in its layers), the data is the built-in sorting task, as it is (sequences of ~20-40
# tokens) and with 448 filler tokens before every prompt (--context: sequences of ~470-490 tokens). On an H200 one
# length took ~5 minutes before our DPO on padded rows was added (~1 more; process starts and model building weigh
# most): GPU_SH_CONTEXTS=448 runs one; GPU_SH_PROFILE=1 adds each SFT and DPO side's top ops to the output
# (torch.profiler: kernel time and host time per step, with launches per step; DPO at short sequences was 750 ms a
# step against TRL's 210 on an H200).
# It starts with `rlhf demo --quick` on the GPU: the CPU suite cannot see a tensor left on the wrong device (one
# crashed PPO and GRPO on their first GPU iteration until f913d01).
#
#   bash benchmarks/gpu.sh download   # here, with pip's network: the wheels the GPU image lacks, into .whl/
#   bash benchmarks/gpu.sh            # there (device tool, carry .whl): install .whl/ into /tmp/site and run
#   GPU_SH_TINY=1 bash benchmarks/gpu.sh   # the same benchmarks at a tiny size on the CPU (run by the tests)
#
# Each benchmark prints JSON lines (benchmarks/README.md): per trial, per side, and the ratio ours/TRL; SFT also
# its MFU against the bf16 matmul peak measured on the same device and the peak GPU memory. TRL's side runs only
# where `trl` imports; otherwise ours alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ "${1:-}" = download ]; then
    # what the GPU image (torch 2.11, transformers 5.17, no datasets or trl) lacks for ours and TRL's side, at the
    # versions the CPU suite runs (15 MB; the image has their other needs: pyarrow, fsspec, hub, tokenizers)
    rm -rf .whl && mkdir -p .whl
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl transformers==5.24.0 trl==1.12.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
    ls .whl
    exit 0
fi

if [ -n "${GPU_SH_TINY:-}" ]; then  # the CPU rehearsal: same scripts, tiny model, a few steps
    size=(--hidden 64 --layers 2)
    sft=(--heads 4 --batch-size 8 --steps 4 --log-every 2 --rounds 1 --check-steps 2 --n-train 64 --threads 1 --peak-seconds 0.05)
    dpo=(--pairs 128 --epochs 1 --repeats 1 --settings live --threads 1)  # 8 steps: one log line
    grpo=(--iterations 2 --repeats 1 --sft-steps 4 --threads 1)
    gen=(--hidden 64 --layers 2 --heads 4 --rows 8 --prompt 12 --prompt-min 12 --group 2 --new-tokens 4 --rounds 1
         --threads 1)
    device=cpu
    contexts=(16)
else
    if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}
    fi
    export PYTHONPATH=${PYTHONPATH:-$PWD/src}
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    size=(--hidden 1024 --layers 24)
    sft=(--heads 16 --batch-size 64 --steps 40 --log-every 10 --rounds 1 --check-steps 5 --n-train 4096 --threads 4)
    dpo=(--pairs 512 --epochs 1 --repeats 1 --settings live --threads 4)
    grpo=(--iterations 4 --repeats 1 --sft-steps 20 --threads 4)
    gen=(--hidden 1024 --layers 24 --heads 16 --rows 128 --prompt 100 --prompt-min 100 --group 8 --new-tokens 64
         --rounds 3 --threads 4)
    device=cuda
    read -ra contexts <<< "${GPU_SH_CONTEXTS:-0 448}"
    $PY -c 'import torch, transformers, accelerate; print(torch.__version__, transformers.__version__, accelerate.__version__)'
    # which attention kernel sdpa tries first here (cuDNN's builds a graph for every new shape: benchmarks/README.md)
    $PY -c 'import torch
from torch.nn.attention import SDPBackend
q = torch.ones(1, 1, 8, 64, device="cuda", dtype=torch.bfloat16)
torch.nn.functional.scaled_dot_product_attention(q, q, q)  # the first call settles the default order
names = {int(b): n for n, b in SDPBackend.__members__.items()}
order = [names.get(i, i) for i in torch._C._get_sdp_priority_order()]
print("cudnn", torch.backends.cudnn.version(), "sdpa order", order)' || true
    # the varlen route on this GPU: its kernel, whether trees take it (a check against sdpa on a small tree), and
    # the tests that compare it with the padded batch and the blocks (where pytest is installed)
    $PY -c 'import torch
from rlhf.models import padding_free as pf
cuda = torch.device("cuda")
print("varlen kernel", pf._flash_varlen(cuda), "trees agree", pf._varlen_trees_agree(cuda, torch.bfloat16))' || true
    if $PY -c 'import pytest' 2>/dev/null; then
        $PY -m pytest -q -p no:cacheprovider tests/models/test_padding_free.py -k gpu || true
    fi
fi
impls=ours,trl
$PY -c 'import trl' 2>/dev/null || impls=ours
profile=()
[ -n "${GPU_SH_PROFILE:-}" ] && profile=(--profile)  # torch.profiler's top ops of each SFT and DPO side (slower)

# Each benchmark on its own: one that fails is reported and the others still run; the exit status says if any did.
failed=()
bench() {
    echo "== $*" >&2
    "$@" || failed+=("$*")
}
if [ -z "${GPU_SH_TINY:-}" ]; then  # every stage, the evaluation and the report on CUDA first (18 s on an H200)
    bench $PY -m rlhf demo --quick --out "$(mktemp -d)/demo"
fi
for context in "${contexts[@]}"; do
    common=(--precision bf16 --impls "$impls" --context "$context" "${size[@]}")
    bench $PY benchmarks/bench_sft_rm.py --stage sft "${common[@]}" "${sft[@]}" "${profile[@]}"
    # our SFT on padded batches: on an H200 our padding-free SFT was 0.61x-0.73x TRL's (benchmarks/README.md)
    bench $PY benchmarks/bench_sft_rm.py --stage sft "${common[@]}" "${sft[@]}" --ours-padded --check-steps 0 \
        "${profile[@]}"
    bench $PY benchmarks/bench_dpo.py --device "$device" "${common[@]}" "${dpo[@]}" "${profile[@]}"
    # our DPO on TRL's layout (two padded rows a pair): says whether our flat tree layout is what made our loop
    # 0.28x TRL's at short sequences on an H200
    bench $PY benchmarks/bench_dpo.py --device "$device" "${common[@]}" "${dpo[@]}" --impls ours --ours-padded
    bench $PY benchmarks/bench_grpo.py --device "$device" "${common[@]}" "${grpo[@]}"
done
# decoding alone, GRPO's shape with 100-token prompts: ours against `model.generate`, and a group's prompt cache kept
# once against copied to its rows (the rule that picks between them, SHARED_PREFIX_MIN_REREAD, was measured on CPUs)
bench $PY benchmarks/bench_generation.py --device "$device" --precision bf16 "${gen[@]}" \
    --sides ours,ours-kept-once,ours-copied,hf
if [ ${#failed[@]} -gt 0 ]; then
    printf 'failed: %s\n' "${failed[@]}" >&2
    exit 1
fi
