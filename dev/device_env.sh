# Sourced by the device round scripts: Ray, transformers and peft from .whl (see
# dev/pack_device_wheels.sh) into /tmp/site once per machine, and the paths they need.
if [ ! -d /tmp/site/ray ]; then
    mkdir -p /tmp/site && tar -xJf .whl/ray-site.tar.xz -C /tmp/site &&
        python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || exit 1
fi
# The C++ extensions as an install builds them (CPU decode figures depend on them); where
# the machine lacks a compiler or headers, the same fallbacks as an install without them.
if [ ! -e /tmp/site/.mirror-ext ]; then
    python3 setup.py -q build_ext --inplace > /tmp/site/.mirror-ext 2>&1 || true
    ls mirror_core/_*.so 2>/dev/null | sed 's/^/[extension] /'
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MIRROR_PARITY_FIXTURE=$PWD/.devfix/official_parity
export RAY_DEDUP_LOGS=0
