"""The "SGDC Fine-tune" dock widget: correct, retrain, re-segment, undo, save.

The dock shows how much of the picked corrections differs from what the model wrote
(`napari_sgdc.train.corrections.edit_summary`), live while the user paints, and
fine-tuning weights those edited pixels (``finetune(predictions=...)``). Its
training list is autosaved (`napari_sgdc.autosave`), so corrections survive a crash
or a closed napari; the next session offers to recover them.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FloatSpinBox,
    Label,
    PushButton,
    Select,
    SpinBox,
)
from napari.layers import Image, Labels, Layer, Shapes
from napari.qt.threading import create_worker
from napari.utils import progress
from napari.utils.notifications import show_info, show_warning
from qtpy.QtCore import QTimer

from napari_sgdc._napari._layers import (
    _transform_kwargs,
    image_of_result,
    image_planes,
    layer_mpp,
    mask_layer_of,
    spatial_shape_of,
)
from napari_sgdc._napari._runner import Outcome, Relay, SegmentJob, _guarded, error_text, notify_error
from napari_sgdc._napari._session import (Job, ModelState, SGDCSession, display_name, get_session, real_viewer,
                                          usable_mpp)
from napari_sgdc._napari._shared import ImagePicker, claim, wrap_status, ensure_idle
from napari_sgdc._napari import _wholeslide as ws
from napari_sgdc.training_pairs import InputError, TrainingPair, collect_pair, split_by_model

if TYPE_CHECKING:
    import napari

MAX_UNDO = 10
EDITS_DELAY_MS = 150
"""The edited-region count is recomputed this long after the last paint event (strokes coalesce)."""


def read_pair(viewer: Any, session: SGDCSession, image: Any, labels: Any) -> TrainingPair:
    """Reads an image layer and its corrections layer into a `TrainingPair`.

    The pair is made for the model that segmented `image` (else the picked model), at the
    µm/px that segmentation used (else the Segment widget's). When `labels` is the image's
    own mask layer, only the planes the user changed are kept.

    Raises:
        InputError: wrong layer types, no model, or what `collect_pair` rejects.
    """
    if image is None or not isinstance(image, Image):
        kind = type(image).__name__ if image is not None else "no layer"
        raise InputError(f"Pick an Image layer to fine-tune on (got {kind}).")
    if labels is None:
        raise InputError("No corrections: segment an image, paint on its mask layer, then fine-tune.")
    if not isinstance(labels, Labels):
        raise InputError(
            f"'{labels.name}' is a {type(labels).__name__} layer, not Labels: pick the '<image> mask' "
            "Labels layer or convert your mask to Labels (right-click > Convert to Labels)."
        )
    if ws.slide_of(image) is not None:
        return _read_slide_pair(session, image, labels)
    cache = session.results.get(image)
    source = cache.model_source if cache is not None else session.current_source
    if source is None:
        raise InputError("No model: pick one in SGDC Segment (or Load checkpoint…) and segment first.")
    own_mask = cache is not None and mask_layer_of(viewer, image) is labels
    planes = image_planes(image, "all")
    return collect_pair(
        planes.planes, np.asarray(labels.data), image_shape=spatial_shape_of(image), image_name=image.name,
        labels_name=labels.name, model_source=source, predicted=cache.written_mask if own_mask else None,
        mpp=cache.mpp if cache is not None else (session.settings.mpp or layer_mpp(image)),
    )


def _read_slide_pair(session: SGDCSession, image: Any, labels: Any) -> TrainingPair:
    """A slide region as a training pair: the slide pixels under a ``<image> corrections`` layer
    (on the working grid the model saw) and the corrected labels; only edits count."""
    if not ws.is_correction_layer(labels):
        raise InputError(
            f"'{image.name}' is a whole slide: segment a region, press 'Correct region' and paint on "
            f"'{image.name} corrections' (pick it as the corrections)."
        )
    meta = labels.metadata["sgdc"]
    source = meta.get("model_source") or session.current_source
    if source is None:
        raise InputError("No model: pick one in SGDC Segment (or Load checkpoint…) and segment first.")
    y0, x0, h, w = meta["box"]
    try:
        crop = ws.read_crop(labels)
    except Exception as exc:  # noqa: BLE001 - e.g. the store or the slide was moved
        raise InputError(f"Cannot read the region of '{image.name}': {error_text(exc)}") from exc
    data = np.asarray(labels.data)
    return collect_pair(
        crop[None], data, image_shape=data.shape, image_name=f"{image.name} [y {y0}, x {x0}, {h}×{w}]",
        labels_name=labels.name, model_source=source, predicted=np.asarray(meta["written"])[None],
    )


def _wrap_list(select: Select) -> None:
    """Long pair titles wrap inside the training list instead of widening the dock (which
    would shrink the canvas)."""
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QAbstractScrollArea, QSizePolicy

    native = select.native
    native.setWordWrap(True)
    native.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    native.setSizeAdjustPolicy(QAbstractScrollArea.SizeAdjustPolicy.AdjustIgnored)
    native.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)


def edits_text(viewer: Any, session: SGDCSession, image: Any, labels: Any) -> str:
    """One line on what the user changed in `labels`, the picked corrections of `image`.

    For the image's own ``<image> mask`` it counts the edited pixels and objects against
    what the model wrote (`napari_sgdc.train.corrections.edit_summary` per plane);
    for another Labels layer it says that the whole image is used.
    """
    if not isinstance(labels, Labels) or not isinstance(image, Image):
        return ""
    if ws.is_correction_layer(labels):
        from napari_sgdc.train.corrections import edit_summary

        written = np.asarray(labels.metadata["sgdc"]["written"])
        data = np.asarray(labels.data)
        if data.shape != written.shape or np.array_equal(data, written):
            return "no edits yet: paint or erase on the region"
        summary = edit_summary(data, written, instance=True)
        noun = "object" if summary.objects == 1 else "objects"
        return f"{summary.pixels} px in {summary.objects} {noun} of the region; they weigh most in fine-tuning"
    cache = session.results.get(image)
    if cache is None or mask_layer_of(viewer, image) is not labels:
        return f"'{labels.name}': not the model's mask, so the whole image is used"
    data = np.asarray(labels.data)
    if data.size != cache.written_mask.size:
        return ""
    from napari_sgdc.train.corrections import edit_summary

    planes = data.reshape(cache.written_mask.shape)
    pixels = objects = edited_planes = 0
    for index in range(len(planes)):
        if np.array_equal(planes[index], cache.written_mask[index]):
            continue
        summary = edit_summary(planes[index], cache.written_mask[index], instance=cache.instances)
        if summary.pixels:
            pixels, objects, edited_planes = pixels + summary.pixels, objects + summary.objects, edited_planes + 1
    if not pixels:
        return "no edits yet: paint or erase on the mask"
    noun = "object" if objects == 1 else "objects"
    where = f" on {edited_planes} plane{'s' if edited_planes > 1 else ''}" if cache.lead_shape else ""
    share = 100.0 * pixels / data.size
    return f"{pixels} px ({share:.1f}%) in {objects} {noun}{where}; they weigh most in fine-tuning"


class FinetuneWidget(Container):
    """Fine-tunes the shared in-memory model on corrected labels.

    Each training pair belongs to the model it was made for; a run trains the current
    model on its own pairs only and says which pairs it left out.

    Args:
        napari_viewer: the viewer the widget is docked in.
    """

    def __init__(self, napari_viewer: "napari.viewer.Viewer") -> None:
        super().__init__(labels=True)
        self._viewer = real_viewer(napari_viewer)
        self._session = get_session(napari_viewer)
        self.pairs: list[TrainingPair] = []
        self.losses: list[float] = []
        self.history: Any = None
        self.worker: Any = None
        self.segment_jobs: list[SegmentJob] = []
        self._cancel = threading.Event()
        self._pbar: Any = None

        from napari_sgdc.config import PRESETS

        self._presets = PRESETS
        self._image_picker = ImagePicker(self._viewer)
        self.image_layer = self._image_picker.combo
        self.labels_layer = ComboBox(
            name="labels_layer", label="corrections", choices=self._labels_choices, nullable=True,
            tooltip="The corrected ground truth: paint/erase on '<image> mask' or pick any Labels layer.",
        )
        self.edits = Label(name="edits", label="edited", value="")
        self.edits.tooltip = ("Pixels and objects of the corrections that differ from what the model wrote; "
                              "fine-tuning crops to them and weighs them most.")
        self.training_list = Select(name="training_list", label="training list", choices=self._pair_titles)
        self.region_button = PushButton(
            name="region_button", text="Correct region",
            tooltip="On a whole slide: copy the segmented labels of the field of view (or of the selected "
                    "Shapes layer's rectangle) into an editable '<image> corrections' layer.",
        )
        self.add_button = PushButton(name="add_button", text="Add pair")
        self.remove_button = PushButton(name="remove_button", text="Remove selected")
        list_buttons = Container(layout="horizontal", labels=False, label=" ",
                                 widgets=[self.add_button, self.remove_button])
        list_buttons.margins = (0, 0, 0, 0)
        self.preset = ComboBox(name="preset", label="preset", choices=list(PRESETS), value="quick")
        self.advanced = CheckBox(name="advanced", text="advanced", value=False)
        self.steps = SpinBox(name="steps", label="steps", min=1, max=100_000)
        self.learning_rate = FloatSpinBox(
            name="learning_rate", label="learning rate", min=1e-6, max=1.0, step=1e-5,
        )
        self.learning_rate.native.setDecimals(6)
        self.freeze_encoder = CheckBox(name="freeze_encoder", text="freeze encoder")
        self.finetune_button = PushButton(name="finetune_button", text="Fine-tune")
        self.cancel_button = PushButton(name="cancel_button", text="Cancel", enabled=False)
        run_buttons = Container(layout="horizontal", labels=False, label=" ",
                                widgets=[self.finetune_button, self.cancel_button])
        run_buttons.margins = (0, 0, 0, 0)
        self.undo_button = PushButton(name="undo_button", text="Undo fine-tune")
        self.save_button = PushButton(name="save_button", text="Save model…")
        file_buttons = Container(layout="horizontal", labels=False, label=" ",
                                 widgets=[self.undo_button, self.save_button])
        file_buttons.margins = (0, 0, 0, 0)
        self.recover_button = PushButton(name="recover_button", text="Recover autosaved corrections")
        self.discard_button = PushButton(name="discard_button", text="Discard")
        self.recover_row = Container(name="recover_row", layout="horizontal", labels=False, label=" ",
                                     widgets=[self.recover_button, self.discard_button])
        self.recover_row.margins = (0, 0, 0, 0)
        self.status = Label(name="status", label="status", value="")
        wrap_status(self.status)
        wrap_status(self.edits)
        _wrap_list(self.training_list)
        self.extend([
            self.recover_row, self.image_layer, self.region_button, self.labels_layer, self.edits, self.training_list, list_buttons,
            self.preset, self.advanced, self.steps, self.learning_rate, self.freeze_encoder, run_buttons,
            file_buttons, self.status,
        ])
        self._build_plot()
        from napari_sgdc.autosave import Autosave

        self.autosave = Autosave()
        self._autosave_failed = False
        self._watched: Labels | None = None
        self._edits_timer = QTimer(self.native)
        self._edits_timer.setSingleShot(True)
        self._edits_timer.setInterval(EDITS_DELAY_MS)
        self._edits_timer.timeout.connect(self.update_edits)

        self.preset.changed.connect(self._apply_preset)
        self.advanced.changed.connect(self._show_advanced)
        self.labels_layer.changed.connect(self._on_labels_picked)
        self.image_layer.changed.connect(self._on_image_picked)
        self.add_button.changed.connect(self.add_pair)
        self.region_button.changed.connect(self.correct_region)
        self.image_layer.changed.connect(self._show_region_button)
        self._show_region_button(self.image_layer.value)
        self.remove_button.changed.connect(self.remove_selected)
        self.finetune_button.changed.connect(self.start_finetune)
        self.cancel_button.changed.connect(self.cancel)
        self.undo_button.changed.connect(self.undo)
        self.save_button.changed.connect(self.save_dialog)
        self.recover_button.changed.connect(self.recover)
        self.discard_button.changed.connect(self.discard)
        self._session.connect("segmented", self._on_segmented)
        self._apply_preset(self.preset.value)
        self._show_advanced(False)
        self._on_image_picked(self.image_layer.value)
        self._watch(self.labels_layer.value)
        self.update_edits()
        self._offer_recovery()

    # -- plot --------------------------------------------------------------------------
    def _build_plot(self) -> None:
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(3.2, 2.0), dpi=100, tight_layout=True)
        self.axes = self.figure.add_subplot(1, 1, 1)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(170)
        self._draw_losses()
        self.native.layout().addWidget(self.canvas)

    def _draw_losses(self) -> None:
        axes = self.axes
        axes.clear()
        axes.set_xlabel("step", fontsize=8)
        axes.set_ylabel("loss", fontsize=8)
        axes.tick_params(labelsize=7)
        axes.set_title("fine-tune loss", fontsize=9)
        if self.losses:
            steps = np.arange(1, len(self.losses) + 1)
            axes.plot(steps, self.losses, color="tab:orange", linewidth=1.2)
        self.canvas.draw_idle()

    # -- choices -----------------------------------------------------------------------
    def _labels_choices(self, _widget: Any = None) -> list[Layer]:
        """Labels layers first, then the other layers (picking one gives a clear error)."""
        layers = [layer for layer in self._viewer.layers if "sgdc" not in layer.metadata
                  or isinstance(layer, Labels)]
        labels = [layer for layer in layers if isinstance(layer, Labels)]
        image = self.image_layer.value if hasattr(self, "image_layer") else None
        return labels + [layer for layer in layers if not isinstance(layer, Labels) and layer is not image]

    def _pair_titles(self, _widget: Any = None) -> list[str]:
        return [pair.title for pair in self.pairs]

    def _on_image_picked(self, image: Image | None) -> None:
        if image is None:
            return
        mask = mask_layer_of(self._viewer, image)
        if mask is not None and self.labels_layer.value is not mask:
            self.labels_layer.reset_choices()
            self.labels_layer.value = mask

    def _on_labels_picked(self, labels: Layer | None) -> None:
        self._watch(labels)
        if labels is None:
            return
        image = image_of_result(self._viewer, labels)
        if image is not None and self.image_layer.value is not image:
            self.image_layer.value = image
        self._schedule_edits()

    def _on_segmented(self, image: Image) -> None:
        self.reset_choices()
        if self.image_layer.value is image:
            self._on_image_picked(image)
        self._schedule_edits()

    # -- edited region ---------------------------------------------------------------------
    def _watch(self, labels: Layer | None) -> None:
        """Follows the paint and data events of the picked corrections layer only."""
        if labels is self._watched:
            return
        if self._watched is not None:
            for event in (self._watched.events.paint, self._watched.events.data):
                event.disconnect(self._schedule_edits)
        self._watched = labels if isinstance(labels, Labels) else None
        if self._watched is not None:
            for event in (self._watched.events.paint, self._watched.events.data):
                event.connect(self._schedule_edits)

    def _schedule_edits(self, *_: Any) -> None:
        self._edits_timer.start()  # restarts: one count after the strokes stop

    def update_edits(self) -> str:
        """Shows how much of the picked corrections differs from what the model wrote.

        Returns:
            The text shown (empty when there is nothing to compare).
        """
        try:
            text = edits_text(self._viewer, self._session, self.image_layer.value, self.labels_layer.value)
        except Exception as exc:  # noqa: BLE001 - a count must never break painting
            text = f"not counted: {error_text(exc)}"
        self.edits.value = text
        self.edits.visible = bool(text)
        return text

    # -- autosave and recovery ---------------------------------------------------------------
    def _autosave(self, pairs: list[TrainingPair]) -> None:
        """Saves `pairs` to the autosave folder; a failure is a warning (once), never an error."""
        try:
            self.autosave.save(pairs)
        except Exception as exc:  # noqa: BLE001 - e.g. a full disk: keep working, say it once
            if not self._autosave_failed:
                show_warning(f"Could not autosave the corrections to {self.autosave.folder}: {error_text(exc)}")
            self._autosave_failed = True

    def _forget(self, keys: list[tuple[str, str]]) -> None:
        try:
            self.autosave.remove(keys)
        except Exception as exc:  # noqa: BLE001
            show_warning(f"Could not update the autosave in {self.autosave.folder}: {error_text(exc)}")

    def _offer_recovery(self) -> None:
        pending = self.autosave.pending()
        self.recover_row.visible = bool(pending)
        if not pending:
            return
        noun = "correction" if len(pending) == 1 else "corrections"
        self.recover_button.text = f"Recover {len(pending)} autosaved {noun}"
        names = ", ".join(sorted({entry.image_name for entry in pending}))
        self.recover_button.tooltip = f"Corrected images from an earlier session: {names}"
        show_info(f"SGDC Fine-tune: {len(pending)} autosaved {noun} from an earlier session ({names}). "
                  "Press 'Recover' in SGDC Fine-tune to add them back, or 'Discard'.")

    def recover(self, *_: Any) -> list[TrainingPair]:
        """Adds the autosaved pairs of earlier sessions back to the training list.

        A one-plane pair also comes back as a Labels layer ``<labels> (recovered)`` on its
        image (the image is added too when no layer has its name); existing layers are
        never changed.

        Returns:
            The recovered pairs.
        """
        pending = self.autosave.pending()
        pairs, problems = self.autosave.load(pending)
        for problem in problems:
            notify_error(f"Could not recover an autosaved correction: {problem}")
        for pair in pairs:
            self.pairs = [p for p in self.pairs if p.key != pair.key] + [pair]
            self._add_recovered_layers(pair)
        self.training_list.reset_choices()
        readable = {pair.key for pair in pairs}
        try:
            self.autosave.adopt([entry for entry in pending if entry.key in readable])
        except Exception as exc:  # noqa: BLE001
            show_warning(f"Could not update the autosave in {self.autosave.folder}: {error_text(exc)}")
        self.recover_row.visible = False
        self.status.value = f"recovered {len(pairs)} corrected image(s) into the training list"
        return pairs

    def discard(self, *_: Any) -> None:
        """Deletes the autosaved pairs of earlier sessions."""
        self._forget([entry.key for entry in self.autosave.pending()])
        self.recover_row.visible = False
        self.status.value = "autosaved corrections discarded"

    def _add_recovered_layers(self, pair: TrainingPair) -> None:
        if len(pair.labels) != 1:
            return  # planes of a stack: the training list holds them
        labels, image_data = pair.labels[0], pair.images[0]
        image = self._viewer.layers[pair.image_name] if pair.image_name in self._viewer.layers else None
        if image is None:
            rgb = image_data.ndim == 3 and image_data.shape[-1] in (3, 4)
            image = self._viewer.add_image(np.array(image_data), name=pair.image_name, rgb=rgb)
        if not isinstance(image, Image) or tuple(spatial_shape_of(image)) != labels.shape:
            return
        name, number = f"{pair.labels_name} (recovered)", 2
        while name in self._viewer.layers:
            name, number = f"{pair.labels_name} (recovered {number})", number + 1
        self._viewer.add_labels(np.array(labels), name=name, **_transform_kwargs(image))

    # -- slide regions -----------------------------------------------------------------------
    def _show_region_button(self, image: Any) -> None:
        self.region_button.visible = ws.slide_of(image) is not None

    def correct_region(self, *_: Any) -> Labels | None:
        """Copies the slide's segmented labels in the field of view (or the rectangle of the
        active Shapes layer) into an editable ``<image> corrections`` layer (at most
        `MAX_CROP` working pixels on a side) and picks it as the corrections.

        Returns:
            The new layer, or None (a notification says why).
        """
        image = self.image_layer.value
        if ws.slide_of(image) is None:
            notify_error("Correct region works on a whole slide opened with napari-sgdc's reader.")
            return None
        nuclei = ws.store_layer_of(self._viewer, image, "nuclei")
        if nuclei is None:
            notify_error(f"Segment '{image.name}' first (SGDC Segment: field of view, rectangle or whole slide).")
            return None
        active = self._viewer.layers.selection.active
        if isinstance(active, Shapes) and len(active.data):
            roi = ws.shape_roi(active, image)
        else:
            roi = ws.visible_roi(self._viewer, image)
        if roi is None:
            notify_error(f"'{image.name}' is not in view: pan to the region to correct.")
            return None
        try:
            box = ws.crop_box(nuclei, roi)
            layer = ws.add_correction_layer(self._viewer, image, nuclei, box)
        except Exception as exc:  # noqa: BLE001 - shown to the user
            notify_error(f"Cannot copy the region: {error_text(exc)}")
            return None
        self.labels_layer.reset_choices()
        self.labels_layer.value = layer
        self._viewer.layers.selection.active = layer
        self.status.value = f"region {box[2]}×{box[3]} px copied into '{layer.name}': correct it, then Fine-tune"
        return layer

    # -- training list ---------------------------------------------------------------------
    def add_pair(self, *_: Any) -> bool:
        """Adds the picked image/corrections pair (replacing an earlier entry of the same image and model).

        Returns:
            True when added; otherwise a notification says why not.
        """
        try:
            pair = read_pair(self._viewer, self._session, self.image_layer.value, self.labels_layer.value)
        except InputError as exc:
            notify_error(str(exc))
            return False
        self._put_pair(pair)
        self.status.value = f"{len(self.pairs)} corrected image(s) in the list"
        return True

    def _put_pair(self, pair: TrainingPair) -> None:
        """Adds `pair`, replacing an earlier pair of the same image for the same model."""
        self.pairs = [p for p in self.pairs if p.key != pair.key] + [pair]
        self.training_list.reset_choices()
        self._autosave([pair])

    def remove_selected(self, *_: Any) -> None:
        """Removes the selected entries from the training list (and from the autosave)."""
        selected = set(self.training_list.value)
        self._forget([pair.key for pair in self.pairs if pair.title in selected])
        self.pairs = [pair for pair in self.pairs if pair.title not in selected]
        self.training_list.reset_choices()

    # -- settings ----------------------------------------------------------------------------
    def _apply_preset(self, name: str) -> None:
        preset = self._presets[name]
        self.steps.value = int(preset.max_steps or preset.steps_per_epoch or 1)
        self.learning_rate.value = float(preset.lr_decoder)
        self.freeze_encoder.value = bool(preset.freeze_encoder)

    def _show_advanced(self, show: bool) -> None:
        for control in (self.steps, self.learning_rate, self.freeze_encoder):
            control.visible = bool(show)

    def train_config(self) -> Any:
        """The TrainConfig of the next run: the preset with the advanced values applied."""
        preset = self._presets[self.preset.value]
        steps = int(self.steps.value)
        lr = float(self.learning_rate.value)
        ratio = preset.lr_encoder / preset.lr_decoder if preset.lr_decoder else 0.0
        return replace(
            preset,
            max_steps=steps,
            steps_per_epoch=steps,
            epochs=1,
            lr_decoder=lr,
            lr_encoder=lr * ratio,
            freeze_encoder=bool(self.freeze_encoder.value),
            device=self._session.settings.device,
        )

    # -- fine-tune ------------------------------------------------------------------------------
    def _training_pairs(self, source: str) -> list[TrainingPair]:
        """The pairs for model `source`: the list plus the picked pair if it holds corrections.

        Pairs made for another model are left out with a notification that says so.

        Raises:
            InputError: no corrections, or none made for `source`.
        """
        try:
            current = read_pair(self._viewer, self._session, self.image_layer.value, self.labels_layer.value)
        except InputError:
            if not self.pairs:
                raise
            current = None
        if current is not None:
            self._put_pair(current)
        kept, excluded = split_by_model(self.pairs, source)
        model = display_name(source)
        if excluded:
            others = ", ".join(sorted({pair.model_name for pair in excluded}))
            names = ", ".join(pair.image_name for pair in excluded)
            if not kept:
                raise InputError(
                    f"No corrections for '{model}': the training list only holds pairs made for {others} "
                    f"({names}). Pick that model, or segment and correct an image with '{model}'."
                )
            show_warning(f"Fine-tuning '{model}' on its {len(kept)} pair(s); left out {len(excluded)} pair(s) "
                         f"made for {others}: {names}.")
        return kept

    def _model_state(self) -> ModelState:
        state = self._session.current()
        if state is not None:
            return state
        source = self._session.current_source
        if source is None:
            raise InputError("No model: pick one in SGDC Segment (or Load checkpoint…) and segment first.")
        try:
            return self._session.get_model(source, self._session.settings.device)
        except Exception as exc:  # noqa: BLE001 - shown to the user
            raise InputError(f"Could not load model: {error_text(exc)}") from exc

    def start_finetune(self, *_: Any) -> Any:
        """Starts fine-tuning the shared model on the corrections in a thread worker.

        Returns:
            The started worker, or None when an input is wrong (a notification says why).
        """
        if not claim(self._session, Job.FINETUNE):
            return None
        try:
            state = self._model_state()
            pairs = self._training_pairs(state.source)
        except InputError as exc:
            self._session.busy.release(Job.FINETUNE)
            notify_error(str(exc))
            return None
        config = self.train_config()
        images = [plane for pair in pairs for plane in pair.images]
        instances = state.model.config.is_instance
        labels = [
            (plane.astype(np.int32) if instances else plane > 0) for pair in pairs for plane in pair.labels
        ]
        predictions = [
            None if prediction is None else (prediction.astype(np.int32) if instances else prediction > 0)
            for pair in pairs for prediction in (pair.predictions or [None] * len(pair.labels))
        ]
        mpps = [usable_mpp(pair.mpp, state.model.config) for pair in pairs for _ in pair.labels]
        self._autosave(pairs)  # before training: a crash from here on loses no correction
        snapshot = state.snapshot()
        self._cancel = threading.Event()
        self.losses = []
        self._draw_losses()
        self._relay = Relay()
        self._relay.event.connect(self._on_train_event)
        self._pbar = progress(total=int(config.max_steps), desc="SGDC fine-tune")
        self._set_running(True)
        self.status.value = f"fine-tuning on {len(pairs)} image(s)…"
        run_info = {
            "images": [pair.image_name for pair in pairs],
            "planes": len(images),
            "preset": self.preset.value,
        }

        def job() -> Any:
            from napari_sgdc.train import finetune

            return finetune(state.model, images, labels, preset=config, predictions=predictions, mpp=mpps,
                            callbacks=[self._relay.event.emit], cancel=self._cancel)

        self.worker = create_worker(_guarded(job), _start_thread=False)
        self.worker.returned.connect(
            lambda outcome: self._on_finetuned(outcome, state, snapshot, config, run_info, pairs)
        )
        self.worker.start()
        return self.worker

    def _on_train_event(self, event: dict[str, Any]) -> None:
        if event.get("kind") != "step" or self._pbar is None:
            return  # not a step, or a late event after the run ended
        loss = event.get("loss")
        if loss is not None:
            self.losses.append(float(loss))
            self._draw_losses()
        self.status.value = f"step {event.get('step')}/{event.get('total_steps')}" + (
            f"  loss {loss:.4f}" if loss is not None else ""
        )
        # Last: updating napari's progress bar may process queued events, including the
        # worker's "returned" signal (which ends the run and closes the bar).
        pbar = self._pbar
        total = int(event.get("total_steps") or pbar.total or 0)
        if total and pbar.total != total:
            pbar.total = total
        pbar.update(max(0, int(event.get("step", 0)) - pbar.n))

    def cancel(self, *_: Any) -> None:
        """Stops fine-tuning (the weights are then restored) or the re-segmentation."""
        self._cancel.set()
        for job in self.segment_jobs:
            job.cancel.set()
        self.status.value = "cancelling…"

    def _on_finetuned(
        self, outcome: Outcome, state: ModelState, snapshot: dict, config: Any, run_info: dict, pairs: list
    ) -> None:
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        self._session.busy.release(Job.FINETUNE)
        self._set_running(False)
        history = outcome.value
        cancelled = outcome.cancelled or bool(getattr(history, "cancelled", False))
        if cancelled or outcome.error is not None:
            state.restore(snapshot)
            if cancelled:
                show_info("Fine-tune cancelled; the model is unchanged.")
                self.status.value = "cancelled; model unchanged"
            else:
                notify_error(f"Fine-tune failed (model unchanged): {error_text(outcome.error)}")
                self.status.value = "failed; model unchanged"
            return
        self.history = history
        losses = [float(x) for x in getattr(history, "losses", [])] or self.losses
        if losses:
            self.losses = losses
            self._draw_losses()
        state.undo.append(snapshot)
        run_info["steps"] = int(getattr(history, "steps", len(losses)))
        run_info["loss_first"] = losses[0] if losses else None
        run_info["loss_last"] = losses[-1] if losses else None
        state.runs.append(run_info)
        state.last_train_config = config
        if len(state.undo) > MAX_UNDO:
            state.undo.pop(0)
        # trained into a kept run: no longer at risk (a newer pair of an image, added meanwhile, stays)
        self._forget([pair.key for pair in pairs if any(pair is current for current in self.pairs)])
        self.status.value = (
            f"fine-tuned {run_info['steps']} steps in {outcome.seconds:.1f} s"
            + (f"; loss {losses[0]:.3f} → {losses[-1]:.3f}" if losses else "")
        )
        self._session.emit("model_changed")
        self._resegment([pair.image_name for pair in pairs], state.source)

    # -- re-segmentation --------------------------------------------------------------------------
    def _resegment(self, image_names: list[str], source: str) -> None:
        """Segments the named images again with model `source`, one after the other, with the
        Segment widget's settings."""
        queue = [self._viewer.layers[name] for name in dict.fromkeys(image_names)
                 if name in self._viewer.layers and isinstance(self._viewer.layers[name], Image)]
        self.segment_jobs = []

        def next_job(*_: Any) -> None:
            if not queue:
                self._session.busy.release(Job.RESEGMENT)
                self._set_running(False)
                return
            image = queue.pop(0)
            try:
                job = SegmentJob(self._viewer, self._session, image, source, on_done=on_done)
            except Exception as exc:  # noqa: BLE001 - shown to the user
                notify_error(f"Re-segmenting '{image.name}' failed: {error_text(exc)}")
                next_job()
                return
            self.segment_jobs.append(job)

        def on_done(job: SegmentJob, outcome: Outcome) -> None:
            if outcome.cancelled:
                queue.clear()
            next_job()

        if queue and claim(self._session, Job.RESEGMENT, ", ".join(image_names)):
            self._set_running(True)
            next_job()

    # -- undo / save ---------------------------------------------------------------------------------
    def undo(self, *_: Any) -> bool:
        """Restores the weights from before the last fine-tune, bit for bit, and re-segments.

        Returns:
            True when a fine-tune was undone.
        """
        state = self._session.current()
        if not ensure_idle(self._session):
            return False
        if state is None or not state.undo:
            notify_error("Nothing to undo: the model has not been fine-tuned.")
            return False
        state.restore(state.undo.pop())
        run = state.runs.pop() if state.runs else {"images": []}
        self._autosave([pair for pair in self.pairs  # the undone run no longer holds these corrections
                        if pair.model_source == state.source and pair.image_name in run["images"]])
        state.last_train_config = None
        self.status.value = f"undone; {len(state.runs)} fine-tune run(s) kept"
        show_info("Fine-tune undone: the previous weights are restored.")
        self._session.emit("model_changed")
        self._resegment(run["images"], state.source)
        return True

    def save_dialog(self, *_: Any) -> None:
        """Asks for a file name and saves the model."""
        from qtpy.QtWidgets import QFileDialog

        path, _ = QFileDialog.getSaveFileName(
            self.native, "Save SGDC model", "finetuned.safetensors", "SGDC checkpoints (*.safetensors)"
        )
        if path:
            self.save_model(path)

    def save_model(self, path: str) -> Any:
        """Writes the in-memory model as a safetensors checkpoint with provenance.

        Returns:
            The written path, or None on failure (a notification says why).
        """
        state = self._session.current()
        if state is None:
            notify_error("No model to save: pick and use a model in SGDC Segment first.")
            return None
        from napari_sgdc.io import save_checkpoint

        if not str(path).endswith(".safetensors"):
            path = f"{path}.safetensors"
        try:
            written = save_checkpoint(
                path, state.model, train_config=state.last_train_config, provenance=state.provenance()
            )
        except Exception as exc:  # noqa: BLE001 - shown to the user
            notify_error(f"Could not save the model: {error_text(exc)}")
            return None
        show_info(f"Model saved to {written}")
        self.status.value = f"saved {written}"
        return written

    def _set_running(self, running: bool) -> None:
        self.finetune_button.enabled = not running
        self.undo_button.enabled = not running
        self.save_button.enabled = not running
        self.cancel_button.enabled = running
