#!/usr/bin/env bash
# Download, on a CPU machine with registry access, the small pure-Python dependencies that the GPU machine
# lacks (it has torch, triton, timm, numpy, pytest, no network) into ./wheels (git-ignored). Send them along
# with the device tool's `carry: ["wheels"]`; benchmarks/gpu_suite.sh installs them in its `install` stage.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p wheels
PYVER=${GPU_PYTHON_VERSION:-3.12}
pip download --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d wheels pyyaml tqdm
du -sh wheels
