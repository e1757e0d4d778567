#!/usr/bin/env bash
# GPU check: CUDA checks, segment latency, tiled and whole-slide throughput (fp32, bf16) and a
# 2-minute training-throughput run; prints one table last. From the repo root, on a machine with
# python3 + torch (CUDA), numpy, scipy, scikit-image, tifffile and safetensors, no network and no
# install step: the other packages come from .gpu_wheels/site (bash benchmarks/gpu_prepare.sh,
# run beforehand on a machine with network; carry .gpu_wheels to the GPU machine).
#     bash benchmarks/gpu_check.sh          # the whole check, within 10 minutes
#     bash benchmarks/gpu_check.sh --cpu    # dry run on the CPU at tiny sizes
# Record the table in docs/performance.md ("GPU").
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -d .gpu_wheels/site ]; then
    echo "gpu_check: .gpu_wheels/site is missing: run 'bash benchmarks/gpu_prepare.sh' first" >&2
    exit 2
fi
want=$(cat .gpu_wheels/python-version 2>/dev/null || echo "?")
have=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
[ "$want" = "$have" ] || echo "gpu_check: .gpu_wheels was prepared for Python $want, this is $have (PYVER=$have bash benchmarks/gpu_prepare.sh)" >&2
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
export PYTHONPATH="$PWD/src:$PWD/.gpu_wheels/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
timeout --signal=INT --kill-after=15 "${GPU_CHECK_TIMEOUT:-580}" "$PY" benchmarks/gpu_check.py "$@"
