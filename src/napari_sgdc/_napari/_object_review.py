"""The review queue in the Segment dock: the objects most likely wrong first, and the click tools.

**Review objects** ranks the objects of the picked image's current plane
(`napari_sgdc.review.rank_objects`: uncertainty, separation contrast, size, touching) and
shows the first: the view centres on it and the ``<image> next region`` outline frames it.
Keys (viewer-wide, free in napari's defaults):

| key | action |
|---|---|
| Shift-Right / Shift-Left | next / previous object of the queue |
| Shift-K | accept (keep) it: it leaves the queue |
| Shift-X | delete it |
| Shift-D | split it at its own seeds |
| Shift-M | merge it with the neighbour it shares the longest edge with |

Every action is a click-tool edit (`ClickTools`): undoable with Ctrl-Z and counted as an
edit by the Fine-tune dock. Deleted and merged-away objects leave the queue.

For semantic models (lesions) the queue holds the mask's outline stretches, most uncertain
first (`napari_sgdc.review.rank_boundary`): next, previous and accept walk them; an outline
stroke (Ctrl-drag) fixes one.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import numpy as np
from magicgui.widgets import Container, PushButton
from napari.layers import Image

from napari_sgdc._napari._clicks import GESTURES, ClickTarget, ClickTools
from napari_sgdc._napari._layers import current_plane, mask_layer_of, show_region
from napari_sgdc._napari._review import look_at
from napari_sgdc.clicks import ClickError
from napari_sgdc.regions import Region
from napari_sgdc.review import ObjectReview
from napari_sgdc.session import CorrectionSession

__all__ = ["QUEUE_KEYS", "ObjectQueue"]

QUEUE_KEYS = {"next": "Shift-Right", "previous": "Shift-Left", "accept": "Shift-K", "delete": "Shift-X",
              "split": "Shift-D", "merge": "Shift-M"}
CONTEXT = 4.0
"""The view shows an object inside a square this many times its larger side, ..."""
MIN_VIEW = 96
"""... and at least this many pixels wide."""


def _inside_point(labels: np.ndarray, label: int, bbox: tuple[int, int, int, int]) -> tuple[int, int] | None:
    """A pixel of object `label` (the one nearest its box's centre), or None if it is gone."""
    top, left, bottom, right = bbox
    rows, cols = np.nonzero(labels[top:bottom, left:right] == label)
    if not rows.size:
        return None
    nearest = np.argmin((rows - (bottom - top) / 2) ** 2 + (cols - (right - left) / 2) ** 2)
    return int(rows[nearest]) + top, int(cols[nearest]) + left


def _neighbour(labels: np.ndarray, label: int, bbox: tuple[int, int, int, int]) -> tuple[int, int] | None:
    """A pixel of the object sharing the longest edge with `label` (4-neighbours), or None."""
    from scipy import ndimage

    top, left, bottom, right = bbox
    window = (slice(max(0, top - 1), bottom + 1), slice(max(0, left - 1), right + 1))
    plane = labels[window]
    ring = ndimage.binary_dilation(plane == label) & (plane != label) & (plane != 0)
    if not ring.any():
        return None
    other = int(np.bincount(plane[ring]).argmax())
    rows, cols = np.nonzero(ring & (plane == other))
    return int(rows[0]) + window[0].start, int(cols[0]) + window[1].start


class ObjectQueue:
    """The Review objects button, the queue's status line and buttons, and its keys.

    Args:
        viewer: the viewer.
        session: the session.
        image: returns the picked image layer.
        status: called with a status line (the Segment dock's).

    Attributes:
        container: the controls to put in the dock.
        tools: the `ClickTools` the gestures and the queue's actions use.
    """

    def __init__(self, viewer: Any, session: CorrectionSession, image: Callable[[], Image | None],
                 status: Callable[[str], None]) -> None:
        self._viewer, self._image = viewer, image
        self.tools = ClickTools(viewer, session, status)
        self._status = status
        self.queue: list = []
        self.position = -1
        self._lead: tuple[int, ...] = ()
        self._layer_ref: Callable[[], Any] = lambda: None
        self.review_button = PushButton(name="review_objects", text="Review objects",
                                        tooltip="Rank this plane's objects, most likely wrong first. " + GESTURES)
        buttons = {name: PushButton(name=f"queue_{name}", text=name.capitalize(), tooltip=f"{name} ({key})")
                   for name, key in QUEUE_KEYS.items()}
        self.buttons = buttons
        self.container = Container(name="object_review", layout="vertical", labels=False, widgets=[
            self.review_button,
            Container(layout="horizontal", labels=False, widgets=[buttons["previous"], buttons["next"],
                                                                   buttons["accept"]]),
            Container(layout="horizontal", labels=False, widgets=[buttons["delete"], buttons["split"],
                                                                   buttons["merge"]]),
        ])
        self.review_button.changed.connect(self.build)
        for name, button in buttons.items():
            button.changed.connect(getattr(self, name))
        self._bind_keys()

    def _bind_keys(self) -> None:
        self_ref = weakref.ref(self)
        self._key_callbacks = []
        for name, key in QUEUE_KEYS.items():
            def callback(viewer: Any, name: str = name) -> None:
                queue = self_ref()
                if queue is not None:
                    getattr(queue, name)()
            callback.__doc__ = f"SGDC review queue: {name}"
            self._viewer.bind_key(key, callback, overwrite=True)
            self._key_callbacks.append(callback)

    # -- the queue ------------------------------------------------------------------------------
    def build(self, *_: Any) -> int:
        """Ranks the objects of the picked image's current plane and shows the first.

        Returns:
            The number of objects queued (0: the status says why).
        """
        from napari_sgdc.review import rank_boundary, rank_objects

        target = self._target()
        if target is None:
            return 0
        if target.instances:
            self.queue = rank_objects(target.labels, target.maps.separation, target.uncertainty)
        elif target.uncertainty is None:
            self._say("Review objects: lesions are reviewed by their uncertain outline: segment with "
                      "'uncertainty layer' ticked")
            return 0
        else:
            self.queue = rank_boundary(target.labels, target.uncertainty)
        self.position = -1
        if not self.queue:
            self._say("Review objects: nothing to review on this plane")
            return 0
        self.next()
        return len(self.queue)

    def _target(self) -> ClickTarget | None:
        image = self._image()
        layer = mask_layer_of(self._viewer, image) if image is not None else None
        if layer is None:
            self._say("Review objects: segment an image first (its '<image> mask' layer is reviewed)")
            return None
        plane = current_plane(layer, self._viewer.dims.point)
        lead = tuple(int(i) for i in np.unravel_index(plane, layer.data.shape[:-2])) if layer.ndim > 2 else ()
        try:
            target = self.tools.target(layer, lead)
        except ClickError as exc:
            self._say(str(exc))
            return None
        self._lead, self._layer_ref = lead, weakref.ref(layer)
        return target

    def _current_target(self, moving: bool = False) -> ClickTarget | None:
        """The queue's plane; None (the status says why) without a queue or, unless `moving`, a current object."""
        layer = self._layer_ref()
        current = moving or 0 <= self.position < len(self.queue)
        if layer is None or layer not in self._viewer.layers or not self.queue or not current:
            self._say("Review objects: press Review objects first")
            return None
        try:
            return self.tools.target(layer, self._lead)
        except ClickError as exc:
            self._say(str(exc))
            return None

    def _say(self, text: str) -> None:
        self._status(text)

    def current_object(self) -> tuple[Any, int] | None:
        """The mask layer and label id of the object the queue shows, or None (no queue, an outline)."""
        layer = self._layer_ref()
        if layer is None or layer not in self._viewer.layers or not 0 <= self.position < len(self.queue):
            return None
        item = self.queue[self.position]
        return (layer, int(item.label)) if isinstance(item, ObjectReview) else None

    def _show(self, step: int) -> Any:
        """Moves `step` places (skipping objects that are gone) and centres the view on the object."""
        target = self._current_target(moving=True)
        if target is None:
            return None
        for _ in range(len(self.queue)):
            self.position = (self.position + step) % len(self.queue)
            item = self.queue[self.position]
            gone = isinstance(item, ObjectReview) and _inside_point(target.labels, item.label, item.bbox) is None
            if not gone:
                break
            del self.queue[self.position]
            self.position -= 1 if step > 0 else 0
            if not self.queue:
                self._say("Review objects: the queue is empty")
                return None
        item = self.queue[self.position]
        top, left, bottom, right = item.bbox
        half = max(CONTEXT * max(bottom - top, right - left), MIN_VIEW) / 2
        row, col = (top + bottom) / 2, (left + right) / 2
        view = Region(int(row - half), int(col - half), int(row + half), int(col + half), item.score)
        image = self._image()
        if image is not None:
            show_region(self._viewer, image, self._lead, item.bbox)
            look_at(self._viewer, image, self._lead, view)
        what = f"object {item.label}" if isinstance(item, ObjectReview) else "outline"
        self._say(f"{what}: {self.position + 1}/{len(self.queue)}, score {item.score:.2f} ({item.reason()})")
        return item

    def next(self, *_: Any) -> Any:
        """Shows the next object (from the first after Review objects; wraps around)."""
        return self._show(1)

    def previous(self, *_: Any) -> Any:
        """Shows the previous object."""
        return self._show(-1)

    def accept(self, *_: Any) -> Any:
        """The current object is right: it leaves the queue; shows the next."""
        if self._current_target() is None:
            return None
        del self.queue[self.position]
        self.position -= 1
        return self.next() if self.queue else self._say("Review objects: every object was reviewed")

    def delete(self, *_: Any) -> Any:
        """Deletes the current object (undo: Ctrl-Z) and shows the next."""
        return self._act(lambda target, point, item: self.tools.add_or_delete(target, point), leaves=True)

    def split(self, *_: Any) -> Any:
        """Splits the current object at its own seeds; the view stays on it."""
        return self._act(lambda target, point, item: self.tools.split(target, [point]), leaves=False)

    def merge(self, *_: Any) -> Any:
        """Merges the current object with the neighbour it shares the longest edge with."""
        def merge(target: ClickTarget, point: tuple[int, int], item: Any) -> Any:
            other = _neighbour(target.labels, item.label, item.bbox)
            if other is None:
                self._say(f"Merge: object {item.label} touches no other object")
                return None
            return self.tools.merge(target, point, other)

        return self._act(merge, leaves=False)

    def _act(self, action: Callable[[ClickTarget, tuple[int, int], Any], Any], *, leaves: bool) -> Any:
        target = self._current_target()
        if target is None:
            return None
        item = self.queue[self.position]
        if not isinstance(item, ObjectReview):
            self._say("Review objects: on a lesion's outline, fix it with an outline stroke (Ctrl-drag), then accept")
            return None
        point = _inside_point(target.labels, item.label, item.bbox)
        if point is None:
            return self.next()
        edit = action(target, point, item)
        if edit is not None and leaves:
            del self.queue[self.position]
            self.position -= 1
            if self.queue:
                self.next()
        return edit
