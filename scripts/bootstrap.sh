#!/usr/bin/env bash
# Create .venv (if missing) and install the package with its test tools and Ray. torch is
# installed first, at the version pinned in constraints-dev.txt, so that nothing else picks
# its build.
#
# Which torch build:
#   - a machine with an NVIDIA GPU (nvidia-smi on PATH, or /proc/driver/nvidia present):
#     pip's default index, whose Linux torch is a CUDA build;
#   - any other machine: PyTorch's CPU wheel index (https://download.pytorch.org/whl/cpu),
#     tried with a short timeout, then pip's default index if it cannot be reached (on Linux
#     that gives a CUDA build: several GB, which runs on the CPU too);
#   - TORCH_INDEX_URL=URL tries URL first instead (e.g. a ROCm or another CUDA index);
#     TORCH_INDEX_URL=default uses pip's default index alone.
# A torch that already matches the pin is kept. The last line says which torch is installed.
#
# Usage: bash scripts/bootstrap.sh [--torch-plan]
#   --torch-plan: print the index torch would be tried from first, and why; install nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
CPU_INDEX=https://download.pytorch.org/whl/cpu

# The index to try torch from first ("default": pip's own), and why, on two lines.
torch_plan() {
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    printf '%s\n%s\n' "$TORCH_INDEX_URL" "TORCH_INDEX_URL is set"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    printf '%s\n%s\n' default "an NVIDIA GPU: nvidia-smi is on PATH"
  elif [ -e /proc/driver/nvidia ]; then
    printf '%s\n%s\n' default "an NVIDIA GPU: /proc/driver/nvidia exists"
  else
    printf '%s\n%s\n' "$CPU_INDEX" "no NVIDIA GPU: no nvidia-smi on PATH, no /proc/driver/nvidia"
  fi
}

if [ "${1:-}" = "--torch-plan" ]; then
  { read -r index; read -r reason; } < <(torch_plan)
  echo "torch: first index: $index ($reason)"
  exit 0
fi

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip)
"${PIP[@]}" install --quiet --upgrade pip

# The installed torch's version, "" when there is none.
installed_torch() {
  .venv/bin/python - <<'EOF'
from importlib import metadata
try:
    print(metadata.version("torch"))
except metadata.PackageNotFoundError:
    print("")
EOF
}

# Exit status 0 when the simple index at $1 answers within 5 s; else say why.
index_answers() {
  .venv/bin/python - "$1" <<'EOF'
import sys
import urllib.request

url = sys.argv[1].rstrip("/") + "/torch/"
try:
    with urllib.request.urlopen(url, timeout=5):
        pass
except Exception as error:  # DNS failure, refused, timeout, HTTP error: all "no"
    print(f"torch: {url} cannot be reached ({error})")
    sys.exit(1)
EOF
}

# Which build is installed, read from torch/version.py without importing torch (seconds).
describe_torch() {
  .venv/bin/python - <<'EOF'
import importlib.util
import os

spec = importlib.util.find_spec("torch")
if spec is None or not spec.submodule_search_locations:
    print("torch: not installed")
    raise SystemExit(1)
info: dict = {}
path = os.path.join(spec.submodule_search_locations[0], "version.py")
with open(path, encoding="utf-8") as file:
    exec(file.read(), info)
if info.get("cuda"):
    build = f"CUDA {info['cuda']} build"
elif info.get("hip"):
    build = f"ROCm/HIP {info['hip']} build"
else:
    build = "CPU build"
print(f"torch: installed {info['__version__']} ({build})")
EOF
}

pin=$(sed -n 's/^torch==\([^[:space:]#]*\).*/\1/p' constraints-dev.txt)
have=$(installed_torch)
if [ -n "$have" ] && [ "${have%%+*}" = "$pin" ]; then
  echo "torch: $have already installed, matches the pin torch==$pin"
else
  { read -r index; read -r reason; } < <(torch_plan)
  if [ "$index" = default ]; then where="pip's default index"; else where=$index; fi
  echo "torch: installing torch==$pin from $where ($reason)"
  done_from_index=no
  if [ "$index" != default ]; then
    if index_answers "$index" \
      && "${PIP[@]}" install --quiet --timeout 15 --retries 1 --index-url "$index" \
        -c constraints-dev.txt torch; then
      done_from_index=yes
    else
      echo "torch: falling back to pip's default index"
    fi
  fi
  if [ "$done_from_index" = no ]; then
    "${PIP[@]}" install --quiet -c constraints-dev.txt torch
  fi
fi
# The ray extra too, so that the tests of --workers run rather than skip.
"${PIP[@]}" install --quiet -c constraints-dev.txt -e ".[test,ray]"
describe_torch
