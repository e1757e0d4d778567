"""Screenshots of the review queue and of a click split, from a real napari window (run under Xvfb).

    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/click_screenshots.py --out docs/images

The built-in nuclei model segments its sample (MoNuSeg TCGA-21-5784, 512²) on the CPU; then
**Review objects** ranks the objects (clicks_queue.png shows the first, framed, with its score
in the status line), and the queue's Split (Shift-D) is pressed on the first queued object
larger than the median that splits (clicks_split_before.png, clicks_split_after.png). A development tool (not
installed with the package); it calls the same methods the buttons and keys call.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from screenshots import _pump, _small_png, _wait  # noqa: E402  (the user-guide screenshot helpers)


def main() -> None:
    import napari

    from napari_sgdc.demo import setup_viewer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/images")
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    viewer = napari.Viewer()
    viewer.window._qt_window.showNormal()
    viewer.window._qt_window.resize(1600, 1000)
    setup_viewer(viewer, "nuclei")
    _, seg = viewer.window.add_plugin_dock_widget("napari-sgdc", "SGDC Segment")
    _pump(1)
    start = time.time()
    seg.run_segment()
    _wait(seg._session, None)
    print("segmented in", round(time.time() - start, 1), "s", flush=True)
    image = seg.image_layer.value
    mask = viewer.layers[f"{image.name} mask"]
    viewer.layers.selection.active = mask
    mask.mode = "pan_zoom"
    queue = seg.objects
    print("queued", queue.build(), "objects:", seg.status.value, flush=True)
    _pump(0.5)
    viewer.screenshot(str(out / "clicks_queue.png"), canvas_only=False)
    from napari_sgdc.clicks import ClickError, split_object

    target = queue.tools.target(mask, ())
    for _ in range(len(queue.queue)):  # the first queued object, larger than the median, that a click splits
        item = queue.queue[queue.position]
        if item.signs["size_log"] > 0.4:
            try:
                split_object(target.labels, target.maps, [item.center])
                break
            except ClickError:
                pass
        queue.next()
    _pump(0.8)
    viewer.screenshot(str(out / "clicks_split_before.png"), canvas_only=False)
    edit = queue.split()
    _pump(0.8)
    print("split:", edit.text if edit else seg.status.value, "at queue position", queue.position + 1, flush=True)
    viewer.screenshot(str(out / "clicks_split_after.png"), canvas_only=False)
    for name in ("clicks_queue.png", "clicks_split_before.png", "clicks_split_after.png"):
        if (out / name).exists():
            _small_png(out / name)
    viewer.close()


if __name__ == "__main__":
    main()
