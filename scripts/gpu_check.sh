#!/usr/bin/env bash
# Every GPU-only measurement of this project in one call (benchmarks/gpu_check.py says what each step measures):
#   bash scripts/gpu_check.sh --download-wheels .whl   # a CPU machine with PyPI: the wheels a bare GPU image lacks
#   bash scripts/gpu_check.sh --wheels .whl            # the GPU machine: install what differs, measure (< 8 minutes)
#   bash scripts/gpu_check.sh --cpu-smoke              # the same steps at tiny sizes on a CPU (CI runs it)
# Results: runs/gpu_check/gpu_check.jsonl and gpu_check.md (--out DIR). Exit status 1 when any step did not pass.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PYTHON" benchmarks/gpu_check.py "$@"
