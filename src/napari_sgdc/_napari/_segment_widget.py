"""The "SGDC Segment" dock widget."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import numpy as np

from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSlider,
    FloatSpinBox,
    Label,
    PushButton,
    SpinBox,
)
from napari.layers import Image, Shapes
from napari.utils.notifications import show_info

from napari_sgdc._napari._layers import (
    current_plane,
    mask_layer_of,
    set_confidence_features,
    show_region,
    unflatten,
)
from napari_sgdc._napari._runner import SegmentJob, error_text, notify_error
from napari_sgdc._napari._session import BUILTIN_PREFIX, Job, display_name, get_session, real_viewer
from napari_sgdc._napari._shared import ImagePicker, claim, wrap_status
from napari_sgdc._napari import _wholeslide as ws
from napari_sgdc.device import DEVICES
from napari_sgdc.postprocess import PostprocessOptions

if TYPE_CHECKING:
    import napari

LOAD_CHECKPOINT = "Load checkpoint…"
SEGMENT_SHORTCUT = "Shift-S"
NEXT_REGION_SHORTCUT = "Shift-N"
REGION_FILL = 0.8
"""Fraction of the canvas (on its tighter axis) that a region fills after Next region."""
SAMPLE_MODEL_KEY = "sgdc_model"
"""Image-layer metadata key naming the built-in model made for the image (set by the samples)."""


def available_builtins() -> list[str]:
    """Names of the built-in models shipped with the package (empty if none)."""
    try:
        from napari_sgdc.io import builtin_models

        return list(builtin_models())
    except Exception:  # noqa: BLE001 - a missing or broken models folder means "none"
        return []


class SegmentWidget(Container):
    """Segments an image layer with an SGDC model.

    Writes ``<image> probability``, ``<image> mask`` (Labels), ``<image> SGE boundary``,
    a hidden ``<image> uncertainty`` and hidden ``<image> gate1 <block>`` /
    ``<image> gate2 <block>`` layers aligned to the image, and post-processes the mask
    again from the cached probabilities when a slider moves (instance masks carry each
    object's confidence in their features, kept in sync). The image picker follows the
    image layer the user opens or selects; the model picker follows the built-in model
    an opened sample names until the user picks a model. **Next region** (Shift-N) moves
    the view to the most uncertain region of the current plane not yet visited.

    Args:
        napari_viewer: the viewer the widget is docked in.
    """

    def __init__(self, napari_viewer: "napari.viewer.Viewer") -> None:
        super().__init__(labels=True)
        self._viewer = real_viewer(napari_viewer)
        self._session = get_session(napari_viewer)
        self.job: SegmentJob | None = None
        self._previous_model: str | None = None

        self._image_picker = ImagePicker(self._viewer)
        self.image_layer = self._image_picker.combo
        self.model = ComboBox(name="model", label="model", choices=self._model_choices, nullable=True)
        self.model_note = Label(name="model_note", label=" ")
        wrap_status(self.model_note)  # the note must not widen the dock when it appears
        self.device = ComboBox(name="device", label="device", choices=DEVICES, value="auto")
        self.tile = SpinBox(name="tile", label="tile size", min=64, max=4096, step=32, value=512)
        self.planes = ComboBox(
            name="planes", label="stack planes", choices=["all", "current"], value="all",
            tooltip="For stacks: segment every plane, or only the plane shown now.",
        )
        self.gates = CheckBox(name="gates", text="compute SGDC gate maps", value=True)
        self.uncertainty = CheckBox(
            name="uncertainty", text="uncertainty layer", value=True,
            tooltip="Per-pixel uncertainty (entropy of the probability): free, no extra network pass. "
                    "Needed by Next region; nuclei get a per-object confidence (hover a nucleus).",
        )
        self.mpp = FloatSpinBox(
            name="mpp", label="image µm/px", min=0.0, max=50.0, step=0.01, value=0.0,
            tooltip="The image's µm per pixel, for models that record their scale (nuclei: 0.25 µm/px, 40×): the "
                    "image is resampled to the model's scale, so a 20× image (0.5) gives correctly sized nuclei. "
                    "0: the image layer's own scale when it is in µm (or mm, nm), else the model's scale. Other "
                    "models ignore it; slides use their metadata.",
        )
        self.amp = CheckBox(
            name="amp", text="fast bf16 inference", value=False,
            tooltip="bf16 autocast: about 1.5× faster on GPUs and on CPUs with native bf16 (AVX512-BF16, AMX); "
                    "probabilities within about 0.005 of float32. No effect elsewhere.",
        )
        self.target = ComboBox(
            name="target", label="slide target", choices=list(ws.TARGETS), value=ws.TARGET_VIEW,
            tooltip="On a whole slide: segment the field of view, the first rectangle of a Shapes layer, "
                    "or the whole slide in the background.",
        )
        self.shapes_layer = ComboBox(
            name="shapes_layer", label="rectangle in", choices=self._shapes_choices, nullable=True,
            tooltip="Shapes layer holding the rectangle (empty: the selected Shapes layer, else the last one).",
        )
        self.output = FileEdit(
            name="output", label="output folder", mode="d", value="",
            tooltip="Folder of <slide>.ome.zarr (empty: next to the slide). An existing store is resumed or "
                    "opened, never replaced.",
        )
        self.segment_button = PushButton(name="segment_button", text=f"Segment ({SEGMENT_SHORTCUT})")
        self.cancel_button = PushButton(name="cancel_button", text="Cancel", enabled=False)
        buttons = Container(name="buttons", label=" ", layout="horizontal", labels=False,
                            widgets=[self.segment_button, self.cancel_button])
        buttons.margins = (0, 0, 0, 0)
        options = self._session.options
        self.threshold = FloatSlider(name="threshold", label="threshold", min=0.0, max=1.0, step=0.001,
                                     value=options.threshold)
        self.boundary_threshold = FloatSlider(
            name="boundary_threshold", label="boundary thr.", min=0.0, max=1.0, step=0.001,
            value=options.boundary_threshold,
            tooltip="Instance models: seeds grow where the boundary (or separation map) is below this; lower splits "
                    "more. Each model sets it to its own tuned value when it first segments.",
        )
        self.min_size = SpinBox(name="min_size", label="min size (px)", min=0, max=1_000_000,
                                value=options.min_size)
        self.region_size = SpinBox(
            name="region_size", label="region size (px)", min=16, max=4096, step=16, value=128,
            tooltip="Side of the square regions that Next region ranks by mean uncertainty.",
        )
        self.next_region_button = PushButton(
            name="next_region_button", text=f"Next region ({NEXT_REGION_SHORTCUT})",
            tooltip="Zoom to the most uncertain region of the current image not yet visited.",
        )
        self.status = Label(name="status", label="status", value="")
        wrap_status(self.status)
        self.extend([
            self.image_layer, self.model, self.model_note, self.target, self.shapes_layer, self.output,
            self.device, self.tile, self.mpp, self.planes, self.gates, self.uncertainty, self.amp, buttons,
            self.threshold, self.boundary_threshold, self.min_size,
            self.region_size, self.next_region_button, self.status,
        ])
        self._visited: "weakref.WeakKeyDictionary[Image, set[tuple[int, ...]]]" = weakref.WeakKeyDictionary()
        self._model_explicit = False
        self._setting_model = False
        self._syncing_sliders = False

        real_sources = [source for source in self._sources() if source != LOAD_CHECKPOINT]
        self.model.value = self._session.current_source if self._session.current_source in real_sources else (
            real_sources[0] if real_sources else None
        )
        self.model.changed.connect(self._on_model_changed)
        self.segment_button.changed.connect(self.run_segment)
        self.cancel_button.changed.connect(self.cancel)
        self.next_region_button.changed.connect(self.next_region)
        for control in (self.device, self.tile, self.mpp, self.planes, self.gates, self.uncertainty, self.amp):
            control.changed.connect(self._sync_settings)
        for slider in (self.threshold, self.boundary_threshold, self.min_size):
            slider.changed.connect(self._on_postprocess_changed)
        self._session.connect("segmented", self._on_segmented)
        self._session.connect("model_changed", self._on_session_event)
        self._session.connect("options_changed", self._on_options_changed)
        self._sync_settings()
        self._on_model_changed(self.model.value)
        self._model_explicit = False  # the start-up value was not the user's choice
        self.image_layer.changed.connect(self._follow_sample)
        self._follow_sample(self.image_layer.value)
        self.image_layer.changed.connect(self._show_slide_controls)
        self.target.changed.connect(self._show_slide_controls)
        self._show_slide_controls()
        self._bind_shortcut()

    # -- choices ---------------------------------------------------------------------
    def _model_choices(self, _widget: Any = None) -> list[tuple[str, str]]:
        sources = [BUILTIN_PREFIX + name for name in available_builtins()]
        sources += [source for source in self._session.models if source not in sources]
        return [(display_name(source), source) for source in sources] + [(LOAD_CHECKPOINT, LOAD_CHECKPOINT)]

    def _refresh_model_note(self) -> None:
        if not available_builtins() and not self._session.models:
            note = "No built-in models installed: choose Load checkpoint…"
        elif self._session.current_source in self._session.models:
            runs = len(self._session.models[self._session.current_source].runs)
            note = f"fine-tuned {runs}× (in memory)" if runs else ""
        else:
            note = ""
        self.model_note.value = note
        self.model_note.tooltip = "Save model… in SGDC Fine-tune writes the fine-tuned weights to a file." if (
            note.startswith("fine-tuned")) else ""
        self.model_note.visible = bool(note)

    def _on_session_event(self, **_: Any) -> None:
        self._refresh_model_note()

    def _on_segmented(self, image: Image, **_: Any) -> None:
        self._visited.pop(image, None)  # a new result: its regions are new to the user
        self._refresh_model_note()

    # -- model picker ------------------------------------------------------------------
    def _on_model_changed(self, value: str | None) -> None:
        if not self._setting_model:
            self._model_explicit = True
        if value == LOAD_CHECKPOINT:
            path = self._ask_checkpoint_path()
            if path:
                self.load_checkpoint(path)
            else:
                self.model.value = self._previous_model if self._previous_model in self._sources() else None
            self._refresh_model_note()
            return
        self._session.current_source = value
        self._previous_model = value
        self._refresh_model_note()

    def _follow_sample(self, image: Image | None) -> None:
        """Picks the built-in model an opened sample names (layer metadata ``sgdc_model``),
        as long as the user has not picked a model in the picker themselves."""
        if self._model_explicit or image is None:
            return
        name = image.metadata.get(SAMPLE_MODEL_KEY)
        source = f"{BUILTIN_PREFIX}{name}" if name else None
        if source is None or source == self.model.value or source not in self._sources():
            return
        self._setting_model = True
        try:
            self.model.value = source
        finally:
            self._setting_model = False

    def _shapes_choices(self, _widget: Any = None) -> list[Shapes]:
        return [layer for layer in self._viewer.layers if isinstance(layer, Shapes) and "sgdc" not in layer.metadata]

    def _show_slide_controls(self, *_: Any) -> None:
        """The slide targets show only for a slide layer; the image-only settings hide for it."""
        slide = ws.slide_of(self.image_layer.value) is not None
        self.target.visible = slide
        self.shapes_layer.visible = slide and self.target.value == ws.TARGET_RECTANGLE
        self.output.visible = slide and self.target.value == ws.TARGET_WHOLE
        for control in (self.tile, self.mpp, self.planes, self.gates, self.uncertainty, self.region_size,
                        self.next_region_button):
            control.visible = not slide

    def _sources(self) -> list[str]:
        return [value for _, value in self._model_choices()]

    def _ask_checkpoint_path(self) -> str | None:
        from qtpy.QtWidgets import QFileDialog

        path, _ = QFileDialog.getOpenFileName(
            self.native, "Load SGDC checkpoint", "", "SGDC checkpoints (*.safetensors);;All files (*)"
        )
        return path or None

    def load_checkpoint(self, path: str) -> bool:
        """Loads a checkpoint file, adds it to the model picker and selects it.

        Returns:
            True on success; on failure a notification explains why.
        """
        source = str(path)
        try:
            self._session.get_model(source, self.device.value)
        except Exception as exc:  # noqa: BLE001 - shown to the user
            notify_error(f"Could not load checkpoint: {error_text(exc)}")
            return False
        self.model.reset_choices()
        self.model.value = source
        return True

    # -- segmentation --------------------------------------------------------------------
    def _sync_settings(self, *_: Any) -> None:
        settings = self._session.settings
        settings.device = self.device.value
        settings.tile = int(self.tile.value)
        settings.planes = self.planes.value
        settings.gates = bool(self.gates.value)
        settings.uncertainty = bool(self.uncertainty.value)
        settings.mpp = float(self.mpp.value)
        settings.amp = bool(self.amp.value)

    def run_segment(self, *_: Any) -> SegmentJob | None:
        """Starts segmenting the picked image layer in a thread worker.

        Returns:
            The started job, or None when an input is missing (a notification says which).
        """
        image = self.image_layer.value
        if image is None or image not in self._viewer.layers:
            notify_error("No image layer to segment: open an image, or File > Open Sample > napari-sgdc.")
            return None
        source = self.model.value
        if source in (None, LOAD_CHECKPOINT):
            notify_error("No model picked: choose a built-in model or Load checkpoint… in SGDC Segment.")
            return None
        if ws.slide_of(image) is not None:
            return self.run_slide(image, source)
        if not claim(self._session, Job.SEGMENT, image.name):
            return None
        self._sync_settings()
        self._set_running(True)
        self.status.value = f"segmenting {image.name}…"
        return self._start_job(image, lambda: SegmentJob(self._viewer, self._session, image, source,
                                                         on_done=self._on_done))

    def _start_job(self, image: Image, make_job: Any) -> Any:
        """Starts the job `make_job()` builds; a failure to start releases the busy state and notifies."""
        try:
            self.job = make_job()
        except Exception as exc:  # noqa: BLE001 - e.g. an image with one axis; shown to the user
            self._session.busy.release(Job.SEGMENT)
            self._set_running(False)
            notify_error(f"Cannot segment '{image.name}': {error_text(exc)}")
            self.status.value = ""
            return None
        return self.job

    def run_slide(self, image: Image, source: str, target: str | None = None) -> "ws.SlideJob | None":
        """Segments a slide layer's `target` (default: the picked one) with `segment_slide` in a
        thread worker; the result layers are read lazily from the store.

        Whole slide: an existing ``<stem>.ome.zarr`` that stopped part-way is resumed; a
        finished one is opened, not run again; anything else there is refused.

        Returns:
            The started job, or None (a notification says why).
        """
        slide = ws.slide_of(image)
        target = target or self.target.value
        resume = overwrite = False
        if target == ws.TARGET_WHOLE:
            roi = None
            store = ws.whole_store(slide, self.output.value)
            state = ws.store_state(store)
            if state == "foreign":
                notify_error(f"{store} exists and is not a napari-sgdc slide store; not replaced. "
                             "Choose another output folder.")
                return None
            if state == "complete":
                ws.add_store_layers(self._viewer, image, store, target, source)
                show_info(f"'{image.name}' was already segmented into {store}: opened it. Delete it (or choose "
                          "another output folder) to segment again.")
                self.status.value = f"opened {store.name}"
                return None
            if state == "partial":
                resume = True
                show_info(f"Resuming the interrupted segmentation in {store}.")
        else:
            if target == ws.TARGET_VIEW:
                roi = ws.visible_roi(self._viewer, image)
                if roi is None:
                    notify_error(f"'{image.name}' is not in view: pan to the tissue, then segment.")
                    return None
            else:
                shapes = ws.pick_shapes(self._viewer, self.shapes_layer.value)
                roi = ws.shape_roi(shapes, image) if shapes is not None else None
                if roi is None:
                    notify_error("No rectangle: draw one in a Shapes layer over the slide (or pick 'field of "
                                 "view'), then segment.")
                    return None
            store, overwrite = ws.region_store(slide, target), True
        if not claim(self._session, Job.SEGMENT, f"{image.name} ({target})"):
            return None
        self._set_running(True)
        self.status.value = f"segmenting {image.name} ({target})…"
        return self._start_job(image, lambda: ws.SlideJob(self._viewer, self._session, image, source, target, roi,
                                                          store, resume=resume, overwrite=overwrite,
                                                          on_done=self._on_slide_done))

    def _on_slide_done(self, job: "ws.SlideJob", outcome: Any) -> None:
        self._session.busy.release(Job.SEGMENT)
        self._set_running(False)
        if outcome.value is not None:
            result = outcome.value
            self.status.value = (f"{job.image.name} ({job.target}): {result.n_objects} nuclei, {result.tiles_run} "
                                 f"tiles in {outcome.seconds:.1f} s")
        elif outcome.cancelled:
            self.status.value = f"cancelled at {job.done}/{job.total} tiles; Segment resumes"
        else:
            self.status.value = "failed (see notification)"

    def cancel(self, *_: Any) -> None:
        """Asks the running segmentation to stop at its next tile."""
        if self.job is not None:
            self.job.cancel.set()
            self.status.value = "cancelling…"

    def _on_done(self, job: SegmentJob, outcome: Any) -> None:
        self._session.busy.release(Job.SEGMENT)
        self._set_running(False)
        if outcome.value is not None:
            cache = self._session.results.get(job.image)
            scale = f" at {cache.mpp:g} µm/px" if cache is not None and cache.mpp else ""
            self.status.value = f"{job.image.name}: segmented in {outcome.seconds:.1f} s{scale}"
        elif outcome.cancelled:
            self.status.value = "cancelled"
        else:
            self.status.value = "failed (see notification)"
        self._refresh_model_note()

    def _set_running(self, running: bool) -> None:
        self.segment_button.enabled = not running
        self.cancel_button.enabled = running

    # -- live post-processing --------------------------------------------------------------
    def _on_options_changed(self, **_: Any) -> None:
        """Shows options set elsewhere (a model's tuned threshold) on the sliders, without
        re-running the post-processing (the caller did)."""
        options = self._session.options
        self._syncing_sliders = True
        try:
            self.threshold.value = options.threshold
            self.boundary_threshold.value = options.boundary_threshold
            self.min_size.value = options.min_size
        finally:
            self._syncing_sliders = False

    def _on_postprocess_changed(self, *_: Any) -> None:
        if self._syncing_sliders:
            return
        try:
            options = PostprocessOptions(
                float(self.threshold.value), float(self.boundary_threshold.value), int(self.min_size.value)
            )
        except ValueError as exc:
            notify_error(f"Post-processing not changed: {error_text(exc)}")
            return
        self._session.options = options
        image = self.image_layer.value
        if image is not None:
            self.update_mask(image)

    def update_mask(self, image: Image) -> bool:
        """Post-processes `image`'s cached probabilities into its mask layer (no forward pass).

        Every segmented plane goes through `napari_sgdc.postprocess.postprocess` at once
        with the session's options, so instance ids stay unique across a stack's planes.

        Returns:
            True when the mask layer was updated.
        """
        cache = self._session.results.get(image)
        mask_layer = mask_layer_of(self._viewer, image)
        if cache is None or mask_layer is None:
            return False
        try:
            mask = cache.postprocessed(self._session.options)
        except Exception as exc:  # noqa: BLE001 - shown to the user
            notify_error(f"Post-processing failed: {error_text(exc)}")
            return False
        cache.written_mask = mask
        mask_layer.data = unflatten(mask.copy(), cache.lead_shape)
        set_confidence_features(mask_layer, cache.confidence())
        return True

    # -- review: the most uncertain regions first ---------------------------------------------
    def next_region(self, *_: Any) -> Any:
        """Moves the view to the most uncertain region of the picked image's current plane
        that was not visited yet, and outlines it in ``<image> next region``.

        Regions are squares of ``region size`` pixels ranked by mean uncertainty
        (`napari_sgdc.regions.rank_regions`). The visited ones are remembered per image
        until it is segmented again; when all were visited a notification says so and
        the next press starts over.

        Returns:
            The `Region` shown, or None (a notification says why).
        """
        from napari_sgdc.regions import rank_regions

        image = self.image_layer.value
        if image is None or image not in self._viewer.layers:
            show_info("Next region: no image. Open an image and segment it first.")
            return None
        cache = self._session.results.get(image)
        plane = current_plane(image, self._viewer.dims.point)
        if cache is None or not cache.has_uncertainty(plane):
            where = " (this plane)" if cache is not None and cache.lead_shape else ""
            show_info(f"Next region: no uncertainty for '{image.name}'{where} yet. Segment first, "
                      "with 'uncertainty layer' ticked.")
            return None
        size = int(self.region_size.value)
        regions = rank_regions(cache.uncertainty[plane], size)
        visited = self._visited.setdefault(image, set())
        keys = [(plane, size, region.top, region.left) for region in regions]
        todo = [index for index, key in enumerate(keys) if key not in visited]
        if not todo:
            visited.difference_update(keys)
            show_info(f"Next region: all {len(regions)} regions of '{image.name}' ({size} px) were visited. "
                      "Press again to start over from the most uncertain.")
            self.status.value = f"all {len(regions)} regions visited"
            return None
        region = regions[todo[0]]
        visited.add(keys[todo[0]])
        lead = tuple(int(i) for i in np.unravel_index(plane, cache.lead_shape)) if cache.lead_shape else ()
        show_region(self._viewer, image, lead, (region.top, region.left, region.bottom, region.right))
        self._look_at(image, lead, region)
        self.status.value = f"region {len(regions) - len(todo) + 1}/{len(regions)}, uncertainty {region.score:.2f}"
        return region

    def _look_at(self, image: Image, lead: tuple[int, ...], region: Any) -> None:
        """Centres the camera on `region` and zooms so it fills `REGION_FILL` of the canvas."""
        viewer = self._viewer
        point = np.array(viewer.dims.point, dtype=float)  # world axes; the image holds the last ones
        point[-image.ndim:] = image.data_to_world((*lead, *region.center))
        viewer.camera.center = tuple(point[list(viewer.dims.displayed)])
        if viewer.dims.ndisplay != 2:
            return
        world_size = np.abs(np.asarray(image.scale[-2:], dtype=float)) * (
            region.bottom - region.top, region.right - region.left)
        try:
            canvas = np.asarray(viewer.canvas.viewbox_size(viewer.layers), dtype=float)
        except Exception:  # noqa: BLE001 - older napari: the whole canvas
            canvas = np.asarray(viewer.canvas.size, dtype=float)
        viewer.camera.zoom = float(REGION_FILL * np.min(canvas / np.maximum(world_size, 1e-9)))

    # -- keyboard shortcut --------------------------------------------------------------------
    def _bind_shortcut(self) -> None:
        widget_ref = weakref.ref(self)

        def segment_shortcut(viewer: Any) -> None:
            """Segment the image picked in SGDC Segment."""
            widget = widget_ref()
            if widget is not None:
                widget.run_segment()

        def next_region_shortcut(viewer: Any) -> None:
            """Go to the next most uncertain region (SGDC Segment's Next region)."""
            widget = widget_ref()
            if widget is not None:
                widget.next_region()

        self._viewer.bind_key(SEGMENT_SHORTCUT, segment_shortcut, overwrite=True)
        self._viewer.bind_key(NEXT_REGION_SHORTCUT, next_region_shortcut, overwrite=True)
        self._shortcut_callbacks = (segment_shortcut, next_region_shortcut)

    def reset_choices(self, *_: Any) -> None:
        """Refreshes the layer and model pickers (napari calls this when layers change)."""
        super().reset_choices()
        self._refresh_model_note()

