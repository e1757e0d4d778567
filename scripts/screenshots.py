"""Makes the user-guide screenshots from a real napari window (run under Xvfb).

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/screenshots.py --out docs/images
    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/screenshots.py --review   # uncertainty, fine-tune
    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/screenshots.py --slide    # whole slide

A development tool (not installed with the package): it reads the ground truth from
the shared data folder and drives napari through some private attributes.

It goes through the loop a user does with the mouse, by calling the same widget
methods the buttons call: open a sample, segment, paint a correction, fine-tune,
and segment again. With ``--model`` it starts from that model (a built-in name or a
checkpoint); without one, or when the built-ins are not installed, it starts from
a random tiny model and the "correction" is the sample's ground truth from the
shared data folder, so the pictures show what the GUI loop does, not a trained
model's accuracy (the captions in docs/user_guide.md say which was used).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"  # <repo>/../shared/data


def _data_root() -> Path:
    return Path(os.environ.get("NAPARI_SGDC_DATA", SHARED))


def _wait(session, app, timeout: float = 600.0) -> None:
    """Processes Qt events until no SGDC job runs."""
    from qtpy.QtWidgets import QApplication

    app = app or QApplication.instance()
    start = time.time()
    while not session.busy.idle:
        app.processEvents()
        time.sleep(0.02)
        if time.time() - start > timeout:
            raise TimeoutError("SGDC job did not finish")
    for _ in range(20):
        app.processEvents()
        time.sleep(0.01)


def _tiny_checkpoint(path: Path, task: str) -> Path:
    import torch

    from napari_sgdc.checkpoints import save_checkpoint
    from napari_sgdc.model import build_model, tiny_config

    torch.manual_seed(0)
    return save_checkpoint(path, build_model(tiny_config(task=task)).eval(),
                           provenance={"note": f"random tiny {task} model (screenshots)"})


def _ground_truth(kind: str) -> np.ndarray:
    """The sample's ground truth, cut/resized exactly like the bundled sample."""
    from PIL import Image as PILImage

    root = _data_root()
    if kind == "dermoscopy":
        with PILImage.open(root / "ph2" / "masks" / "IMD019.png") as mask:
            return np.asarray(mask.resize((512, 385), PILImage.NEAREST)) > 0
    with PILImage.open(root / "monuseg" / "train" / "instances" / "TCGA-21-5784-01Z-00-DX1.png") as inst:
        return np.asarray(inst)[:512, :512].astype(np.int32)


def _run_case(viewer, seg, ft, app, kind: str, source: str | None, tmp: Path, steps: int, out: Path) -> dict:
    from napari_sgdc._napari._layers import result_name

    session = seg._session
    for layer in list(viewer.layers):
        viewer.layers.remove(layer)
    image = viewer.open_sample("napari-sgdc", kind)[0]
    seg.reset_choices()
    seg.image_layer.value = image
    used = source
    if used is None or not (used.startswith("built-in: ") or Path(used).is_file()):
        checkpoint = _tiny_checkpoint(tmp / f"tiny_{kind}.safetensors", "semantic" if kind == "dermoscopy" else "instance")
        seg.load_checkpoint(str(checkpoint))
        used = None
    else:
        seg.reset_choices()
        seg.model.value = used
    ft.pairs = []
    ft.training_list.reset_choices()
    seg.run_segment()
    _wait(session, app)
    info = {"kind": kind, "model": used or "random tiny model, fine-tuned in the GUI on this image"}
    if used is None:
        mask_layer = viewer.layers[result_name(image.name, "mask")]
        mask_layer.data = _ground_truth(kind).astype(mask_layer.data.dtype)  # the "painted" correction
        ft.reset_choices()
        ft.image_layer.value = image
        ft.labels_layer.value = mask_layer
        ft.advanced.value = True
        ft.steps.value = steps
        ft.learning_rate.value = 0.005
        ft.freeze_encoder.value = False
        ft.start_finetune()
        _wait(session, app)
        info["finetune_status"] = ft.status.value
        viewer.window._qt_window.resize(1500, 950)
        app.processEvents()
        if kind == "dermoscopy":
            _show_only(viewer, [image.name, result_name(image.name, "mask")])
            viewer.window.screenshot(str(out / "finetune_dock.png"), canvas_only=False, flash=False)
    return info


def _show_only(viewer, names: list[str]) -> None:
    for layer in viewer.layers:
        layer.visible = layer.name in names
    viewer.reset_view()


def _grid_screenshot(viewer, names: list[str], path: Path) -> None:
    """Screenshot of `names` side by side in napari's grid mode (other layers set aside)."""
    from qtpy.QtWidgets import QApplication

    kept = [layer for layer in viewer.layers if layer.name in names]
    aside = [layer for layer in viewer.layers if layer.name not in names]
    for layer in aside:
        viewer.layers.remove(layer)
    for layer in kept:
        layer.visible = True
        layer.opacity = 1.0
        layer.blending = "translucent"
    grid = viewer.canvas.grid if hasattr(getattr(viewer, "canvas", None), "grid") else viewer.grid
    grid.enabled = True
    grid.shape = (2, 2)
    QApplication.instance().processEvents()
    viewer.reset_view()
    QApplication.instance().processEvents()
    viewer.window.screenshot(str(path), canvas_only=False, flash=False)
    grid.enabled = False
    for layer in aside:
        viewer.layers.append(layer)


def _pump(seconds: float = 0.3) -> None:
    from qtpy.QtWidgets import QApplication

    end = time.time() + seconds
    while time.time() < end:
        QApplication.processEvents()
        time.sleep(0.01)


def _small_png(path: Path, width: int = 1120, colors: int = 160) -> None:
    """Shrinks a screenshot to `width` px and a 256-colour palette (docs images stay < 400 KB)."""
    from PIL import Image as PILImage

    with PILImage.open(path) as im:
        im = im.convert("RGB")
        if im.width > width:
            im = im.resize((width, round(im.height * width / im.width)), PILImage.LANCZOS)
        im.quantize(colors, method=PILImage.Quantize.MEDIANCUT, dither=PILImage.Dither.NONE).save(path, optimize=True)


def review_screenshots(out: Path) -> None:
    """uncertainty_next_region.png, finetune_edited.png, finetune_after.png: the built-in nuclei
    model on its sample, Next region, a correction painted from the ground truth inside the
    region, fine-tune and re-segment."""
    import napari
    from PIL import Image as PILImage

    from napari_sgdc.demo import setup_viewer

    viewer = napari.Viewer()
    viewer.window._qt_window.showNormal()
    viewer.window._qt_window.resize(1600, 1000)
    setup_viewer(viewer, "nuclei")
    _, seg = viewer.window.add_plugin_dock_widget("napari-sgdc", "SGDC Segment")
    _, ft = viewer.window.add_plugin_dock_widget("napari-sgdc", "SGDC Fine-tune")
    _pump(1)
    session = seg._session
    image = seg.image_layer.value
    start = time.time()
    seg.run_segment()
    _wait(session, None)
    print("segmented in", round(time.time() - start, 1), "s", flush=True)
    uncertainty = viewer.layers[f"{image.name} uncertainty"]
    uncertainty.visible = True
    seg.next_region()
    _pump(0.3)
    seg.next_region()
    _pump(0.5)
    mask = viewer.layers[f"{image.name} mask"]
    outline = viewer.layers[f"{image.name} next region"].data[0]
    top, left = np.ceil(outline.min(axis=0)).astype(int)
    bottom, right = (np.floor(outline.max(axis=0)) + 1).astype(int)
    box = (slice(top, bottom), slice(left, right))
    inside = np.asarray(mask.data)[box]
    ids, counts = np.unique(inside[inside > 0], return_counts=True)
    if len(ids):  # hover the largest nucleus of the region: the status bar shows its confidence
        rows, cols = np.nonzero(inside == ids[np.argmax(counts)])
        viewer.cursor.position = tuple(image.data_to_world((rows.mean() + top, cols.mean() + left)))
    _pump(0.5)
    viewer.screenshot(str(out / "uncertainty_next_region.png"), canvas_only=False)

    # correct the mask inside the region from the ground truth (what a user would paint)
    uncertainty.visible = False
    with PILImage.open(_data_root() / "monuseg" / "train" / "instances" / "TCGA-21-5784-01Z-00-DX1.png") as im:
        truth = np.asarray(im)[:512, :512].astype(np.int32)
    current = np.array(mask.data)
    target = current.copy()

    def inner(labels: np.ndarray) -> np.ndarray:  # objects entirely inside the region
        sub = labels[box]
        border = np.unique(np.concatenate([sub[0], sub[-1], sub[:, 0], sub[:, -1]]))
        return np.setdiff1d(np.unique(sub[sub > 0]), border)

    target[np.isin(current, inner(current))] = 0  # erase the model's objects in the region...
    for number, gt in enumerate(inner(truth), start=int(current.max()) + 1):  # ...paint the true nuclei
        target[(truth == gt) & (target == 0)] = number
    changed = np.nonzero(target != current)
    mask.data_setitem(changed, target[changed])
    viewer.layers.selection.active = mask
    _pump(1.0)
    print("edits:", ft.edits.value, flush=True)
    viewer.screenshot(str(out / "finetune_edited.png"), canvas_only=False)
    ft.preset.value = "quick"
    ft.start_finetune()
    _wait(session, None)
    print("fine-tune:", ft.status.value, flush=True)
    _pump(0.5)
    viewer.screenshot(str(out / "finetune_after.png"), canvas_only=False)
    viewer.close()


def _build_he_slide(path: Path, size: int = 4096) -> Path:
    """A pyramidal OME-TIFF (0.25 µm/px) tiled from real H&E (MoNuSeg), with white background
    (benchmarks/wholeslide.py's builder)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from wholeslide import build_slide

    return build_slide(size, path)


def slide_screenshots(out: Path, slide: Path | None, model: str, work: Path) -> None:
    """wholeslide_fov.png and wholeslide_whole.png: a slide opened through the reader, its field
    of view segmented, then the whole slide in the background (progress in the activity dock)."""
    import napari

    from napari_sgdc._napari import _wholeslide as ws

    slide = slide or _build_he_slide(work / "he_slide.ome.tif")
    viewer = napari.Viewer()
    viewer.window._qt_window.showNormal()
    viewer.window._qt_window.resize(1600, 1000)
    _, seg = viewer.window.add_plugin_dock_widget("napari-sgdc", "SGDC Segment")
    [layer] = viewer.open(str(slide), plugin="napari-sgdc")
    seg.reset_choices()
    seg.model.value = model if Path(model).suffix else f"built-in: {model}"
    seg.image_layer.value = layer
    _pump(1)
    viewer.reset_view()
    _pump(0.5)
    # the field of view: about 1200 x 800 level-0 pixels of tissue (300 x 200 µm)
    camera = ws._camera(viewer)
    camera.center = tuple(layer.data_to_world((900, 1000)))
    size = np.asarray(viewer.canvas.viewbox_size(viewer.layers), dtype=float)
    camera.zoom = float(np.min(size / (np.asarray(layer.scale) * (800, 1200))))
    _pump(1)
    seg.target.value = ws.TARGET_VIEW
    start = time.time()
    job = seg.run_segment()
    _wait(seg._session, None)
    print("field of view", job.roi, "in", round(time.time() - start, 1), "s:", seg.status.value, flush=True)
    nuclei = viewer.layers[f"{layer.name} view nuclei"]
    nuclei.contour = 2
    nuclei.opacity = 0.9
    _pump(1)
    viewer.window.screenshot(str(out / "wholeslide_fov.png"), canvas_only=False, flash=False)
    _small_png(out / "wholeslide_fov.png")

    seg.target.value = ws.TARGET_WHOLE
    seg.output.value = str(work)
    shutil_store = ws.whole_store(ws.slide_of(layer), work)
    if shutil_store.exists():
        import shutil

        shutil.rmtree(shutil_store)
    for name in list(viewer.layers):
        if name.name.startswith(f"{layer.name} view"):
            name.visible = False
    viewer.reset_view()
    start = time.time()
    job = seg.run_segment()
    shot_taken = False
    while not seg._session.busy.idle:
        _pump(0.5)
        if not shot_taken and job.done >= max(2, job.total // 2):  # half-way: the run goes on in the background
            viewer.window.screenshot(str(work / "wholeslide_running.png"), canvas_only=False, flash=False)
            shot_taken = True
    print("whole slide in", round(time.time() - start, 1), "s:", seg.status.value, flush=True)
    viewer.layers[f"{layer.name} nuclei"].opacity = 0.8
    viewer.layers[f"{layer.name} probability"].visible = False
    viewer.reset_view()
    _pump(2)
    viewer.window.screenshot(str(out / "wholeslide_whole.png"), canvas_only=False, flash=False)
    _small_png(out / "wholeslide_whole.png")
    viewer.close()


def main() -> None:
    """Writes the screenshots named in docs/user_guide.md into --out."""
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/images")
    parser.add_argument("--dermoscopy-model", default=None, help="built-in name or checkpoint (default: tiny + fine-tune)")
    parser.add_argument("--nuclei-model", default=None, help="built-in name or checkpoint (default: tiny + fine-tune)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--review", action="store_true",
                        help="only the uncertainty / fine-tune screenshots (built-in nuclei model)")
    parser.add_argument("--slide", nargs="?", const="", default=None, metavar="PATH",
                        help="only the whole-slide screenshots; PATH: a slide (default: one built from MoNuSeg)")
    parser.add_argument("--slide-model", default="nuclei", help="built-in name or checkpoint for --slide")
    parser.add_argument("--work", default=None, help="folder for the built slide and its store (default: temporary)")
    args = parser.parse_args()
    if args.review or args.slide is not None:
        import tempfile

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        if args.review:
            review_screenshots(out)
        if args.slide is not None:
            with tempfile.TemporaryDirectory() as tmp_name:
                work = Path(args.work or tmp_name)
                work.mkdir(parents=True, exist_ok=True)
                slide_screenshots(out, Path(args.slide) if args.slide else None, args.slide_model, work)
        return

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_sgdc._napari._layers import result_name
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1500, 950)
    _, seg = viewer.window.add_plugin_dock_widget("napari-sgdc", "SGDC Segment")
    _, ft = viewer.window.add_plugin_dock_widget("napari-sgdc", "SGDC Fine-tune")
    app = QApplication.instance()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)

        def builtin(name):
            return f"built-in: {name}" if name and not Path(name).suffix else name

        info = _run_case(viewer, seg, ft, app, "dermoscopy", builtin(args.dermoscopy_model), tmp, args.steps, out)
        print(info)
        name = viewer.layers[0].name
        _show_only(viewer, [name, result_name(name, "mask"), result_name(name, "SGE boundary")])
        from napari.utils.colormaps import DirectLabelColormap

        mask_layer = viewer.layers[result_name(name, "mask")]
        mask_layer.colormap = DirectLabelColormap(color_dict={None: "magenta", 0: "transparent", 1: "yellow"})
        mask_layer.contour = 2
        mask_layer.opacity = 1.0
        viewer.window.screenshot(str(out / "dermoscopy_segment.png"), canvas_only=False, flash=False)
        gates = [layer.name for layer in viewer.layers if layer.name.startswith(f"{name} gate1 ")]
        shown = [name, result_name(name, "SGE boundary"), *gates[-2:]]
        _grid_screenshot(viewer, shown, out / "dermoscopy_boundary_gates.png")

        info = _run_case(viewer, seg, ft, app, "nuclei", builtin(args.nuclei_model), tmp, args.steps, out)
        print(info)
        name = viewer.layers[0].name
        _show_only(viewer, [name, result_name(name, "mask")])
        viewer.window.screenshot(str(out / "nuclei_instances.png"), canvas_only=False, flash=False)
    viewer.close()


if __name__ == "__main__":
    main()
