#!/usr/bin/env bash
# One command for GPU evidence (see bench/gpu_evidence.py for the steps, their limits and the budget table):
#   bash bench/gpu_evidence.sh [--out DIR] [--budget-s S]   # on a CUDA or ROCm machine, ten minutes on an H100
#   bash bench/gpu_evidence.sh --smoke [--out DIR]          # every step on the CPU: the script works (CI)
# Wheels in .whl/ (bench/gpu_wheels.sh, for a machine with no network) are installed into a private folder first.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
    site="$(mktemp -d)"
    "${PYTHON:-python3}" -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "${PYTHON:-python3}" bench/gpu_evidence.py "$@"
