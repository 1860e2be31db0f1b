#!/usr/bin/env bash
# One GPU measurement round on the lent device machine (see /work/.library/device): carries
# .whl (dev/pack_device_wheels.sh), .devfix/official_parity (a copy of the parity fixture)
# and .devext (dev/pack_device_libjpeg.sh): `bash dev/prepare_device.sh` makes all three.
#   bash dev/device_gpu_round.sh "SECTIONS" SECONDS [extra run.py flags...]
# Writes $OUT/<tag>.json and $OUT/<tag>.log per call; never appends to the performance log there.
set -uo pipefail
sections=$1; budget=$2; shift 2
source "$(dirname "$0")/device_env.sh"
tag=$(echo "$sections" | tr ',' '-')
timeout "$budget" python3 benchmarks/run.py --only "$sections" --no-record --json-out "$OUT/$tag.json" "$@" \
    > "$OUT/$tag.log" 2>&1
echo "[$tag] rc=$?"
grep -E "Error|error|Traceback|\[[a-z_]+\] [0-9.]+ s|\[figure\]" "$OUT/$tag.log" | grep -v "issue_detector\|WARNING" | tail -25
