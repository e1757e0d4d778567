#!/usr/bin/env bash
# Builds the wheel, checks that it carries the built-in models, the sample images and the
# napari manifest, installs it into a fresh venv (dependencies reused from ./.venv instead of
# downloaded again), runs `napari-sgdc predict` from the installed wheel, outside the source
# tree, and opens both docks of the installed plugin in a headless napari viewer.
# Run after scripts/install.sh (CI: .ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
. .venv/bin/activate
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

python -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/dist" .
WHEEL=$(ls "$WORK"/dist/napari_sgdc-*.whl)
python - "$WHEEL" <<'PY'
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
need = ["napari_sgdc/napari.yaml", "napari_sgdc/weights/dermoscopy.safetensors",
        "napari_sgdc/weights/nuclei.safetensors", "napari_sgdc/sample_images/dermoscopy_IMD019.jpg",
        "napari_sgdc/sample_images/he_TCGA-21-5784_crop512.jpg"]
missing = [n for n in need if n not in names]
entry = [n for n in names if n.endswith("entry_points.txt")]
if missing or not entry:
    sys.exit(f"wheel lacks {missing or 'entry_points.txt'}")
print(f"wheel: {sys.argv[1].rsplit('/', 1)[1]}, {len(names)} files, models, samples and manifest inside")
PY

# A fresh venv that sees ./.venv's packages through a .pth line (not its .pth files, so the
# editable install of the source tree stays out), with the wheel installed on top.
python3 -m venv "$WORK/venv"
SITE=$("$WORK/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > "$SITE/sgdc_deps.pth"
"$WORK/venv/bin/python" -m pip install -q --no-deps --no-index "$WHEEL"

cd "$WORK"
"$WORK/venv/bin/python" - "$ROOT" <<'PY'
import sys
from pathlib import Path
import napari_sgdc
from npe2 import PluginManifest
where = Path(napari_sgdc.__file__).resolve()
if Path(sys.argv[1]) in where.parents:
    sys.exit(f"napari_sgdc was imported from the source tree ({where}), not from the wheel")
manifest = PluginManifest.from_distribution("napari-sgdc")
print(f"imported from {where.parent}; npe2 manifest {manifest.name} with "
      f"{len(manifest.contributions.widgets or [])} widgets")
PY
cp "$ROOT/src/napari_sgdc/sample_images/dermoscopy_IMD019.jpg" sample.jpg
"$WORK/venv/bin/napari-sgdc" predict --model dermoscopy --out out sample.jpg
test -s out/sample_mask.png && echo "predict from the installed wheel: out/sample_mask.png written"

# Both docks through napari's plugin machinery (npe2 → the installed manifest → the widgets), headless.
QT_QPA_PLATFORM=offscreen "$WORK/venv/bin/python" - "$ROOT" <<'PY'
import sys
from pathlib import Path
import napari
import napari_sgdc
if Path(sys.argv[1]) in Path(napari_sgdc.__file__).resolve().parents:
    sys.exit("napari_sgdc was imported from the source tree, not from the wheel")
viewer = napari.Viewer(show=False)
try:
    for name in ("SGDC Segment", "SGDC Fine-tune"):
        dock, widget = viewer.window.add_plugin_dock_widget("napari-sgdc", name)
        print(f"dock {name!r} opened from the installed wheel: {type(widget).__module__}.{type(widget).__name__}")
finally:
    viewer.close()
PY
