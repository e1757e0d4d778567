#!/usr/bin/env bash
# Prepares .gpu_wheels/site (git-ignored): the packages napari-sgdc's core path imports beyond what a
# bare GPU machine has (python3 with torch, numpy, scipy, scikit-image, tifffile, safetensors),
# unpacked, so that benchmarks/gpu_check.sh runs there from the repo root with no install step and
# no network. Run it here (with network), then carry .gpu_wheels:
#     bash benchmarks/gpu_prepare.sh              # for Python 3.11 on the GPU machine (default)
#     PYVER=3.12 bash benchmarks/gpu_prepare.sh   # another Python: PyYAML's and numcodecs' compiled parts
# The list was found by running `benchmarks/gpu_check.py --cpu` in a venv holding only the machine's
# packages until no ImportError was left (docs/performance.md, "GPU check").
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER="${PYVER:-3.11}"
PIP="${PIP:-python3 -m pip}"
target=.gpu_wheels/site
rm -rf .gpu_wheels && mkdir -p "$target"
packages=(pyyaml==6.0.4 monai==1.6.1 zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1
          typing_extensions==4.16.0 packaging==26.4 google-crc32c==1.9.0 platformdirs==4.14.9)
$PIP install --quiet --no-deps --target "$target" --only-binary=:all: --python-version "$PYVER" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any "${packages[@]}"
rm -rf "$target/bin"
find "$target" -name __pycache__ -type d -prune -exec rm -rf {} +
echo "$PYVER" > .gpu_wheels/python-version
du -sh .gpu_wheels | awk '{print ".gpu_wheels: " $1 " (limit 64 MiB)"}'
