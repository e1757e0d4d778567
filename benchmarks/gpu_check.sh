#!/usr/bin/env bash
# GPU check: CUDA tests, then the benchmarks on CUDA; prints a short table last.
# Run on a machine with an NVIDIA GPU (for example through the device tool), from the repo root:
#     bash benchmarks/gpu_check.sh
# Record the table in docs/performance.md.
set -uo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/install.sh
. .venv/bin/activate
out=$(mktemp -d)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python -m pytest -q benchmarks/cuda_checks.py tests/test_model_sgdc.py tests/test_model_sge.py \
  tests/test_model_segmenter.py tests/test_inference.py 2>&1 | tail -n 5 | tee "$out/tests.txt"
python benchmarks/sgdc_op.py --device cuda --repeats 10 | tee "$out/sgdc_op.md"
python benchmarks/segment_latency.py --devices cuda --runs 20 | tee "$out/latency.md"
python benchmarks/tiled_inference.py --device cuda | tee "$out/tiled.md"
echo
echo "== GPU check summary =="
cat "$out/gpu.txt"
tail -n 1 "$out/tests.txt"
grep -h '^| cuda' "$out/sgdc_op.md" "$out/latency.md" "$out/tiled.md"
