#!/usr/bin/env bash
# Set up (scripts/bootstrap.sh), make tiny models, merge them with pcb via mergekit-yaml.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/python examples/run_example.py "$@"
