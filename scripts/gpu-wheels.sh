#!/usr/bin/env bash
# Download, for a GPU machine without network access, the wheels it lacks into .whl/ (in
# .gitignore); scripts/gpu-check.sh installs them there. GPU_PYTHON_VERSION: that
# machine's Python version (default 3.12). See docs/gpu.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TARGET_PYTHON=${GPU_PYTHON_VERSION:-3.12}
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# What mergekit-pcb needs beyond a PyTorch GPU image (torch, transformers, safetensors,
# accelerate, peft, numpy, pytest ... are there).
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$TARGET_PYTHON" \
  --implementation cp "${platforms[@]}" -d .whl \
  mergekit==0.1.5 cma pydantic pydantic-core annotated-types typing-inspection immutables \
  datasets dill multiprocess "typing_extensions>=4.14"
ls .whl
