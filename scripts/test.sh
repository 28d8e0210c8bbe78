#!/usr/bin/env bash
# Set up (scripts/bootstrap.sh), then lint and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
