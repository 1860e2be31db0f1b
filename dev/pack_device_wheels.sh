#!/usr/bin/env bash
# Packs what the lent GPU machine lacks into .whl/ (git-ignored; add "/.whl/" to
# .git/info/exclude): Ray without its Java jars / RLlib / Serve / LLM parts, re-packed as
# tar.xz to fit the 64 MiB carry limit (79 MB wheel -> 31 MB), plus pure-Python wheels.
# On the device (Python 3.12):
#   mkdir -p /tmp/site && tar -xJf .whl/ray-site.tar.xz -C /tmp/site &&
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
#   export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
cd "$(dirname "$0")/.."  # the repository root
RAY_VERSION=${RAY_VERSION:-2.60.0}
work=$(mktemp -d)
mkdir -p .whl
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$work" "ray==$RAY_VERSION"
mkdir "$work/site"
(cd "$work/site" && unzip -q ../ray-*.whl && rm -rf ray/jars ray/rllib ray/serve ray/llm)
tar -cJf .whl/ray-site.tar.xz -C "$work/site" .
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    jsonschema referencing rpds-py jsonschema-specifications "transformers==5.24.0" "peft==0.21.2" "pillow-heif==1.8.1" \
    "setuptools==84.2.1"  # builds the C++ extensions there (a Python 3.12 without setuptools has no setup.py)
rm -rf "$work"
du -sh .whl
