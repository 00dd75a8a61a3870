#!/usr/bin/env bash
# The prepared device check (issue #24; README, "GPU speed options and the device check"): on one GPU, in
# under 8 minutes, every CUDA-only test (pytest -m cuda) and the GPU figures, each section in a process of
# its own with its own time limit (harness/bench/gpu.py). Prints "no GPU present" and exits 0 without one.
# Python: $PYTHON, else the repository's .venv, else python3 on the PATH.
set -uo pipefail
cd "$(dirname "$0")/../.."
if [ -n "${PYTHON:-}" ]; then
  py=$PYTHON
elif [ -x .venv/bin/python ]; then
  py=.venv/bin/python
else
  py=python3
fi
exec "$py" -m harness.cli bench gpu --all "$@"
