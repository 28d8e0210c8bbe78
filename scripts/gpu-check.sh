#!/usr/bin/env bash
# The GPU checks as ONE command for a GPU machine without network access (see
# docs/gpu.md): install the wheels of .whl/ (scripts/gpu-wheels.sh), run the CUDA tests,
# the kernel table, the end-to-end --cuda merges, the tuner's and the Evolver's CUDA
# benchmarks;
# everything goes to $OUT (default /tmp/gpu-check).
# Usage there, from the repository root:  OUT=/some/folder bash scripts/gpu-check.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
run() { echo "== $*"; timeout "$1" "${@:2}" 2>&1 | tee -a "$OUT/log.txt" | tail -40; }
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/device.txt"
run 60 python3 -m pytest -q -p no:cacheprovider tests/test_selection.py tests/test_pcb.py \
  tests/test_model_stats.py tests/test_method.py tests/test_contributions.py -k "cuda or gpu"
run 130 python3 -m benchmarks.kernel_speed --device cuda
run 190 python3 -m benchmarks.merge_speed --size 500m --cuda --repeats 1
run 100 python3 -m benchmarks.tune_speed --size 500m --device cuda --candidates 3
run 60 python3 -m benchmarks.evolve_speed --size 500m --device cuda --rounds 1 --candidates 3
