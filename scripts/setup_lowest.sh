#!/usr/bin/env bash
# A second environment, .venv-lowest, with the lowest torch, torchvision and timm kapify supports (the
# lower bounds in pyproject.toml; tests/test_version_bounds.py keeps the two equal). CI runs the fast
# tests in it after the main suite. torch 2.11 is the GPU machines' version; PyPI's build of it
# brings CUDA libraries (~2.6 GB, under a minute from this project's package registry).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOWEST=("torch==2.11.0" "torchvision==0.26.0" "timm==1.0.25")
[ -x .venv-lowest/bin/python ] || "$PYTHON" -m venv .venv-lowest
.venv-lowest/bin/python -m pip install -q "${LOWEST[@]}"
.venv-lowest/bin/python -m pip install -q -e ".[test]" "${LOWEST[@]}"
