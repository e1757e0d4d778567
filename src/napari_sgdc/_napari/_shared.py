"""What both dock widgets share: the image-layer picker, the "SGDC is busy" guard, the
status line and button rows."""

from __future__ import annotations

from typing import Any

from magicgui.widgets import ComboBox, Container, Label
from napari.layers import Image

from napari_sgdc._napari._layers import image_of_result, is_source_image, source_images
from napari_sgdc._napari._runner import notify_error
from napari_sgdc.session import CorrectionSession, Job


class ImagePicker:
    """An "image" ComboBox of the images the user opened, that follows the user.

    The picker switches to an image layer when it is opened (inserted) and when it, or
    one of its result layers, becomes the active layer, so Segment (and Shift-S)
    acts on the image on screen. napari holds the connected methods weakly: the
    connections end with the widget.

    Attributes:
        combo: the magicgui ComboBox to put in the widget.
    """

    def __init__(self, viewer: Any, name: str = "image_layer", label: str = "image", **kwargs: Any) -> None:
        self._viewer = viewer
        self.combo = ComboBox(name=name, label=label, choices=self._choices, **kwargs)
        viewer.layers.events.inserted.connect(self._on_inserted)
        viewer.layers.selection.events.active.connect(self._on_active)

    def _choices(self, _widget: Any = None) -> list[Image]:
        return source_images(self._viewer)

    def pick(self, image: Image) -> None:
        """Shows `image` in the picker (refreshing the choices if it is new)."""
        if self.combo.value is image:
            return
        if image not in self.combo.choices:
            self.combo.reset_choices()
        self.combo.value = image

    def _on_inserted(self, event: Any) -> None:
        if is_source_image(event.value):
            self.pick(event.value)

    def _on_active(self, event: Any) -> None:
        layer = event.value
        if layer is None or layer not in self._viewer.layers:
            return
        image = layer if is_source_image(layer) else image_of_result(self._viewer, layer)
        if image is not None:
            self.pick(image)


def _refuse(session: CorrectionSession) -> bool:
    notify_error(f"SGDC is busy ({session.busy}); wait or press Cancel.")
    return False


def claim(session: CorrectionSession, job: Job, detail: str = "") -> bool:
    """Takes the session's model for `job`; when another job runs, says so and returns False."""
    return session.busy.acquire(job, detail) or _refuse(session)


def ensure_idle(session: CorrectionSession) -> bool:
    """True when no job runs; otherwise says which one does and returns False."""
    return session.busy.idle or _refuse(session)


def wrap_status(status: Label) -> None:
    """Lets a status line wrap over the dock's full width: long text must not widen the
    dock (which would shrink the canvas and cut the image off)."""
    from qtpy.QtWidgets import QSizePolicy

    status.native.setWordWrap(True)
    status.native.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)


def button_row(*widgets: Any, name: str = "") -> Container:
    """Widgets side by side in one dock row (no label, no margins)."""
    row = Container(name=name or None, layout="horizontal", labels=False, label=" ", widgets=list(widgets))
    row.margins = (0, 0, 0, 0)
    return row


def scroll_contents(container: Container) -> Any:
    """Moves a dock's controls into a vertical scroll area (returned), so the dock fits a small
    screen (1366×768): napari docks ``container.native``, which then holds only the scroll area.
    magicgui keeps adding to the same layout, now inside the scroll area."""
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QFrame, QScrollArea, QVBoxLayout, QWidget

    outer = container.native
    inner = QWidget()
    inner.setLayout(outer.layout())  # Qt moves the layout and its widgets to `inner`
    scroll = QScrollArea()
    scroll.setObjectName("sgdc_scroll")
    scroll.setWidgetResizable(True)
    scroll.setFrameShape(QFrame.Shape.NoFrame)
    scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    scroll.setWidget(inner)
    scroll.setMinimumWidth(inner.minimumSizeHint().width() + scroll.verticalScrollBar().sizeHint().width())
    layout = QVBoxLayout(outer)
    layout.setContentsMargins(0, 0, 0, 0)
    layout.addWidget(scroll)
    return scroll
