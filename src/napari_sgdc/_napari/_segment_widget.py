"""The "SGDC Segment" dock widget: binds its controls to the viewer's
`napari_sgdc.session.CorrectionSession` and starts `SegmentJob` / `SlideJob` on the plugin's
job runner (`_runner`)."""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

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

import napari_sgdc._napari._wholeslide as ws
from napari_sgdc._napari._layers import mask_layer_of, set_confidence_features, unflatten
from napari_sgdc._napari._object_review import ObjectQueue
from napari_sgdc._napari._review import NEXT_REGION_SHORTCUT, RegionReview
from napari_sgdc._napari._runner import SegmentJob, notify_error
from napari_sgdc._napari._session import get_session, real_viewer
from napari_sgdc._napari._shared import ImagePicker, button_row, claim, scroll_contents, wrap_status
from napari_sgdc._napari._types import TypeLegend
from napari_sgdc.device import DEVICES
from napari_sgdc.engines import dock_engines
from napari_sgdc.grid import MPP_RANGE
from napari_sgdc.postprocess import PostprocessOptions
from napari_sgdc.session import BUILTIN_PREFIX, CorrectionSession, Job, display_name, error_line
from napari_sgdc.training_pairs import InputError

if TYPE_CHECKING:
    import napari

LOAD_CHECKPOINT = "Load checkpoint…"
SEGMENT_SHORTCUT = "Shift-S"
__all__ = ["NEXT_REGION_SHORTCUT", "SEGMENT_SHORTCUT", "SegmentWidget", "available_builtins"]
SAMPLE_MODEL_KEY = "sgdc_model"
"""Image-layer metadata key naming the built-in model made for the image (set by the samples)."""


def available_builtins() -> list[str]:
    """Names of the built-in models shipped with the package (empty if none)."""
    try:
        from napari_sgdc.checkpoints import builtin_models

        return list(builtin_models())
    except Exception:  # noqa: BLE001 - a missing or broken models folder means "none"
        return []


def slide_run(viewer: Any, image: Image, target: str, shapes: Any, output: Any) -> tuple | None:
    """Where and how a slide target runs: ``(roi, store, resume, overwrite)``, or None when the
    whole slide was already segmented into its store (a notification says it was opened).

    Raises:
        InputError: the store is not napari-sgdc's, the slide is not in view, or no rectangle.
    """
    slide = ws.slide_of(image)
    if target == ws.TARGET_WHOLE:
        store = ws.whole_store(slide, output)
        state = ws.store_state(store)
        if state == "foreign":
            raise InputError(f"{store} exists and is not a napari-sgdc slide store; not replaced. "
                             "Choose another output folder.")
        if state == "complete":
            show_info(f"'{image.name}' was already segmented into {store}: opened it. Delete it (or choose "
                      "another output folder) to segment again.")
            return None
        if state == "partial":
            show_info(f"Resuming the interrupted segmentation in {store}.")
        return None, store, state == "partial", False
    if target == ws.TARGET_VIEW:
        roi = ws.visible_roi(viewer, image)
        if roi is None:
            raise InputError(f"'{image.name}' is not in view: pan to the tissue, then segment.")
    else:
        picked = ws.pick_shapes(viewer, shapes)
        roi = ws.shape_roi(picked, image) if picked is not None else None
        if roi is None:
            raise InputError("No rectangle: draw one in a Shapes layer over the slide (or pick 'field of "
                             "view'), then segment.")
    return roi, ws.region_store(slide, target), False, True


class ModelPicker:
    """The model picker and its note: the built-in models, the loaded checkpoints and Load
    checkpoint…; it follows the built-in model an opened sample names (image metadata
    `SAMPLE_MODEL_KEY`) until the user picks a model.

    Args:
        session: the session (its models and current source).
        parent: the dock's native widget (the file dialog's parent).
        device: returns the device to load checkpoints onto.

    Attributes:
        combo, note: the controls to put in the dock.
    """

    def __init__(self, session: CorrectionSession, parent: Any, device: Callable[[], str]) -> None:
        self._session, self._parent, self._device = session, parent, device
        self._previous: str | None = None
        self._explicit = self._setting = False
        self.combo = ComboBox(name="model", label="model", choices=self.choices, nullable=True)
        self.note = Label(name="model_note", label=" ")
        wrap_status(self.note)  # the note must not widen the dock when it appears

    def start(self) -> None:
        """Picks the session's model (else the first one) and follows the user's picks from now on."""
        real = [source for source in self.sources() if source != LOAD_CHECKPOINT]
        current = self._session.current_source
        self.combo.value = current if current in real else (real[0] if real else None)
        self.combo.changed.connect(self.on_changed)
        self.on_changed(self.combo.value)
        self._explicit = False  # the start-up value was not the user's choice

    def choices(self, _widget: Any = None) -> list[tuple[str, str]]:
        sources = [BUILTIN_PREFIX + name for name in available_builtins()]
        sources += [source for source in self._session.models if source not in sources]
        return [(display_name(source), source) for source in sources] + [(LOAD_CHECKPOINT, LOAD_CHECKPOINT)]

    def sources(self) -> list[str]:
        """Every source the picker offers."""
        return [value for _, value in self.choices()]

    def refresh_note(self) -> None:
        """Says when no built-in model is installed, or how often the picked model was fine-tuned."""
        session = self._session
        if not available_builtins() and not session.models:
            note = "No built-in models installed: choose Load checkpoint…"
        elif session.current_source in session.models:
            runs = len(session.models[session.current_source].runs)
            note = f"fine-tuned {runs}× (in memory)" if runs else ""
        else:
            note = ""
        self.note.value = note
        self.note.tooltip = ("Save model… in SGDC Fine-tune writes the fine-tuned weights to a file."
                             if note.startswith("fine-tuned") else "")
        self.note.visible = bool(note)

    def on_changed(self, value: str | None) -> None:
        """A pick: the session's current model, or the checkpoint dialog for Load checkpoint…."""
        if not self._setting:
            self._explicit = True
        if value == LOAD_CHECKPOINT:
            path = self._ask_checkpoint_path()
            if path:
                self.load_checkpoint(path)
            else:
                self.combo.value = self._previous if self._previous in self.sources() else None
        else:
            self._session.current_source = value
            self._previous = value
        self.refresh_note()

    def follow_sample(self, image: Image | None) -> None:
        """Picks the built-in model an opened sample names, unless the user picked a model."""
        name = image.metadata.get(SAMPLE_MODEL_KEY) if image is not None and not self._explicit else None
        source = f"{BUILTIN_PREFIX}{name}" if name else None
        if source is None or source == self.combo.value or source not in self.sources():
            return
        self._setting = True
        try:
            self.combo.value = source
        finally:
            self._setting = False

    def _ask_checkpoint_path(self) -> str | None:
        from qtpy.QtWidgets import QFileDialog

        path, _ = QFileDialog.getOpenFileName(
            self._parent, "Load SGDC checkpoint", "",
            "SGDC checkpoints and bioimage.io packages (*.safetensors *.zip bioimageio.yaml rdf.yaml);;All files (*)")
        if path and Path(path).name in ("bioimageio.yaml", "rdf.yaml"):
            return str(Path(path).parent)  # an unpacked package: its folder
        return path or None

    def load_checkpoint(self, path: str) -> bool:
        """Loads a checkpoint file, adds it to the picker and selects it.

        Returns:
            True on success; on failure a notification explains why.
        """
        source = str(path)
        try:
            self._session.get_model(source, self._device())
        except Exception as exc:  # noqa: BLE001 - shown to the user
            notify_error(f"Could not load checkpoint: {error_line(exc)}")
            return False
        self.combo.reset_choices()
        self.combo.value = source
        return True


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
        self._syncing_sliders = False
        self._image_picker = ImagePicker(self._viewer)
        self.image_layer = self._image_picker.combo
        self.picker = ModelPicker(self._session, self.native, lambda: self.device.value)
        self.model, self.model_note = self.picker.combo, self.picker.note
        self._build_run_controls()
        self._build_slide_controls()
        self._build_postprocess_controls()
        self.status = Label(name="status", label="status", value="")
        wrap_status(self.status)
        self.review = RegionReview(self._viewer, self._session, self._set_status)
        self.region_size, self.next_region_button = self.review.region_size, self.review.next_region_button
        self.objects = ObjectQueue(self._viewer, self._session, lambda: self.image_layer.value, self._set_status)
        self.extend([
            self.image_layer, self.model, self.model_note, self.target, self.shapes_layer, self.output,
            self.device, self.engine, self.tile, self.mpp, self.planes, self.gates, self.uncertainty, self.amp,
            self.tta, button_row(self.segment_button, self.cancel_button, name="buttons"), self.threshold,
            self.split_level, self.min_size, self.region_size, self.next_region_button, self.status,
        ])
        self.append(self.objects.container)  # the review queue and the click tools (_object_review)
        self.types = TypeLegend(self._viewer, self._session, self.image_layer, self._set_status, self.objects)
        self.append(self.types.container)  # nucleus types: legend, colours, T / Shift-T (_types)
        self._connect()
        self._sync_settings()
        self.picker.start()
        self.picker.follow_sample(self.image_layer.value)
        self._show_slide_controls()
        self._bind_shortcut()
        self.scroll = scroll_contents(self)  # fits a 1366×768 screen

    def _build_run_controls(self) -> None:
        self.device = ComboBox(name="device", label="device", choices=DEVICES, value="auto")
        self.engine = ComboBox(name="engine", label="engine", choices=dock_engines(), value="auto",
                               tooltip="What runs the network: auto = the engine measured fastest on this CPU "
                                       "(benchmarks/engines.py --save-auto), else torch. All agree within 1e-3.")
        self.tile = SpinBox(name="tile", label="tile size", min=64, max=4096, step=32, value=512)
        self.planes = ComboBox(name="planes", label="stack planes", choices=["all", "current"], value="all",
                               tooltip="For stacks: segment every plane, or only the plane shown now.")
        self.gates = CheckBox(name="gates", text="compute SGDC gate maps", value=True)
        self.uncertainty = CheckBox(
            name="uncertainty", text="uncertainty layer", value=True,
            tooltip="Per-pixel uncertainty (entropy of the probability): free, no extra network pass. "
                    "Needed by Next region; nuclei get a per-object confidence (hover a nucleus).")
        self.mpp = FloatSpinBox(
            name="mpp", label="image µm/px", min=0.0, max=MPP_RANGE[1] - 0.01, step=0.01, value=0.0,
            tooltip="The image's µm per pixel, for models that record their scale (nuclei: 0.25 µm/px, 40×): the "
                    "image is resampled to the model's scale, so a 20× image (0.5) gives correctly sized nuclei. "
                    "0: the image layer's own scale when it is in µm (or mm, nm), else the model's scale. Other "
                    "models ignore it; slides use their metadata.")
        self.amp = CheckBox(
            name="amp", text="fast bf16 inference", value=False,
            tooltip="bf16 autocast: about 1.5× faster on GPUs and on CPUs with native bf16 (AVX512-BF16, AMX); "
                    "probabilities within about 0.005 of float32. No effect elsewhere.")
        self.tta = CheckBox(
            name="tta", text="test-time augmentation (8× time)", value=False,
            tooltip="Average the 8 flips and 90° rotations of every tile: for the built-in nuclei model +1.4 AJI "
                    "points on CoNSeP test (docs/results.md), about 8× slower. Images and slides alike.")
        self.segment_button = PushButton(name="segment_button", text=f"Segment ({SEGMENT_SHORTCUT})")
        self.cancel_button = PushButton(name="cancel_button", text="Cancel", enabled=False)

    def _build_slide_controls(self) -> None:
        self.target = ComboBox(
            name="target", label="slide target", choices=list(ws.TARGETS), value=ws.TARGET_VIEW,
            tooltip="On a whole slide: segment the field of view, the first rectangle of a Shapes layer, "
                    "or the whole slide in the background.")
        self.shapes_layer = ComboBox(
            name="shapes_layer", label="rectangle in", choices=self._shapes_choices, nullable=True,
            tooltip="Shapes layer holding the rectangle (empty: the selected Shapes layer, else the last one).")
        self.output = FileEdit(
            name="output", label="output folder", mode="d", value="",
            tooltip="Folder of <slide>.ome.zarr (empty: next to the slide). An existing store is resumed or "
                    "opened, never replaced.")

    def _build_postprocess_controls(self) -> None:
        options = self._session.options
        self.threshold = FloatSlider(name="threshold", label="threshold", min=0.0, max=1.0, step=0.001,
                                     value=options.threshold)
        self.split_level = FloatSlider(
            name="split_level", label="split level", min=0.0, max=1.0, step=0.001,
            value=options.split_level,
            tooltip="Instance models: seeds grow where the boundary (or separation map) is below this; lower splits "
                    "more. Each model sets it to its own tuned value when it first segments.")
        self.min_size = SpinBox(name="min_size", label="min size (px)", min=0, max=1_000_000,
                                value=options.min_size)

    def _connect(self) -> None:
        self.segment_button.changed.connect(self.run_segment)
        self.cancel_button.changed.connect(self.cancel)
        self.next_region_button.changed.connect(self.next_region)
        for control in (self.device, self.engine, self.tile, self.mpp, self.planes, self.gates, self.uncertainty, self.amp,
                        self.tta):
            control.changed.connect(self._sync_settings)
        for slider in (self.threshold, self.split_level, self.min_size):
            slider.changed.connect(self._on_postprocess_changed)
        for event, slot in (("segmented", self._on_segmented), ("model_changed", self._on_session_event),
                            ("options_changed", self._on_options_changed)):
            self._session.connect(event, slot)
        self.image_layer.changed.connect(self.picker.follow_sample)
        self.image_layer.changed.connect(self._show_slide_controls)
        self.target.changed.connect(self._show_slide_controls)

    def _set_status(self, text: str) -> None:
        self.status.value = text

    # -- model picker and session events ---------------------------------------------------
    def load_checkpoint(self, path: str) -> bool:
        """Loads a checkpoint file, adds it to the model picker and selects it (`ModelPicker.load_checkpoint`).

        Returns:
            True on success; on failure a notification explains why.
        """
        return self.picker.load_checkpoint(path)

    def _on_session_event(self, **_: Any) -> None:
        self.picker.refresh_note()

    def _on_segmented(self, image: Image, **_: Any) -> None:
        self.review.forget(image)
        self.picker.refresh_note()

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

    # -- segmentation --------------------------------------------------------------------
    def _sync_settings(self, *_: Any) -> None:
        settings = self._session.settings
        settings.device, settings.engine = self.device.value, self.engine.value
        settings.tile = int(self.tile.value)
        settings.planes = self.planes.value
        settings.gates = bool(self.gates.value)
        settings.uncertainty = bool(self.uncertainty.value)
        settings.mpp = float(self.mpp.value)
        settings.amp = bool(self.amp.value)
        settings.tta = bool(self.tta.value)

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
            notify_error(f"Cannot segment '{image.name}': {error_line(exc)}")
            self.status.value = ""
            return None
        return self.job

    def run_slide(self, image: Image, source: str, target: str | None = None) -> "ws.SlideJob | None":
        """Segments a slide layer's `target` (default: the picked one) in a `SlideJob`
        (`slide_run` decides the store: a stopped whole-slide run is resumed, a finished one opened).

        Returns:
            The started job, or None (a notification says why).
        """
        target = target or self.target.value
        try:
            plan = slide_run(self._viewer, image, target, self.shapes_layer.value, self.output.value)
        except InputError as exc:
            notify_error(str(exc))
            return None
        if plan is None:  # a finished whole-slide store: opened
            store = ws.whole_store(ws.slide_of(image), self.output.value)
            ws.add_store_layers(self._viewer, image, store, target, source)
            self.status.value = f"opened {store.name}"
            return None
        roi, store, resume, overwrite = plan
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
            self.status.value = f"{job.image.name}: segmented in {outcome.seconds:.1f} s{scale}" + \
                self.types.summary(job.image)
        elif outcome.cancelled:
            self.status.value = "cancelled"
        else:
            self.status.value = "failed (see notification)"
        self.picker.refresh_note()

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
            self.split_level.value = options.split_level
            self.min_size.value = options.min_size
        finally:
            self._syncing_sliders = False

    def _on_postprocess_changed(self, *_: Any) -> None:
        if self._syncing_sliders:
            return
        try:
            options = PostprocessOptions(
                float(self.threshold.value), float(self.split_level.value), int(self.min_size.value)
            )
        except ValueError as exc:
            notify_error(f"Post-processing not changed: {error_line(exc)}")
            return
        self._session.options = options
        image = self.image_layer.value
        if image is not None:
            self.update_mask(image)

    def update_mask(self, image: Image) -> bool:
        """Post-processes `image`'s cached maps into its mask layer with the session's options
        (`CorrectionSession.rethreshold`: no forward pass; all planes at once, so instance ids
        stay unique across a stack's planes).

        Returns:
            True when the mask layer was updated.
        """
        mask_layer = mask_layer_of(self._viewer, image)
        if image not in self._session.results or mask_layer is None:
            return False
        try:
            cache = self._session.rethreshold(image)
        except Exception as exc:  # noqa: BLE001 - shown to the user
            notify_error(f"Post-processing failed: {error_line(exc)}")
            return False
        mask_layer.data = unflatten(cache.written_mask.copy(), cache.lead_shape)
        set_confidence_features(mask_layer, cache.confidence())
        self.types.refresh(image)
        return True

    # -- review: the most uncertain regions first ---------------------------------------
    def next_region(self, *_: Any) -> Any:
        """Moves the view to the most uncertain region of the picked image's current plane that
        was not visited yet (`RegionReview.next_region`).

        Returns:
            The `Region` shown, or None (a notification says why).
        """
        return self.review.next_region(self.image_layer.value)

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
        self.picker.refresh_note()

