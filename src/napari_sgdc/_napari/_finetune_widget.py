"""The "SGDC Fine-tune" dock widget: correct, retrain, re-segment, undo, save.

The dock binds widgets to the viewer's headless `napari_sgdc.session.CorrectionSession`:
it reads layers into training pairs and edit counts (`_corrections`), keeps a
`napari_sgdc.session.TrainingList` (autosaved, so corrections survive a crash or a closed
napari), and runs `FinetuneJob` and the re-segmentation on the plugin's job runner (`_runner`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from magicgui.widgets import CheckBox, ComboBox, Container, FloatSpinBox, Label, PushButton, Select, SpinBox
from napari.layers import Image, Labels, Layer
from napari.utils.notifications import show_info, show_warning

from napari_sgdc._napari._corrections import EditWatcher, RecoveryRow, edits_text, read_pair, region_layer
from napari_sgdc._napari._loss_plot import LossPlot
from napari_sgdc._napari._runner import FinetuneJob, JobChain, Outcome, Relay, SegmentJob, notify_error
from napari_sgdc._napari._session import get_session, real_viewer
from napari_sgdc._napari._shared import ImagePicker, button_row, claim, ensure_idle, scroll_contents, wrap_status
import napari_sgdc._napari._wholeslide as ws
from napari_sgdc._napari._layers import image_of_result, mask_layer_of
from napari_sgdc.session import CorrectionSession, Job, TrainingList, error_line
from napari_sgdc.training_pairs import InputError, TrainingPair

if TYPE_CHECKING:
    import napari

def _wrap_list(select: Select) -> None:
    """Long pair titles wrap inside the training list instead of widening the dock."""
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QAbstractScrollArea, QSizePolicy

    native = select.native
    native.setWordWrap(True)
    native.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    native.setSizeAdjustPolicy(QAbstractScrollArea.SizeAdjustPolicy.AdjustIgnored)
    native.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)


def resegment(viewer: Any, session: CorrectionSession, image_names: list[str], source: str,
              on_finished: Any) -> JobChain | None:
    """Segments the open image layers of `image_names` again with model `source`, one after
    the other (`JobChain` of `SegmentJob`), holding the session's busy state meanwhile.

    Returns:
        The started chain, or None when no image is open or another job runs.
    """
    images = [viewer.layers[name] for name in dict.fromkeys(image_names)
              if name in viewer.layers and isinstance(viewer.layers[name], Image)]
    if not images or not claim(session, Job.RESEGMENT, ", ".join(image_names)):
        return None

    def maker(image: Image) -> Any:
        return lambda on_done: SegmentJob(viewer, session, image, source, on_done=on_done)

    def finished() -> None:
        session.busy.release(Job.RESEGMENT)
        on_finished()

    return JobChain([(f"Re-segmenting '{image.name}'", maker(image)) for image in images], finished).start()


class RunControls:
    """The preset picker and its advanced values (steps, learning rate, freeze encoder).

    Args:
        presets: returns the presets, name -> TrainConfig (`napari_sgdc.config.PRESETS`).
        session: the session (its device goes into the config).
    """

    def __init__(self, presets: Callable[[], dict[str, Any]], session: CorrectionSession) -> None:
        self._presets, self._session = presets, session
        self.preset = ComboBox(name="preset", label="preset", choices=list(presets()), value="quick")
        self.advanced = CheckBox(name="advanced", text="advanced", value=False)
        self.steps = SpinBox(name="steps", label="steps", min=1, max=100_000)
        self.learning_rate = FloatSpinBox(name="learning_rate", label="learning rate", min=1e-6, max=1.0, step=1e-5)
        self.learning_rate.native.setDecimals(6)
        self.freeze_encoder = CheckBox(name="freeze_encoder", text="freeze encoder")
        self.preset.changed.connect(self.apply_preset)
        self.advanced.changed.connect(self.show_advanced)
        self.apply_preset(self.preset.value)
        self.show_advanced(False)

    def apply_preset(self, name: str) -> None:
        """Shows the preset's steps, learning rate and encoder freezing in the advanced values."""
        preset = self._presets()[name]
        self.steps.value = int(preset.max_steps or preset.steps_per_epoch or 1)
        self.learning_rate.value = float(preset.lr_decoder)
        self.freeze_encoder.value = bool(preset.freeze_encoder)

    def show_advanced(self, show: bool) -> None:
        """Shows or hides the advanced values."""
        for control in (self.steps, self.learning_rate, self.freeze_encoder):
            control.visible = bool(show)

    def train_config(self) -> Any:
        """The TrainConfig of the next run: the preset with the advanced values (`override_preset`)."""
        from napari_sgdc.train.finetune import override_preset

        return override_preset(self._presets()[self.preset.value], steps=int(self.steps.value),
                               learning_rate=float(self.learning_rate.value),
                               freeze_encoder=bool(self.freeze_encoder.value), device=self._session.settings.device)


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
        self.losses: list[float] = []
        self.history: Any = None
        self.job: FinetuneJob | None = None
        self.chain: JobChain | None = None
        self._warned, self._relay = False, Relay()  # autosave writes off the GUI thread; warnings come back
        self._relay.warned.connect(self._warn_once)
        self.training = TrainingList(on_problem=self._relay.warned.emit, background=True)
        from napari_sgdc.config import PRESETS

        self._presets = PRESETS  # name -> TrainConfig
        self._build()
        self.plot = LossPlot()
        self.native.layout().addWidget(self.plot.widget)
        self._edit_watcher = EditWatcher(self.native, self.update_edits)
        self._connect()
        self._on_image_picked(self.image_layer.value)
        self._edit_watcher.watch(self.labels_layer.value)
        self.update_edits()
        self._recovery.offer()
        self.scroll = scroll_contents(self)  # fits a 1366×768 screen

    def _build(self) -> None:
        self._image_picker = ImagePicker(self._viewer)
        self.image_layer = self._image_picker.combo
        self.labels_layer = ComboBox(
            name="labels_layer", label="corrections", choices=self._labels_choices, nullable=True,
            tooltip="The corrected ground truth: paint/erase on '<image> mask' or pick any Labels layer.")
        self.edits = Label(name="edits", label="edited", value="")
        self.edits.tooltip = ("Pixels and objects of the corrections that differ from what the model wrote; "
                              "fine-tuning crops to them and weighs them most.")
        self.training_list = Select(name="training_list", label="training list", choices=self._pair_titles)
        self.region_button = PushButton(
            name="region_button", text="Correct region",
            tooltip="On a whole slide: copy the segmented labels of the field of view (or of the selected "
                    "Shapes layer's rectangle) into an editable '<image> corrections' layer.")
        self.add_button = PushButton(name="add_button", text="Add pair")
        self.remove_button = PushButton(name="remove_button", text="Remove selected")
        self.run_controls = RunControls(lambda: self._presets, self._session)
        self.preset, self.advanced = self.run_controls.preset, self.run_controls.advanced
        self.steps, self.learning_rate = self.run_controls.steps, self.run_controls.learning_rate
        self.freeze_encoder = self.run_controls.freeze_encoder
        self.finetune_button = PushButton(name="finetune_button", text="Fine-tune")
        self.cancel_button = PushButton(name="cancel_button", text="Cancel", enabled=False)
        self.undo_button = PushButton(name="undo_button", text="Undo fine-tune")
        self.save_button = PushButton(name="save_button", text="Save model…")
        self._recovery = RecoveryRow(self._viewer, self.training, self._on_recovery)
        self.recover_row = self._recovery.row
        self.recover_button, self.discard_button = self._recovery.recover_button, self._recovery.discard_button
        self.status = Label(name="status", label="status", value="")
        for label in (self.status, self.edits):
            wrap_status(label)
        _wrap_list(self.training_list)
        self.extend([
            self.recover_row, self.image_layer, self.region_button, self.labels_layer, self.edits,
            self.training_list, button_row(self.add_button, self.remove_button), self.preset, self.advanced, self.steps,
            self.learning_rate, self.freeze_encoder, button_row(self.finetune_button, self.cancel_button),
            button_row(self.undo_button, self.save_button), self.status,
        ])

    def _connect(self) -> None:
        self.labels_layer.changed.connect(self._on_labels_picked)
        self.image_layer.changed.connect(self._on_image_picked)
        self.image_layer.changed.connect(self._show_region_button)
        self._show_region_button(self.image_layer.value)
        for button, slot in ((self.add_button, self.add_pair), (self.region_button, self.correct_region),
                             (self.remove_button, self.remove_selected), (self.finetune_button, self.start_finetune),
                             (self.cancel_button, self.cancel), (self.undo_button, self.undo),
                             (self.save_button, self.save_dialog)):
            button.changed.connect(slot)
        self._session.connect("segmented", self._on_segmented)
        self._session.connect("types_changed", self._edit_watcher.schedule)  # a type change is an edit

    @property
    def pairs(self) -> list[TrainingPair]:
        """The training list's pairs."""
        return self.training.pairs

    @property
    def axes(self) -> Any:
        """The loss plot's matplotlib axes (None without matplotlib)."""
        return self.plot.axes

    def _on_recovery(self, status: str) -> None:
        self.training_list.reset_choices()
        self.status.value = status

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            show_warning(message)
        self._warned = True

    # -- pickers and the edit count ------------------------------------------------------
    def _labels_choices(self, _widget: Any = None) -> list[Layer]:
        """Labels layers first, then the other layers (picking one gives a clear error)."""
        layers = [layer for layer in self._viewer.layers if "sgdc" not in layer.metadata
                  or isinstance(layer, Labels)]
        labels = [layer for layer in layers if isinstance(layer, Labels)]
        image = self.image_layer.value if hasattr(self, "image_layer") else None
        return labels + [layer for layer in layers if not isinstance(layer, Labels) and layer is not image]

    def _pair_titles(self, _widget: Any = None) -> list[str]:
        return self.training.titles if hasattr(self, "training") else []

    def _on_image_picked(self, image: Image | None) -> None:
        mask = mask_layer_of(self._viewer, image) if image is not None else None
        if mask is not None and self.labels_layer.value is not mask:
            self.labels_layer.reset_choices()
            self.labels_layer.value = mask

    def _on_labels_picked(self, labels: Layer | None) -> None:
        self._edit_watcher.watch(labels)
        image = image_of_result(self._viewer, labels) if labels is not None else None
        if image is not None and self.image_layer.value is not image:
            self.image_layer.value = image
        if labels is not None:
            self._edit_watcher.schedule()

    def _on_segmented(self, image: Image) -> None:
        self.reset_choices()
        if self.image_layer.value is image:
            self._on_image_picked(image)
        self._edit_watcher.schedule()

    def update_edits(self) -> str:
        """Shows how much of the picked corrections differs from what the model wrote.

        Returns:
            The text shown (empty when there is nothing to compare).
        """
        try:
            text = edits_text(self._viewer, self._session, self.image_layer.value, self.labels_layer.value)
        except Exception as exc:  # noqa: BLE001 - a count must never break painting
            text = f"not counted: {error_line(exc)}"
        self.edits.value = text
        self.edits.visible = bool(text)
        return text

    # -- autosave recovery ---------------------------------------------------------------
    def recover(self, *_: Any) -> list[TrainingPair]:
        """Adds the autosaved pairs of earlier sessions back to the training list (`RecoveryRow.recover`).

        Returns:
            The recovered pairs.
        """
        return self._recovery.recover()

    def discard(self, *_: Any) -> None:
        """Deletes the autosaved pairs of earlier sessions."""
        self._recovery.discard()

    # -- slide regions -------------------------------------------------------------------
    def _show_region_button(self, image: Any) -> None:
        self.region_button.visible = ws.slide_of(image) is not None

    def correct_region(self, *_: Any) -> Labels | None:
        """Copies the slide's segmented labels in view (or in the active Shapes layer's rectangle)
        into an editable ``<image> corrections`` layer (`region_layer`) and picks it.

        Returns:
            The new layer, or None (a notification says why).
        """
        try:
            layer = region_layer(self._viewer, self.image_layer.value)
        except InputError as exc:
            notify_error(str(exc))
            return None
        self.labels_layer.reset_choices()
        self.labels_layer.value = layer
        self._viewer.layers.selection.active = layer
        _, _, h, w = layer.metadata["sgdc"]["box"]
        self.status.value = f"region {h}×{w} px copied into '{layer.name}': correct it, then Fine-tune"
        return layer

    # -- training list -------------------------------------------------------------------
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
        self.training.put(pair)
        self.training_list.reset_choices()
        self.status.value = f"{len(self.pairs)} corrected image(s) in the list"
        return True

    def remove_selected(self, *_: Any) -> None:
        """Removes the selected entries from the training list (and from the autosave)."""
        self.training.remove(self.training_list.value)
        self.training_list.reset_choices()

    def train_config(self) -> Any:
        """The TrainConfig of the next run (`RunControls.train_config`)."""
        return self.run_controls.train_config()

    # -- fine-tune -----------------------------------------------------------------------
    def _training_pairs(self, source: str) -> list[TrainingPair]:
        """The list's pairs for model `source`, after adding the picked pair if it holds corrections."""
        try:
            self.training.put(read_pair(self._viewer, self._session, self.image_layer.value, self.labels_layer.value))
            self.training_list.reset_choices()
        except InputError:
            if not self.pairs:
                raise
        kept, note = self.training.for_model(source)
        if note:
            show_warning(note)
        return kept

    def start_finetune(self, *_: Any) -> Any:
        """Starts fine-tuning the shared model on the corrections in a thread worker.

        Returns:
            The started worker, or None when an input is wrong (a notification says why).
        """
        if not claim(self._session, Job.FINETUNE):
            return None
        try:
            state = self._session.picked_model()
            pairs = self._training_pairs(state.source)
        except InputError as exc:
            self._session.busy.release(Job.FINETUNE)
            notify_error(str(exc))
            return None
        run = state.begin_run(pairs, self.train_config(), self.preset.value)
        self.training.save(pairs)  # before training: a crash from here on loses no correction
        self.losses = []
        self.plot.show(self.losses)
        self._set_running(True)
        self.status.value = f"fine-tuning on {len(pairs)} image(s)…"
        self.job = FinetuneJob(self._session, run, on_event=self._on_train_event, on_done=self._on_finetuned)
        return self.job.worker

    def _on_train_event(self, event: dict[str, Any]) -> None:
        loss = event.get("loss")
        if loss is not None:
            self.losses.append(float(loss))
            self.plot.show(self.losses)
        self.status.value = f"step {event.get('step')}/{event.get('total_steps')}" + (
            f"  loss {loss:.4f}" if loss is not None else "")

    def cancel(self, *_: Any) -> None:
        """Stops fine-tuning (the weights are then restored) or the re-segmentation."""
        if self.job is not None:
            self.job.cancel.set()
        if self.chain is not None:
            self.chain.cancel()
        self.status.value = "cancelling…"

    def _on_finetuned(self, job: FinetuneJob, outcome: Outcome) -> None:
        self._session.busy.release(Job.FINETUNE)
        self._set_running(False)
        if job.info is None:
            self.status.value = "cancelled; model unchanged" if outcome.cancelled else "failed; model unchanged"
            return
        self.history = outcome.value
        self.losses = [float(x) for x in getattr(self.history, "losses", [])] or self.losses
        self.plot.show(self.losses)
        self.training.trained(job.run.pairs)
        first, last = job.info["loss_first"], job.info["loss_last"]
        self.status.value = (f"fine-tuned {job.info['steps']} steps in {outcome.seconds:.1f} s"
                             + (f"; loss {first:.3f} → {last:.3f}" if first is not None else ""))
        self._resegment(job.info["images"], job.run.state.source)

    def _resegment(self, image_names: list[str], source: str) -> None:
        """Segments the named images again with model `source`, one after the other."""
        self.chain = resegment(self._viewer, self._session, image_names, source,
                               on_finished=lambda: self._set_running(False))
        if self.chain is not None:
            self._set_running(True)

    # -- undo / save ---------------------------------------------------------------------
    def undo(self, *_: Any) -> bool:
        """Restores the weights from before the last fine-tune, bit for bit, and re-segments.

        Returns:
            True when a fine-tune was undone.
        """
        if not ensure_idle(self._session):
            return False
        try:
            run = self._session.undo()
        except InputError as exc:
            notify_error(str(exc))
            return False
        source = self._session.current_source
        self.training.untrained(source, run["images"])  # the undone run no longer holds these corrections
        state = self._session.current()
        self.status.value = f"undone; {len(state.runs)} fine-tune run(s) kept"
        show_info("Fine-tune undone: the previous weights are restored.")
        self._resegment(run["images"], source)
        return True

    def save_dialog(self, *_: Any) -> None:
        """Asks for a file name and saves the model."""
        from qtpy.QtWidgets import QFileDialog

        path, _ = QFileDialog.getSaveFileName(
            self.native, "Save SGDC model", "finetuned.safetensors", "SGDC checkpoints (*.safetensors)")
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
        from napari_sgdc.checkpoints import save_checkpoint

        path = str(path) if str(path).endswith(".safetensors") else f"{path}.safetensors"
        try:
            written = save_checkpoint(path, state.model, train_config=state.last_train_config,
                                      provenance=state.provenance())
        except Exception as exc:  # noqa: BLE001 - shown to the user
            notify_error(f"Could not save the model: {error_line(exc)}")
            return None
        show_info(f"Model saved to {written}")
        self.status.value = f"saved {written}"
        return written

    def _set_running(self, running: bool) -> None:
        for button in (self.finetune_button, self.undo_button, self.save_button):
            button.enabled = not running
        self.cancel_button.enabled = running
