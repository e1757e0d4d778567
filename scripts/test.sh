#!/usr/bin/env bash
# Installs everything, then runs the whole test suite (GUI tests under pytest-xvfb).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
python -m pytest "$@"
