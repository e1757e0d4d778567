"""Click tools on the ``<image> mask`` layer: mouse gestures that call `napari_sgdc.clicks`.

With the mask layer selected in pan/zoom mode (napari's **Z**):

| gesture | instance models (nuclei) | semantic models (lesions) |
|---|---|---|
| Ctrl-click (Cmd-click on macOS) on background | add the object the model sees there | add the region the model sees there |
| Ctrl-click on an object | delete it | remove the clicked region |
| Ctrl-drag from an object's edge, out or in, back to its edge | fix its outline (`reshape_object`) | fix the region's outline |
| Shift-click on an object | split it at its own seeds | — |
| Shift-drag across an object | split it along the stroke | — |
| Ctrl-Shift-drag from one object to another (or Ctrl-Shift-click one, then the other) | merge them | — |

Alt is left alone (napari's Alt-drag zoom box, Alt-scroll through layers), and so are plain
clicks and drags (pan), and every mode other than pan/zoom (painting stays painting). Each
edit is written with ``Labels.data_setitem``: one step of napari's undo (Ctrl-Z), a paint
event the Fine-tune dock counts as edited pixels and objects exactly as painting, and its
one-line description in the viewer's status bar and the Segment dock's status.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
from napari.layers import Labels

from napari_sgdc._napari._layers import KIND_MASK, image_of_result
from napari_sgdc.clicks import ClickError, Edit, PlaneMaps
from napari_sgdc.session import CorrectionSession

__all__ = ["GESTURES", "ClickTarget", "ClickTools", "write_edit"]

GESTURES = (
    "Ctrl-click: add (background) or delete (object); Ctrl-drag from an edge and back: fix the outline; "
    "Shift-click: split; Shift-drag across: split along it; Ctrl-Shift-drag from one object to another: merge "
    "(mask layer in pan/zoom mode)"
)
DRAG_PIXELS = 2.0
"""A press and release farther apart than this many data pixels is a drag (a stroke), else a click."""


@dataclass
class ClickTarget:
    """Where a click tool acts: one plane of a mask layer and the model's maps of it.

    Attributes:
        layer: the ``<image> mask`` Labels layer.
        lead: the plane's index on the layer's plane axes (``()`` for a 2-D image).
        labels: the plane of ``layer.data`` (a view: edits go through `write_edit`).
        maps: the model's maps of the plane.
        instances: an instance model's labels (else a semantic mask).
        uncertainty: the plane's uncertainty, or None.
    """

    layer: Labels
    lead: tuple[int, ...]
    labels: np.ndarray
    maps: PlaneMaps
    instances: bool
    uncertainty: np.ndarray | None = None

    def new_id(self) -> int:
        """An id no plane of the layer uses yet."""
        return int(np.asarray(self.layer.data).max()) + 1


def write_edit(layer: Labels, lead: tuple[int, ...], edit: Edit) -> None:
    """Writes `edit` into plane `lead` of `layer` as one undoable step (``data_setitem``)."""
    if not edit.pixels:
        return
    index = tuple(np.full(edit.pixels, value, np.intp) for value in lead) + tuple(edit.index)
    layer.data_setitem(index, np.asarray(edit.new, dtype=np.asarray(layer.data).dtype))


class ClickTools:
    """Attaches the gestures to every ``<image> mask`` layer of the viewer, now and later.

    Args:
        viewer: the viewer.
        session: the session (its cached maps per image, its post-processing options).
        status: called with each edit's one-line description (and each refusal's reason).
    """

    def __init__(self, viewer: Any, session: CorrectionSession, status: Callable[[str], None]) -> None:
        self._viewer, self._session, self._status = viewer, session, status
        self._pending_merge: tuple[Labels, tuple[int, ...], tuple[float, float]] | None = None
        self_ref = weakref.ref(self)

        def on_mouse(layer: Labels, event: Any) -> Any:
            tools = self_ref()
            if tools is None:
                return None
            return tools.gesture(layer, event)

        self._callback = on_mouse
        viewer.layers.events.inserted.connect(self._on_inserted)
        for layer in viewer.layers:
            self.attach(layer)

    def _on_inserted(self, event: Any) -> None:
        self.attach(event.value)

    def attach(self, layer: Any) -> None:
        """Adds the gestures to `layer` if it is a ``<image> mask`` Labels layer."""
        if (isinstance(layer, Labels) and layer.name.endswith(f" {KIND_MASK}")
                and self._callback not in layer.mouse_drag_callbacks):
            layer.mouse_drag_callbacks.append(self._callback)

    # -- where a click acts ---------------------------------------------------------------------
    def target(self, layer: Labels, lead: tuple[int, ...]) -> ClickTarget:
        """The plane `lead` of `layer` with its image's cached maps.

        Raises:
            ClickError: the layer's image is closed or that plane was not segmented.
        """
        image = image_of_result(self._viewer, layer)
        cache = self._session.results.get(image) if image is not None else None
        if cache is None:
            raise ClickError(f"'{layer.name}': segment its image first (the click tools use the model's maps)")
        flat = int(np.ravel_multi_index(lead, cache.lead_shape)) if cache.lead_shape else 0
        data = layer.data
        if tuple(np.shape(data)) != (*cache.lead_shape, *cache.probability.shape[1:]) or not cache.segmented[flat]:
            raise ClickError(f"'{layer.name}': this plane was not segmented with the current result; segment again")
        separation = cache.separation if cache.separation is not None else cache.boundary
        maps = PlaneMaps(cache.probability[flat], separation[flat] if cache.instances else None,
                         self._session.options)
        uncertainty = cache.uncertainty[flat] if cache.has_uncertainty(flat) else None
        return ClickTarget(layer, lead, data[lead] if lead else data, maps, cache.instances, uncertainty)

    def apply(self, target: ClickTarget, make: Callable[[], Edit]) -> Edit | None:
        """Runs a tool, writes its edit and reports it; a refusal is reported, nothing written."""
        try:
            edit = make()
        except ClickError as exc:
            self.report(str(exc))
            return None
        write_edit(target.layer, target.lead, edit)
        self.report(edit.text)
        return edit

    def report(self, text: str) -> None:
        self._viewer.status = text
        self._status(text)

    # -- the tools, by data coordinates --------------------------------------------------------
    def add_or_delete(self, target: ClickTarget, point: Sequence[float]) -> Edit | None:
        """Ctrl-click: on background add what the model sees, on an object (region) delete it."""
        from napari_sgdc import clicks

        row, col = (int(round(v)) for v in point)
        inside = 0 <= row < target.labels.shape[0] and 0 <= col < target.labels.shape[1]
        on_object = inside and bool(target.labels[row, col])
        if target.instances:
            if on_object:
                return self.apply(target, lambda: clicks.delete_object(target.labels, point))
            return self.apply(target, lambda: clicks.add_object(target.labels, target.maps, point,
                                                                new_id=target.new_id()))
        if on_object:
            return self.apply(target, lambda: clicks.remove_region(target.labels, point))
        return self.apply(target, lambda: clicks.add_region(target.labels, target.maps, point))

    def outline(self, target: ClickTarget, stroke: Sequence[Sequence[float]]) -> Edit | None:
        """Ctrl-drag: the stroke replaces a stretch of the object's (region's) outline."""
        from napari_sgdc import clicks

        return self.apply(target, lambda: clicks.reshape_object(target.labels, stroke))

    def split(self, target: ClickTarget, points: Sequence[Sequence[float]] = (), *,
              stroke: Sequence[Sequence[float]] | None = None) -> Edit | None:
        """Shift-click (one point: the object's own seeds; two or more: markers) or Shift-drag (a stroke)."""
        from napari_sgdc import clicks

        if not target.instances:
            self.report("Split: only for instance (nuclei) models")
            return None
        return self.apply(target, lambda: clicks.split_object(target.labels, target.maps, points, stroke=stroke,
                                                              new_id=target.new_id()))

    def merge(self, target: ClickTarget, first: Sequence[float], second: Sequence[float]) -> Edit | None:
        """Ctrl-Shift-drag from one object to another."""
        from napari_sgdc import clicks

        if not target.instances:
            self.report("Merge: only for instance (nuclei) models")
            return None
        return self.apply(target, lambda: clicks.merge_objects(target.labels, first, second))

    # -- the mouse -----------------------------------------------------------------------------
    def gesture(self, layer: Labels, event: Any) -> Any:
        """The mouse-drag callback: a generator for the gestures of the module docstring."""
        modifiers = {str(getattr(key, "name", key)) for key in event.modifiers}
        wanted = modifiers & {"Control", "Shift"}
        if layer.mode != "pan_zoom" or not wanted or "Alt" in modifiers or getattr(event, "button", 1) != 1:
            return None
        return self._drag(layer, event, frozenset(wanted))

    def _drag(self, layer: Labels, event: Any, modifiers: frozenset) -> Any:
        data = np.asarray(layer.world_to_data(event.position), dtype=float)
        lead = tuple(int(round(v)) for v in data[:-2])
        path = [data[-2:]]
        yield
        while event.type == "mouse_move":
            path.append(np.asarray(layer.world_to_data(event.position), dtype=float)[-2:])
            yield
        event.handled = True
        self.act(layer, lead, modifiers, path)

    def act(self, layer: Labels, lead: tuple[int, ...], modifiers: frozenset, path: Sequence[Sequence[float]]) -> Any:
        """Carries out a finished gesture: `path` is the pointer's track in data pixels (press first).

        Returns:
            The `Edit` written, or None.
        """
        try:
            target = self.target(layer, lead)
        except ClickError as exc:
            self.report(str(exc))
            return None
        path = [tuple(float(v) for v in point) for point in path]
        dragged = float(np.linalg.norm(np.subtract(path[-1], path[0]))) > DRAG_PIXELS if len(path) > 1 else False
        if modifiers == {"Control"}:
            return self.outline(target, path) if dragged else self.add_or_delete(target, path[0])
        if modifiers == {"Shift"}:
            return self.split(target, stroke=path) if dragged else self.split(target, [path[0]])
        if dragged:
            self._pending_merge = None
            return self.merge(target, path[0], path[-1])
        pending, self._pending_merge = self._pending_merge, (layer, lead, path[0])
        if pending is not None and pending[0] is layer and pending[1] == lead:
            self._pending_merge = None
            return self.merge(target, pending[2], path[0])
        self.report("Merge: now Ctrl-Shift-click the object to merge it with")
        return None
