"""Whole slides in the GUI: the Segment widget's three slide targets, the store-backed
result layers, and the corrected-region crops the Fine-tune widget trains on.

A slide layer is an image layer opened by napari-sgdc's reader: its metadata holds the
open `napari_sgdc.slide.Slide` (``metadata["slide"]``) and its path. Every target runs
the headless `napari_sgdc.wholeslide.segment_slide` in a thread worker:

* **field of view**: ``roi`` = the part of the slide visible on the canvas;
* **rectangle**: ``roi`` = the bounding box of the first shape of a Shapes layer;
* **whole slide**: ``roi=None``, into ``<output folder>/<slide stem>.ome.zarr``.

Region runs (field of view, rectangle) go through the same tiled path as the whole slide,
into a store in the session's cache folder (``$NAPARI_SGDC_CACHE/slides``, one per slide
and target, replaced by the next run of that target): the same ownership rule across tile
seams, the same instance ids, the same outputs. Every result is added as multiscale layers
read lazily from the Zarr store (dask arrays; nothing is copied into memory), aligned to
the slide in µm.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
from napari.layers import Image, Labels, Layer, Shapes
from napari.utils.notifications import show_info

from napari_sgdc._napari._runner import BackgroundJob, Outcome
from napari_sgdc import grid
from napari_sgdc.session import CorrectionSession, ModelState
from napari_sgdc.wholeslide import open_store, slide_stem, store_paths, store_state

SLIDE_KEY = "slide"
"""Image-layer metadata key of the open `Slide` (set by the reader)."""
SLIDE_PATH_KEY = "slide_path"
TARGET_VIEW = "field of view"
TARGET_RECTANGLE = "rectangle"
TARGET_WHOLE = "whole slide"
TARGETS = (TARGET_VIEW, TARGET_RECTANGLE, TARGET_WHOLE)
STORE_KINDS = ("probability", "boundary", "nuclei", "tissue")
MAX_CROP = 2048
"""Largest side (working pixels) of a corrected-region crop."""
_TARGET_TAG = {TARGET_VIEW: "view", TARGET_RECTANGLE: "rectangle", TARGET_WHOLE: ""}


def slide_of(layer: Any) -> Any:
    """The open `Slide` behind an image layer opened by napari-sgdc's reader, else None."""
    from napari_sgdc.slide import Slide

    if not isinstance(layer, Image):
        return None
    slide = layer.metadata.get(SLIDE_KEY)
    return slide if isinstance(slide, Slide) else None


def _clip_box(slide: Any, y0: float, x0: float, y1: float, x1: float) -> tuple[int, int, int, int] | None:
    """(x, y, w, h) in level-0 pixels, clipped to the slide; None when nothing is left."""
    height, width = slide.shape
    x0, y0 = max(0, int(math.floor(x0))), max(0, int(math.floor(y0)))
    x1, y1 = min(width, int(math.ceil(x1))), min(height, int(math.ceil(y1)))
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1 - x0, y1 - y0


def _world_box_to_roi(layer: Image, slide: Any, corners_world: np.ndarray) -> tuple[int, int, int, int] | None:
    """The level-0 box covering world points (n, 2) of the displayed axes."""
    data = np.array([layer.world_to_data(point) for point in corners_world], dtype=float)[:, -2:]
    # pixel i covers [i - 0.5, i + 0.5) in napari's data coordinates
    (y0, x0), (y1, x1) = data.min(axis=0) + 0.5, data.max(axis=0) + 0.5
    return _clip_box(slide, y0, x0, y1, x1)


def _camera(viewer: Any) -> Any:
    """The 2-D camera (``viewer.scene.camera`` since napari 0.9, ``viewer.camera`` before)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


def visible_roi(viewer: Any, layer: Image) -> tuple[int, int, int, int] | None:
    """The part of the slide shown on the canvas, as (x, y, w, h) level-0 pixels (None: off screen).

    From the camera: its centre (world units) and zoom (screen pixels per world unit) over
    the canvas size give the visible world box, mapped through the layer's world→data
    transform (level-0 pixels for a multiscale layer).
    """
    slide = slide_of(layer)
    size = np.asarray(viewer.canvas.viewbox_size(viewer.layers), dtype=float)  # (height, width) screen px
    camera = _camera(viewer)
    half = size / max(float(camera.zoom), 1e-12) / 2.0
    center = np.asarray(camera.center, dtype=float)[-2:]
    corners = np.array([center - half, center + half, [center[0] - half[0], center[1] + half[1]],
                        [center[0] + half[0], center[1] - half[1]]])
    return _world_box_to_roi(layer, slide, corners)


def pick_shapes(viewer: Any, chosen: Shapes | None = None) -> Shapes | None:
    """The Shapes layer of the rectangle target: `chosen`, else the active Shapes layer, else the
    last Shapes layer holding a shape (SGDC's own outlines excluded)."""
    if isinstance(chosen, Shapes) and chosen in viewer.layers:
        return chosen
    active = viewer.layers.selection.active
    if isinstance(active, Shapes) and len(active.data):
        return active
    for layer in reversed(list(viewer.layers)):
        if isinstance(layer, Shapes) and "sgdc" not in layer.metadata and len(layer.data):
            return layer
    return None


def shape_roi(shapes: Shapes, layer: Image) -> tuple[int, int, int, int] | None:
    """The level-0 bounding box (x, y, w, h) of the first rectangle of `shapes` (else its first
    shape) on the slide of `layer`."""
    if not len(shapes.data):
        return None
    types = list(shapes.shape_type)
    index = types.index("rectangle") if "rectangle" in types else 0
    vertices = np.asarray(shapes.data[index], dtype=float)
    world = np.array([shapes.data_to_world(vertex) for vertex in vertices])[:, -2:]
    data = np.array([layer.world_to_data(point) for point in world], dtype=float)[:, -2:]
    (y0, x0), (y1, x1) = data.min(axis=0), data.max(axis=0)
    return _clip_box(slide_of(layer), y0, x0, y1, x1)


# --------------------------------------------------------------------------- stores


def region_store(slide: Any, target: str) -> Path:
    """The cache store of a region target: ``$NAPARI_SGDC_CACHE/slides/<stem>-<view|rectangle>.ome.zarr``."""
    from napari_sgdc.autosave import cache_dir

    return cache_dir() / "slides" / f"{slide_stem(slide.path)}-{_TARGET_TAG[target]}.ome.zarr"


def whole_store(slide: Any, folder: str | Path | None) -> Path:
    """``<folder>/<slide stem>.ome.zarr``; the slide's own folder when `folder` is empty."""
    folder = Path(folder) if folder is not None and str(folder) not in ("", ".") else Path(slide.path).parent
    return store_paths(folder, slide.path).store


def result_layer_name(image_name: str, target: str, kind: str) -> str:
    """``"<image> nuclei"`` (whole slide), ``"<image> view nuclei"``, ``"<image> rectangle nuclei"``."""
    tag = _TARGET_TAG[target]
    return f"{image_name} {tag} {kind}" if tag else f"{image_name} {kind}"


def remove_store_layers(viewer: Any, image_name: str, target: str) -> None:
    for kind in STORE_KINDS:
        name = result_layer_name(image_name, target, kind)
        if name in viewer.layers:
            viewer.layers.remove(name)


def add_store_layers(viewer: Any, image: Image, store: Path, target: str, model_source: str | None = None
                     ) -> dict[str, Layer]:
    """Adds a store's probability, boundary, nuclei and tissue as layers read lazily from Zarr
    (multiscale where the store has several levels), aligned to the slide layer `image`.

    A store pixel of size s µm covers the slide pixels of its area, so its centre sits
    (s - slide µm/px) / 2 µm further than a slide pixel's: that goes into the translate.
    Earlier layers of the same target are replaced.
    """
    from napari_sgdc._napari._reader import store_layers

    remove_store_layers(viewer, image.name, target)
    image_scale = np.asarray(image.scale, dtype=float)[-2:]
    image_translate = np.asarray(image.translate, dtype=float)[-2:]
    layers: dict[str, Layer] = {}
    active = viewer.layers.selection.active
    for data, meta, kind in store_layers(store):
        name = meta["metadata"]["sgdc_store"]["kind"]
        scale = np.asarray(meta["scale"], dtype=float)
        meta = dict(meta, name=result_layer_name(image.name, target, name),
                    translate=image_translate + (scale - image_scale) / 2.0,
                    metadata={"sgdc": {"image": image.name, "store": str(store), "target": target,
                                       "kind": name, "model_source": model_source}})
        if name == "nuclei":
            meta["opacity"] = 0.6
        elif name == "probability":
            meta["visible"] = False  # as for images: the nuclei on the slide first
        if getattr(image, "units", None) is not None:
            meta["units"] = tuple(image.units)[-2:]  # the slide's (µm): napari wants one unit across layers
        layer = Layer.create(data, meta, kind)
        viewer.add_layer(layer)
        layers[name] = layer
    if active is not None and active in viewer.layers:
        viewer.layers.selection.active = active
    return layers


def store_layer_of(viewer: Any, image: Image, kind: str = "nuclei") -> Labels | Image | None:
    """The newest store-backed `kind` layer of `image` (any target), else None."""
    for layer in reversed(list(viewer.layers)):
        meta = layer.metadata.get("sgdc") or {}
        if meta.get("image") == image.name and meta.get("store") and meta.get("kind") == kind:
            return layer
    return None


# --------------------------------------------------------------------------- the job


class SlideJob(BackgroundJob):
    """One `segment_slide` run on the plugin's job runner, with progress per tile and Cancel.

    The caller holds the session's `Busy` state and releases it in `on_done`.

    Attributes:
        roi: the level-0 box (x, y, w, h) or None for the whole slide.
        store: the store written.
        cancel: set it to stop after the current tile (the run can be resumed later).
        done, total: tiles done so far (progress).
        options: the post-processing the store is written with.
        outcome: the `Outcome` once the worker returned (value: the `SlideResult`).
    """

    def __init__(self, viewer: Any, session: CorrectionSession, image: Image, source: str, target: str,
                 roi: tuple[int, int, int, int] | None, store: Path, *, resume: bool = False,
                 overwrite: bool = False, on_done: Callable[["SlideJob", Outcome], None] | None = None) -> None:
        self.viewer, self.session, self.image, self.source = viewer, session, image, source
        self.target, self.roi, self.store = target, roi, Path(store)
        self.resume, self.overwrite = resume, overwrite
        self.slide = slide_of(image)
        self.options = session.options
        self.device = session.settings.device
        self.amp, self.tta, self.engine = session.settings.amp, session.settings.tta, session.settings.engine
        self.state: ModelState | None = None
        super().__init__(f"Segmentation of '{image.name}' ({target})", f"SGDC {target} {image.name}",
                         on_done=on_done)
        if overwrite and self.store.exists():
            remove_store_layers(viewer, image.name, target)  # they read the store about to be replaced
        self.start()

    def work(self) -> Any:
        from napari_sgdc.wholeslide import segment_slide

        state = self.state = self.session.get_model(self.source, self.device)
        self.options = self.session.options_for(state)  # a model's first run after a switch: its defaults
        self.store.parent.mkdir(parents=True, exist_ok=True)
        return segment_slide(state.model, self.slide, self.store, roi=self.roi, tile=grid.DEFAULT_TILE,
                             margin=grid.DEFAULT_MARGIN, options=self.options,
                             progress=self.report, cancel=self.cancel, resume=self.resume, overwrite=self.overwrite,
                             amp=self.amp, tta=self.tta, engine=self.engine)

    def finish(self, outcome: Outcome) -> None:
        if self.state is not None:
            self.session.adopt_model_defaults(self.state)  # the sliders show the level the run used
        super().finish(outcome)

    def on_cancelled(self) -> None:
        show_info(f"{self.title} cancelled after {self.done}/{self.total} tiles; segment again to resume it.")

    def on_value(self, value: Any) -> None:
        if self.image not in self.viewer.layers:
            show_info(f"'{self.image.name}' was closed during segmentation; the result is in {self.store}.")
        else:
            add_store_layers(self.viewer, self.image, self.store, self.target, self.source)


# --------------------------------------------------------------------------- corrected regions


def crop_box(labels: Layer, roi: tuple[int, int, int, int], max_side: int = MAX_CROP) -> tuple[int, int, int, int]:
    """(y0, x0, h, w) on the store's level-0 grid of the level-0 slide box `roi`, centred and at
    most `max_side` on a side (`napari_sgdc.wholeslide.ResultStore.crop_box`)."""
    return open_store(labels.metadata["sgdc"]["store"]).crop_box(roi, max_side)


def add_correction_layer(viewer: Any, image: Image, nuclei: Labels, box: tuple[int, int, int, int]) -> Labels:
    """Copies the store labels of `box` (y0, x0, h, w on the store grid) into an editable
    ``"<image> corrections"`` Labels layer on the slide (replacing an earlier one)."""
    import zarr

    meta = nuclei.metadata["sgdc"]
    store = Path(meta["store"])
    y0, x0, h, w = box
    level0 = zarr.open_group(str(store), mode="r")["labels/nuclei/0"]
    data = np.array(level0[y0:y0 + h, x0:x0 + w])
    scale = np.asarray(nuclei.scale, dtype=float)[-2:]
    name = f"{image.name} corrections"
    if name in viewer.layers:
        viewer.layers.remove(name)
    return viewer.add_labels(
        data, name=name, scale=scale, translate=np.asarray(nuclei.translate, dtype=float)[-2:] + scale * (y0, x0),
        opacity=0.6,
        metadata={"sgdc": {"image": image.name, "store": str(store), "box": [int(v) for v in box],
                           "model_source": meta.get("model_source"), "written": data.copy()}},
    )


def is_correction_layer(layer: Any) -> bool:
    return isinstance(layer, Labels) and "box" in (layer.metadata.get("sgdc") or {})


def read_crop(layer: Labels) -> np.ndarray:
    """The slide pixels under a correction layer: (h, w, 3) uint8 on the store's working grid
    (the pixels the model saw: same level, same resampling)."""
    meta = layer.metadata["sgdc"]
    return open_store(meta["store"]).read_pixels(*meta["box"])
