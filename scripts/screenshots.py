"""Makes the user-guide screenshots from a real napari window (run under Xvfb).

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/screenshots.py --out docs/images

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

    from napari_sgdc.io import save_checkpoint
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


def main() -> None:
    """Writes the screenshots named in docs/user_guide.md into --out."""
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/images")
    parser.add_argument("--dermoscopy-model", default=None, help="built-in name or checkpoint (default: tiny + fine-tune)")
    parser.add_argument("--nuclei-model", default=None, help="built-in name or checkpoint (default: tiny + fine-tune)")
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()

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
