#!/usr/bin/env bash
# One device call (~6 min) that decides the read-out kernel's selection method and measures
# the DINOv3-L-sized model as replicas run it against its two unmeasured baselines:
#   here first: bash dev/prepare_device.sh (what the round carries, ~2.5 min, on this side)
#   run: bash dev/device_readout_backbone_round.sh   (carry [".whl", ".devfix", ".devext"], timeout_s 600)
# 1. the Triton kernels' exactness on CUDA (read-out, both methods; GEMM + GELU), GPU
# decode's stream order (tests/gpu_decode_check.py), a replica's uploads overlapping its model
# (tests/scorer_overlap_check.py); 2. memory_bank_gpu.py's sweep of method x launch shape
# (its fastest goes to $OUT/kernel_best); 3. the graphs section with that kernel, compiled
# as replicas compile and with inductor's coordinate-descent tuning of its generated kernels,
# against RoPE computed in every layer and the patch embedding as a convolution. Every figure is
# logged as it is measured (a round cut short keeps them). JSON and logs under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
source dev/device_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 90 python3 tests/kernel_check.py cuda 2>&1 | tail -3
timeout 45 python3 tests/gpu_decode_check.py 2>&1 | tail -2
timeout 60 python3 tests/scorer_overlap_check.py 2>&1 | tail -2
timeout 150 python3 benchmarks/memory_bank_gpu.py --best-to "$OUT/kernel_best" > "$OUT/memory-bank.json" 2> "$OUT/memory-bank.log"
echo "[memory-bank] rc=$? best=$(cat "$OUT/kernel_best" 2>/dev/null)"
grep -E '"(kernel_ms|kernel_best|bank_triton_ms|readout_triton_ms)"' "$OUT/memory-bank.json"
best=$(cat "$OUT/kernel_best" 2>/dev/null || echo "")
grep "\[figure\]" "$OUT/memory-bank.log" | tail -16
bash dev/device_gpu_round.sh graphs 300 ${best:+--kernel-shape "$best"} --compile-modes default,coordinate-descent \
    --graphs-rope-baseline --graphs-patch-baseline
grep -o '"vitl_[a-z0-9_]*img_s": [0-9.]*\|"vitl_[a-z0-9_]*dprob[a-z0-9_]*": [0-9.e-]*' "$OUT/graphs.json"
