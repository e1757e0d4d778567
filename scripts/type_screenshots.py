"""Screenshots of nucleus types in napari, from a real napari window (run under Xvfb).

    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/type_screenshots.py --out docs/images \
        --image ../shared/data/consep/test/images/test_1_000.jpg

The built-in ``nuclei`` model (with CoNSeP's four types) is loaded as **Load checkpoint…** does.
Segment, then T on a nucleus with another active type (types_changed.png), then one type hidden
(types_hidden.png). A development tool (not installed with the package); it calls the same
methods the buttons and keys call.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from screenshots import _pump, _wait  # noqa: E402  (the user-guide screenshot helpers)


def _small_rgb_png(path: Path, width: int = 1120) -> None:
    """Shrinks a screenshot to `width` px, in full colour (a 256-colour palette turns the few
    pixels of a rare type's colour, e.g. one green nucleus, into grey)."""
    from PIL import Image as PILImage

    with PILImage.open(path) as im:
        im = im.convert("RGB")
        im = im.resize((width, round(im.height * width / im.width)), PILImage.LANCZOS) if im.width > width else im
        im.save(path, optimize=True)


def main() -> None:
    import napari

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/images")
    parser.add_argument("--image", default="../shared/data/consep/test/images/test_1_000.jpg")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    viewer = napari.Viewer()
    viewer.window._qt_window.showNormal()
    viewer.window._qt_window.resize(1600, 1000)
    from PIL import Image as PILImage

    image = viewer.add_image(np.asarray(PILImage.open(args.image).convert("RGB")), name=Path(args.image).stem,
                             rgb=True)
    _, seg = viewer.window.add_plugin_dock_widget("napari-sgdc", "SGDC Segment")
    _, ft = viewer.window.add_plugin_dock_widget("napari-sgdc", "SGDC Fine-tune")
    viewer.window._qt_window.tabifyDockWidget(viewer.window._dock_widgets["SGDC Segment (napari-sgdc)"],
                                              viewer.window._dock_widgets["SGDC Fine-tune (napari-sgdc)"])
    viewer.window._dock_widgets["SGDC Segment (napari-sgdc)"].raise_()
    from napari_sgdc.checkpoints import model_path

    assert seg.load_checkpoint(str(model_path("nuclei")))
    seg.image_layer.value = image
    seg.gates.value = False
    _pump(1)
    start = time.time()
    seg.run_segment()
    _wait(seg._session, None)
    print("segmented in", round(time.time() - start, 1), "s:", seg.status.value, flush=True)
    mask = viewer.layers[f"{image.name} mask"]
    viewer.layers[f"{image.name} SGE boundary"].visible = False
    mask.opacity = 0.6
    viewer.layers.selection.active = mask
    mask.mode = "pan_zoom"
    seg.scroll.ensureWidgetVisible(seg.types.container.native)
    _pump(1)
    viewer.screenshot(str(out / "types_segment.png"), canvas_only=False)

    legend = seg.types
    labels = np.asarray(mask.data)
    table = seg._session.object_types(image, labels)[0]
    label = int(np.bincount(labels.ravel())[1:].argmax()) + 1  # the largest nucleus
    rows, cols = np.nonzero(labels == label)
    centre = (float(np.median(rows)), float(np.median(cols)))
    legend.set_active(1 if table[label] != 1 else 2)
    viewer.cursor.position = centre
    change = legend.set_type_at()
    viewer.cursor.position = (centre[0] + 0.01, centre[1])  # napari's hover line reads the new class
    print("T:", change.text if change else seg.status.value, "| edited:", ft.update_edits(), flush=True)
    viewer.camera.center = centre
    viewer.camera.zoom = viewer.camera.zoom * 2.2
    _pump(1)
    viewer.screenshot(str(out / "types_changed.png"), canvas_only=False)
    hide = int(np.argmax([int(row.count.text()) for row in legend.rows])) + 1
    legend.rows[hide - 1].show.setChecked(False)
    _pump(1)
    print("hid", legend.rows[hide - 1].radio.text(), flush=True)
    viewer.screenshot(str(out / "types_hidden.png"), canvas_only=False)
    for name in ("types_segment.png", "types_changed.png", "types_hidden.png"):
        _small_rgb_png(out / name)
    viewer.close()


if __name__ == "__main__":
    main()
