#!/usr/bin/env bash
# Download the wheels the lent GPU image lacks into .whl/ (ignored by git), for the device tool's `carry`:
# diffusers, k-diffusion, torchsde and the pure-Python packages they need that the image does not hold
# (the image's package list: the device tool's KINDS.md). gpu_check.sh installs whatever .whl/ holds.
#   usage: benchmarks/gpu_wheels.sh            then: run(..., carry=[".whl"], command="benchmarks/gpu_check.sh $OUT")
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  diffusers==0.42.1 k-diffusion==0.1.1.post1 torchsde==0.2.6 trampoline==0.1.2 importlib_metadata
ls .whl
