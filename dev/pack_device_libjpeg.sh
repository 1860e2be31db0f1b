#!/usr/bin/env bash
# For a lent GPU machine without libjpeg's headers (the JPEG region decoder builds only
# where they are): this machine's libjpeg-turbo headers and shared library into .devext/
# (git-ignored; carry it with .whl and .devfix). dev/device_env.sh puts them on the
# compiler's and the loader's paths where the device has no jpeglib.h of its own, so that
# CPU-decode figures measured there use the region decoder, as an install with the
# headers does. Run once here: bash dev/pack_device_libjpeg.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .devext/include .devext/lib
for header in jpeglib.h jmorecfg.h jerror.h jconfig.h; do
    found=$(ls /usr/include/"$header" /usr/include/*-linux-gnu/"$header" 2>/dev/null | head -1 || true)
    [ -n "$found" ] || { echo "no $header here: install libjpeg's headers first" >&2; exit 1; }
    cp "$found" .devext/include/
done
lib=$(ls /usr/lib/*-linux-gnu/libjpeg.so.[0-9]* /usr/lib64/libjpeg.so.[0-9]* 2>/dev/null | head -1 || true)
[ -n "$lib" ] || { echo "no shared libjpeg here" >&2; exit 1; }
cp -L "$lib" .devext/lib/"$(basename "$lib" | sed 's/^\(libjpeg\.so\.[0-9]*\).*/\1/')"
ln -sf "$(ls .devext/lib | grep -m1 '^libjpeg\.so\.[0-9]')" .devext/lib/libjpeg.so
ls -l .devext/include .devext/lib
