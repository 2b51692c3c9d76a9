#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py; docs/benchmarks.md "A GPU check"): on a CUDA machine every step under its own
# time budget, one results file; without CUDA a dry run that still writes it. Arguments go to gpu_check.py, e.g.
#   bash bench/gpu_check.sh --results "$OUT/gpu_check.json"
# PYTHON picks the interpreter: default the project's .venv where there is one, else python3 (the GPU image's).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" bench/gpu_check.py "$@"
