"""Nucleus types in napari: the mask coloured by type, a legend with counts and show/hide, the
features table, and the keys that change a nucleus's type.

For a model with nucleus types (``ModelConfig.type_names``) the ``<image> mask`` layer is
coloured by each nucleus's type (a `DirectLabelColormap`; a nucleus without a type is grey),
and its features hold ``class``, ``class_confidence`` and ``area`` per label (napari shows them
on hover). The legend in the Segment dock lists the types: the active type (radio button), the
colour, the number of nuclei, and a ``show`` box (hidden types turn transparent; no data change).

| key | action |
|---|---|
| Alt-1 … Alt-9 | make type 1 … 9 the active type (as clicking its row) |
| T | the nucleus under the mouse gets the active type |
| Shift-T | the review queue's current object gets the active type |
| Ctrl-Z (mask layer selected) | undoes the latest edit: a type change, else napari's last paint or click step |

A type change is an edit of the image's `napari_sgdc.session.CorrectionSession` (the user's
type wins over the model's; the Fine-tune dock counts it and fine-tuning weighs it like a
corrected outline). Untyped models keep napari's own label colours.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import numpy as np
from magicgui.widgets import Container, PushButton
from napari.layers import Image, Labels
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QButtonGroup, QCheckBox, QGridLayout, QLabel, QRadioButton, QWidget

from napari_sgdc._napari._layers import KIND_MASK, image_of_result, mask_layer_of
from napari_sgdc.session import CorrectionSession
from napari_sgdc.session.types import TypeChange, types_per_object
from napari_sgdc.training_pairs import InputError

__all__ = ["NO_TYPE_COLOR", "TYPE_KEYS", "TypeLegend", "type_colormap", "type_features"]

NO_TYPE_COLOR = "#c8c8c8"
"""Colour of a nucleus without a type (painted on a plane that was never segmented)."""
TYPE_KEYS = {"set": "T", "queue": "Shift-T"}
REFRESH_DELAY_MS = 150
"""Colours and counts follow painting this long after the last stroke."""


def type_colormap(types: np.ndarray, colors: tuple[str, ...], hidden: set[int] = frozenset()) -> Any:
    """A napari `DirectLabelColormap`: label id -> the colour of its type (transparent for a
    hidden type and the background; `NO_TYPE_COLOR` for ids without a type or unknown yet)."""
    from napari.utils.colormaps import DirectLabelColormap

    palette = [NO_TYPE_COLOR] + ["transparent" if type_id in hidden else color
                                 for type_id, color in enumerate(colors, start=1)]
    color_dict: dict[Any, str] = {None: NO_TYPE_COLOR, 0: "transparent"}
    for label in np.flatnonzero(types):
        color_dict[int(label)] = palette[int(types[label])]
    return DirectLabelColormap(color_dict=color_dict)


def type_features(labels: np.ndarray, types: np.ndarray, confidence: np.ndarray, names: tuple[str, ...],
                  object_confidence: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The mask layer's features: one row per label id (``index``), its ``class`` name (``""``
    for the background and absent ids), ``class_confidence``, ``area`` in pixels and, when
    known, the segmentation ``confidence``."""
    size = max(len(types), int(np.asarray(labels).max(initial=0)) + 1)
    table = np.zeros(size, np.int64)
    table[:len(types)] = types
    area = np.bincount(np.asarray(labels).ravel().astype(np.int64), minlength=size)[:size]
    class_names = np.array([""] + list(names), dtype=object)[np.where(area > 0, table, 0)]
    class_confidence = np.full(size, np.nan)
    class_confidence[:len(confidence)] = confidence
    class_confidence[area == 0] = np.nan
    features = {"index": np.arange(size), "class": class_names, "class_confidence": class_confidence,
                "area": area}
    if object_confidence is not None:
        values = np.full(size, np.nan)
        values[:min(size, len(object_confidence))] = object_confidence[:size]
        values[0] = np.nan
        features["confidence"] = values
    return features


class _Row:
    """One type of the legend: active (radio), colour swatch, count, show box."""

    def __init__(self, grid: QGridLayout, group: QButtonGroup, type_id: int, name: str, color: str) -> None:
        self.radio = QRadioButton(f"{type_id} {name}" if type_id <= 9 else name)
        self.radio.setToolTip(f"Active type (Alt-{type_id}): T sets it on the nucleus under the mouse"
                              if type_id <= 9 else "Active type: T sets it on the nucleus under the mouse")
        self.swatch = QLabel()
        self.swatch.setFixedSize(14, 14)
        self.swatch.setStyleSheet(f"background-color: {color}; border: 1px solid #888;")
        self.count = QLabel("0")
        self.show = QCheckBox("show")
        self.show.setChecked(True)
        group.addButton(self.radio, type_id)
        for column, widget in enumerate((self.radio, self.swatch, self.count, self.show)):
            grid.addWidget(widget, type_id, column)


class TypeLegend:
    """The legend, the type colours of the mask layers, and the type keys.

    Args:
        viewer: the viewer.
        session: the session (its cached types and the user's changes).
        picker: the Segment dock's image ComboBox (the legend shows its image).
        status: called with a status line (the Segment dock's).
        queue: the review queue (Shift-T retypes its current object), or None.

    Attributes:
        container: the controls to put in the dock (hidden without a typed result).
        rows: the legend's rows, type 1 first.
        active: the active type id.
        hidden: the type ids shown transparent.
    """

    def __init__(self, viewer: Any, session: CorrectionSession, picker: Any, status: Callable[[str], None],
                 queue: Any = None) -> None:
        self._viewer, self._session, self._picker, self._status, self._queue = viewer, session, picker, status, queue
        self.rows: list[_Row] = []
        self.active, self.hidden = 1, set()
        self._names: tuple[str, ...] = ()
        self._colors: tuple[str, ...] = ()
        self._marks: "weakref.WeakKeyDictionary[Labels, list]" = weakref.WeakKeyDictionary()
        self._panel = QWidget()
        self._grid = QGridLayout(self._panel)
        self._grid.setContentsMargins(0, 0, 0, 0)
        self._group = QButtonGroup(self._panel)
        self._group.idClicked.connect(self.set_active)
        self.queue_button = PushButton(name="retype_queue_object", text=f"Type of queue object ({TYPE_KEYS['queue']})",
                                       tooltip="The review queue's current object gets the active type")
        self.queue_button.changed.connect(self.retype_queue_object)
        self.container = Container(name="types", labels=False, widgets=[self.queue_button], visible=False)
        self.container.native.layout().insertWidget(0, self._panel)
        self._timer = QTimer(self._panel)
        self._timer.setSingleShot(True)
        self._timer.setInterval(REFRESH_DELAY_MS)
        self._timer.timeout.connect(self.refresh)
        session.connect("segmented", self._on_segmented)
        picker.changed.connect(self.refresh)
        viewer.layers.events.inserted.connect(self._on_inserted)
        for layer in viewer.layers:
            self.attach(layer)
        self._bind_keys()

    # -- layers ---------------------------------------------------------------------------------
    def _on_inserted(self, event: Any) -> None:
        self.attach(event.value)

    def attach(self, layer: Any) -> None:
        """Follows the paint events of a ``<image> mask`` layer and binds its Ctrl-Z / Ctrl-Shift-Z."""
        if not isinstance(layer, Labels) or not layer.name.endswith(f" {KIND_MASK}") or layer in self._marks:
            return
        self._marks[layer] = []
        layer.events.paint.connect(self.schedule)
        self_ref = weakref.ref(self)

        def undo(layer: Labels) -> None:
            """Undo the latest edit: a nucleus type change (SGDC) or a paint step."""
            legend = self_ref()
            if legend is None or not legend.undo(layer):
                layer.undo()
                if legend is not None:
                    legend.schedule()

        def redo(layer: Labels) -> None:
            """Redo the last undone paint step."""
            layer.redo()
            legend = self_ref()
            if legend is not None:
                legend.schedule()

        layer.bind_key("Control-Z", undo, overwrite=True)
        layer.bind_key("Control-Shift-Z", redo, overwrite=True)

    def schedule(self, *_: Any) -> None:
        """One refresh after the strokes stop."""
        self._timer.start()

    def _on_segmented(self, image: Image, **_: Any) -> None:
        layer = mask_layer_of(self._viewer, image)
        if layer is not None:
            self.attach(layer)
            self._marks[layer] = []  # the mask was written anew: no type change left to undo
        self.refresh(image)

    # -- colours, features, legend ----------------------------------------------------------------
    def refresh(self, image: Image | None = None) -> bool:
        """Colours `image`'s mask layer (default: the picked image) by type, sets its features and
        the legend's counts; restores napari's colours for an untyped result.

        Returns:
            Whether the image has a typed result.
        """
        image = image if isinstance(image, Image) else self._picker.value
        picked = image is self._picker.value
        layer = mask_layer_of(self._viewer, image) if image is not None else None
        cache = self._session.results.get(image) if layer is not None else None
        labels = np.asarray(layer.data) if layer is not None else None
        table = self._session.object_types(image, labels) if cache is not None else None
        if table is None:
            if layer is not None and layer.metadata.pop("sgdc_types", None):
                from napari.utils.colormaps import label_colormap

                layer.colormap = label_colormap(49, 0.5, background_value=0)  # napari's own label colours
            if picked:
                self.container.visible = False
            return False
        if picked:
            self._show_types(cache.type_names, cache.type_colors)
        types, confidence = table
        layer.metadata["sgdc_types"] = True
        hidden = self.hidden if cache.type_names == self._names else set()
        layer.colormap = type_colormap(types, cache.type_colors, hidden)
        layer.features = type_features(labels, types, confidence, cache.type_names,
                                       cache.confidence(labels.reshape(cache.written_mask.shape)))
        if picked:
            counts = types_per_object(labels, types, len(self._names))
            for row, count in zip(self.rows, counts[1:]):
                row.count.setText(str(int(count)))
            self.container.visible = True
        return True

    def _show_types(self, names: tuple[str, ...], colors: tuple[str, ...]) -> None:
        """(Re)builds the legend's rows for these types."""
        if (names, colors) == (self._names, self._colors):
            return
        for row in self.rows:
            self._group.removeButton(row.radio)
            for widget in (row.radio, row.swatch, row.count, row.show):
                self._grid.removeWidget(widget)
                widget.deleteLater()
        self._names, self._colors, self.hidden = names, colors, set()
        self.rows = [_Row(self._grid, self._group, type_id, name, color)
                     for type_id, (name, color) in enumerate(zip(names, colors), start=1)]
        for type_id, row in enumerate(self.rows, start=1):
            row.show.toggled.connect(lambda shown, type_id=type_id: self.show_type(type_id, shown))
        self.set_active(min(self.active, len(names)) or 1)

    def summary(self, image: Image) -> str:
        """``"; 12 a, 3 b"`` for the Segment dock's status line ("" without types)."""
        layer = mask_layer_of(self._viewer, image)
        cache = self._session.results.get(image)
        table = self._session.object_types(image, np.asarray(layer.data)) if layer is not None else None
        if table is None or cache is None:
            return ""
        counts = types_per_object(np.asarray(layer.data), table[0], len(cache.type_names))
        return "; " + ", ".join(f"{int(count)} {name}" for name, count in zip(cache.type_names, counts[1:]))

    def set_active(self, type_id: int) -> None:
        """Makes `type_id` the active type (T and Shift-T set it)."""
        if 1 <= type_id <= len(self.rows):
            self.active = int(type_id)
            self.rows[type_id - 1].radio.setChecked(True)

    def show_type(self, type_id: int, shown: bool) -> None:
        """Shows or hides (transparent) the nuclei of `type_id`; the labels do not change."""
        (self.hidden.discard if shown else self.hidden.add)(int(type_id))
        if self.rows[type_id - 1].show.isChecked() != bool(shown):
            self.rows[type_id - 1].show.setChecked(bool(shown))
        self.refresh()

    # -- the gesture ----------------------------------------------------------------------------
    def _bind_keys(self) -> None:
        self_ref = weakref.ref(self)

        def set_under_mouse(viewer: Any) -> None:
            """SGDC types: the nucleus under the mouse gets the active type."""
            legend = self_ref()
            if legend is not None:
                legend.set_type_at()

        def retype_queue(viewer: Any) -> None:
            """SGDC types: the review queue's object gets the active type."""
            legend = self_ref()
            if legend is not None:
                legend.retype_queue_object()

        callbacks = [set_under_mouse, retype_queue]
        self._viewer.bind_key(TYPE_KEYS["set"], set_under_mouse, overwrite=True)
        self._viewer.bind_key(TYPE_KEYS["queue"], retype_queue, overwrite=True)
        for type_id in range(1, 10):
            def pick(viewer: Any, type_id: int = type_id) -> None:
                legend = self_ref()
                if legend is not None:
                    legend.set_active(type_id)
            pick.__doc__ = f"SGDC types: make type {type_id} the active type"
            self._viewer.bind_key(f"Alt-{type_id}", pick, overwrite=True)
            callbacks.append(pick)
        self._key_callbacks = callbacks

    def _mask_layer(self) -> Labels | None:
        active = self._viewer.layers.selection.active
        if isinstance(active, Labels) and active.name.endswith(f" {KIND_MASK}"):
            return active
        image = self._picker.value
        return mask_layer_of(self._viewer, image) if image is not None else None

    def set_type_at(self, position: Any = None) -> TypeChange | None:
        """T: the nucleus at `position` (world; default: under the mouse) gets the active type."""
        layer = self._mask_layer()
        if layer is None:
            return self._say("Type: segment an image first (its '<image> mask' layer holds the nuclei)")
        point = layer.world_to_data(self._viewer.cursor.position if position is None else position)
        index = tuple(int(round(v)) for v in np.asarray(point)[-layer.ndim:])
        data = np.asarray(layer.data)
        if not all(0 <= i < n for i, n in zip(index, data.shape)) or not data[index]:
            return self._say("Type: no nucleus under the mouse")
        return self.retype(layer, int(data[index]))

    def retype_queue_object(self, *_: Any) -> TypeChange | None:
        """Shift-T: the review queue's current object gets the active type."""
        current = self._queue.current_object() if self._queue is not None else None
        if current is None:
            return self._say("Type: press Review objects first")
        return self.retype(*current)

    def retype(self, layer: Labels, label: int) -> TypeChange | None:
        """Object `label` of mask `layer` gets the active type: an undoable edit (Ctrl-Z)."""
        image = image_of_result(self._viewer, layer)
        try:
            change = self._session.set_object_type(image, label, self.active, labels=np.asarray(layer.data))
        except InputError as exc:
            return self._say(str(exc))
        history = getattr(layer, "_undo_history", None)
        self._marks.setdefault(layer, []).append(history[-1] if history else None)  # napari's step before it
        self.refresh(image)
        self._say(change.text)
        return change

    def undo(self, layer: Labels) -> bool:
        """Takes back the latest type change of `layer` when no paint step came after it.

        Returns:
            Whether a type change was undone (else the caller undoes napari's step).
        """
        marks = self._marks.get(layer) or []
        history = getattr(layer, "_undo_history", None)
        top = history[-1] if history else None
        if not marks or marks[-1] is not top:
            return False
        marks.pop()
        image = image_of_result(self._viewer, layer)
        change = self._session.undo_type_change(image)
        if change is None:
            return False
        self.refresh(image)
        self._say(f"undone: {change.text}")
        return True

    def _say(self, text: str) -> None:
        self._viewer.status = text
        self._status(text)
