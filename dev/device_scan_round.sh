#!/usr/bin/env bash
# One device call (~9 min) measuring the fastest precision end to end, compiled replicas on
# runs long enough that their compilation sits outside the steady window:
#   here first: bash dev/prepare_device.sh (what the round carries, ~1-2.5 min, on this side)
#   run: bash dev/device_scan_round.sh   (carry [".whl", ".devfix", ".devext"], timeout_s 590)
# 1. the Triton kernels' and the tanh GELU epilogue's exactness on CUDA (tests/kernel_check.py);
# 2. a scan of pre-resized shards, 65,536 images, one compiled `bf16-gelu-tanh` replica,
# against the same precision's pure model; 3. raw 1080p-class JPEG shards, 49,152 images,
# GPU decode, two compiled replicas sharing the GPU, same precision. JSON and logs under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
source dev/device_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 90 python3 tests/kernel_check.py cuda 2>&1 | tail -3
precision=${PRECISION:-bf16-gelu-tanh}
bash dev/device_gpu_round.sh pipeline 200 --pipeline-compile --pipeline-precision "$precision" --pipeline-images 65536
grep -o '"gpu_[a-z_]*\(img_s\|efficiency\|first_batch_s\)": [0-9.]*' "$OUT/pipeline.json"
bash dev/device_gpu_round.sh raw_jpeg 240 --raw-modes gpu --raw-compile --raw-actors 2 --raw-precision "$precision" \
    --raw-images 49152
grep -o '"raw_[a-z_]*\(img_s\|over_pure\|first_batch_s\|kb\)": [0-9.]*' "$OUT/raw_jpeg.json"
