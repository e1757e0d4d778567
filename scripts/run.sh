#!/usr/bin/env bash
# Installs everything, then runs the main job: napari with the plugin docked and a sample image.
# With --headless (or no display), segments the sample and writes mask, boundary and gate PNGs instead.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
exec python -m napari_sgdc.demo "$@"
