#!/usr/bin/env bash
# Create .venv (if missing) and install the package with its test tools and Ray, CPU torch pinned.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first, from the pin, so that nothing resolves it to a CUDA build.
.venv/bin/python -m pip install --quiet -c constraints-dev.txt torch
# The ray extra too, so that the tests of --workers run rather than skip.
.venv/bin/python -m pip install --quiet -c constraints-dev.txt -e ".[test,ray]"
