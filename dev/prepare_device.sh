#!/usr/bin/env bash
# Everything a device round carries, made here in one step (a new checkout has none of it:
# all three are git-ignored through .git/info/exclude): .whl (dev/pack_device_wheels.sh),
# .devext (dev/pack_device_libjpeg.sh) and .devfix/official_parity (the parity fixture).
# Skips what is already there. Then: run with carry [".whl", ".devfix", ".devext"].
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info
for path in /.whl/ /.devext/ /.devfix/; do
    grep -qxF "$path" .git/info/exclude 2>/dev/null || echo "$path" >> .git/info/exclude
done
[ -f .whl/ray-site.tar.xz ] || bash dev/pack_device_wheels.sh
[ -f .devext/include/jpeglib.h ] || bash dev/pack_device_libjpeg.sh
fixture=${MIRROR_PARITY_FIXTURE:-../shared/fixtures/official_parity}
[ -f .devfix/official_parity/checkpoint.pth ] || { mkdir -p .devfix && cp -r "$fixture" .devfix/official_parity; }
du -sh .whl .devext .devfix
