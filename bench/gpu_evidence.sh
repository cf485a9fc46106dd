#!/usr/bin/env bash
# One command for GPU evidence (see bench/gpu_evidence.py): bash bench/gpu_evidence.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" bench/gpu_evidence.py ${1:+--out "$1"}
