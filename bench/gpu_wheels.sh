#!/usr/bin/env bash
# For a GPU machine with no network (a lent device, an air-gapped box): download the wheels the evidence run
# uses beyond torch/transformers/peft into .whl/ (git-ignored, ~45 MB) on a machine with PyPI, then carry the
# folder there; bench/gpu_evidence.sh installs what it finds in .whl/ into a private folder before it starts.
#   bash bench/gpu_wheels.sh [PYTHON_VERSION]     # the GPU machine's Python, default 3.12
set -euo pipefail
cd "$(dirname "$0")/.."
py="${1:-3.12}"
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# bitsandbytes: QLoRA rows of stream_gpu; trl + datasets (+ dill, multiprocess): the TRL side of train.py --gpu
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp "${platforms[@]}" \
    -d .whl bitsandbytes==0.50.2 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
ls -la .whl
