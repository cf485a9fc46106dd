#!/usr/bin/env bash
# One command for GPU evidence (see bench/gpu_evidence.py for the steps, their limits and the budget table):
#   bash bench/gpu_evidence.sh [--out DIR] [--budget-s S]   # on a CUDA or ROCm machine, ten minutes on an H100
#   bash bench/gpu_evidence.sh --smoke [--out DIR]          # every step on the CPU: the script works (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" bench/gpu_evidence.py "$@"
