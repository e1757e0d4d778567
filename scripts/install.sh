#!/usr/bin/env bash
# Installs napari-sgdc and everything it needs into ./.venv (idempotent).
# CPU torch first, so that nothing pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

# Virtual X server and the Qt xcb libraries for the GUI tests (Debian/Ubuntu, as root).
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  missing=()
  for pkg in xvfb libxcb-icccm4 libxcb-keysyms1 libgl1 libegl1 libxkbcommon-x11-0 libxcb-cursor0 libxcb-xinerama0 libxcb-randr0 libxcb-render-util0 libxcb-image0 libxcb-shape0 libfontconfig1 libdbus-1-3; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[testing]"
# bioimageio.core (the tests run exported packages through it) pins bioimageio.spec 0.5.12, which
# refuses every package under pydantic 2.14; core works with the spec 0.5.14 that the export extra
# installs, so it goes in without its pin, with the two dependencies the spec does not bring.
python -c "import bioimageio.core" 2>/dev/null || {
  python -m pip install -q --no-deps "bioimageio.core==0.11.0"
  python -m pip install -q "xarray>=2023" "imagecodecs>=2023"
}

