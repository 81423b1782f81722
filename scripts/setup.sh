#!/usr/bin/env bash
# Create .venv and install kapify with its test dependencies (idempotent; offline-friendly pins for torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch/torchvision pinned to the releases this project is tested with (installed from the local wheel cache here)
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" "ruff==0.17.6"  # ruff pinned: its format style changes between releases
.venv/bin/python -m pip install -q -e ".[test]"
