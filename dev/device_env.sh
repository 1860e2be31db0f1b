# Sourced by the device round scripts: Ray, transformers and peft from .whl (see
# dev/pack_device_wheels.sh) into /tmp/site once per machine (setuptools, for the build
# only, into /tmp/build-site), and the paths they need.
if [ ! -d /tmp/site/ray ] || [ ! -d /tmp/site/pillow_heif ]; then
    mkdir -p /tmp/site && tar -xJf .whl/ray-site.tar.xz -C /tmp/site &&
        python3 -m pip install -q --no-index --no-deps --target /tmp/site $(ls .whl/*.whl | grep -v /setuptools-) &&
        python3 -m pip install -q --no-index --no-deps --target /tmp/build-site .whl/setuptools-*.whl || exit 1
fi
# The C++ extensions as an install builds them (CPU decode figures depend on them); where
# the machine lacks a compiler or headers, the same fallbacks as an install without them.
# No jpeglib.h here: the headers and library carried in .devext (dev/pack_device_libjpeg.sh).
if [ -d .devext ] && ! ls /usr/include/jpeglib.h /usr/include/*-linux-gnu/jpeglib.h > /dev/null 2>&1; then
    export CPATH=$PWD/.devext/include${CPATH:+:$CPATH} LIBRARY_PATH=$PWD/.devext/lib${LIBRARY_PATH:+:$LIBRARY_PATH}
    export LD_LIBRARY_PATH=$PWD/.devext/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    echo "[extension] libjpeg from .devext"
fi
if [ ! -e /tmp/site/.mirror-ext ]; then
    PYTHONPATH=/tmp/build-site python3 setup.py -q build_ext --inplace > /tmp/site/.mirror-ext 2>&1 || true
    ls mirror_core/_*.so 2>/dev/null | sed 's/^/[extension] /'
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MIRROR_PARITY_FIXTURE=$PWD/.devfix/official_parity
export RAY_DEDUP_LOGS=0
