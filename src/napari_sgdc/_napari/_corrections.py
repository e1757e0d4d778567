"""What the Fine-tune dock does with corrections: layers in, training pairs and edit counts out.

`read_pair` reads an image layer and its corrections into a `TrainingPair` through the
viewer's `napari_sgdc.session.CorrectionSession` (which owns the label conversion);
`edits_text` is the session's edit count for the picked layers; `EditWatcher` recounts
shortly after the user paints; `region_layer` copies a slide region into an editable
``<image> corrections`` layer; `RecoveryRow` offers the autosaved pairs of earlier sessions.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
from magicgui.widgets import PushButton
from napari.layers import Image, Labels, Layer, Shapes
from napari.utils.notifications import show_info
from qtpy.QtCore import QTimer

import napari_sgdc._napari._wholeslide as ws
from napari_sgdc._napari._layers import image_planes, layer_mpp, mask_layer_of, spatial_shape_of, transform_kwargs
from napari_sgdc._napari._runner import notify_error
from napari_sgdc._napari._shared import button_row
from napari_sgdc.session import CorrectionSession, TrainingList, error_line
from napari_sgdc.training_pairs import InputError, TrainingPair

EDITS_DELAY_MS = 150
"""The edited-region count is recomputed this long after the last paint event (strokes coalesce)."""


def _check_layers(image: Any, labels: Any) -> None:
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


def read_pair(viewer: Any, session: CorrectionSession, image: Any, labels: Any) -> TrainingPair:
    """Reads an image layer and its corrections layer into a `TrainingPair`
    (`CorrectionSession.image_pair`, or `region_pair` for a slide region).

    Raises:
        InputError: wrong layer types, no model, or what `collect_pair` rejects.
    """
    _check_layers(image, labels)
    if ws.slide_of(image) is None:
        return session.image_pair(
            image, image_planes(image, "all").planes, np.asarray(labels.data), image_shape=spatial_shape_of(image),
            image_name=image.name, labels_name=labels.name, image_mpp=layer_mpp(image),
            own_mask=mask_layer_of(viewer, image) is labels,
        )
    if not ws.is_correction_layer(labels):
        raise InputError(f"'{image.name}' is a whole slide: segment a region, press 'Correct region' and paint on "
                         f"'{image.name} corrections' (pick it as the corrections).")
    meta = labels.metadata["sgdc"]
    y0, x0, h, w = meta["box"]
    try:
        crop = ws.read_crop(labels)
    except Exception as exc:  # noqa: BLE001 - e.g. the store or the slide was moved
        raise InputError(f"Cannot read the region of '{image.name}': {error_line(exc)}") from exc
    return session.region_pair(crop, np.asarray(labels.data), meta["written"], labels_name=labels.name,
                               image_name=f"{image.name} [y {y0}, x {x0}, {h}×{w}]",
                               model_source=meta.get("model_source"))


def edits_text(viewer: Any, session: CorrectionSession, image: Any, labels: Any) -> str:
    """One line on what the user changed in `labels`, the picked corrections of `image`."""
    if not isinstance(labels, Labels) or not isinstance(image, Image):
        return ""
    data = np.asarray(labels.data)
    if ws.is_correction_layer(labels):
        return session.region_edits(data, np.asarray(labels.metadata["sgdc"]["written"])).text("region")
    if image not in session.results or mask_layer_of(viewer, image) is not labels:
        return f"'{labels.name}': not the model's mask, so the whole image is used"
    count = session.mask_edits(image, data)
    return "" if count is None else count.text("mask")



def add_recovered_layers(viewer: Any, pair: TrainingPair) -> None:
    """A recovered one-plane pair as a Labels layer ``<labels> (recovered)`` on its image (the
    image is added too when no layer has its name); existing layers are never changed."""
    if len(pair.labels) != 1:
        return  # planes of a stack: the training list holds them
    labels, image_data = pair.labels[0], pair.images[0]
    image = viewer.layers[pair.image_name] if pair.image_name in viewer.layers else None
    if image is None:
        rgb = image_data.ndim == 3 and image_data.shape[-1] in (3, 4)
        image = viewer.add_image(np.array(image_data), name=pair.image_name, rgb=rgb)
    if not isinstance(image, Image) or tuple(spatial_shape_of(image)) != labels.shape:
        return
    name, number = f"{pair.labels_name} (recovered)", 2
    while name in viewer.layers:
        name, number = f"{pair.labels_name} (recovered {number})", number + 1
    viewer.add_labels(np.array(labels), name=name, **transform_kwargs(image))


def region_layer(viewer: Any, image: Any) -> Labels:
    """Copies a slide's segmented labels in the field of view (or in the rectangle of the
    active Shapes layer) into an editable ``<image> corrections`` layer (at most
    `_wholeslide.MAX_CROP` working pixels on a side).

    Raises:
        InputError: not a slide, not segmented, not in view, or the store cannot be read.
    """
    if ws.slide_of(image) is None:
        raise InputError("Correct region works on a whole slide opened with napari-sgdc's reader.")
    nuclei = ws.store_layer_of(viewer, image, "nuclei")
    if nuclei is None:
        raise InputError(f"Segment '{image.name}' first (SGDC Segment: field of view, rectangle or whole slide).")
    active = viewer.layers.selection.active
    roi = (ws.shape_roi(active, image) if isinstance(active, Shapes) and len(active.data)
           else ws.visible_roi(viewer, image))
    if roi is None:
        raise InputError(f"'{image.name}' is not in view: pan to the region to correct.")
    try:
        return ws.add_correction_layer(viewer, image, nuclei, ws.crop_box(nuclei, roi))
    except Exception as exc:  # noqa: BLE001 - shown to the user
        raise InputError(f"Cannot copy the region: {error_line(exc)}") from exc



class EditWatcher:
    """Recounts the edits of the picked corrections layer shortly after the user paints.

    Args:
        parent: the dock's native widget (owns the timer).
        update: called to recount.
    """

    def __init__(self, parent: Any, update: Any) -> None:
        self._watched: Labels | None = None
        self._timer = QTimer(parent)
        self._timer.setSingleShot(True)
        self._timer.setInterval(EDITS_DELAY_MS)
        self._timer.timeout.connect(update)

    def watch(self, labels: Layer | None) -> None:
        """Follows the paint and data events of `labels` only."""
        if labels is self._watched:
            return
        for layer, method in ((self._watched, "disconnect"), (labels, "connect")):
            if isinstance(layer, Labels):
                for event in (layer.events.paint, layer.events.data):
                    getattr(event, method)(self.schedule)
        self._watched = labels if isinstance(labels, Labels) else None

    def schedule(self, *_: Any, **__: Any) -> None:
        """One count after the strokes stop (also called by the session's ``types_changed``)."""
        self._timer.start()




class RecoveryRow:
    """The "Recover N autosaved corrections | Discard" row: shown when earlier sessions left pairs.

    Args:
        viewer: the viewer (recovered one-plane pairs come back as layers: `add_recovered_layers`).
        training: the dock's training list.
        on_change: called with a status line after a recovery or a discard.

    Attributes:
        row: the row to put in the dock.
    """

    def __init__(self, viewer: Any, training: TrainingList, on_change: Callable[[str], None]) -> None:
        self._viewer, self._training, self._on_change = viewer, training, on_change
        self.recover_button = PushButton(name="recover_button", text="Recover autosaved corrections")
        self.discard_button = PushButton(name="discard_button", text="Discard")
        self.row = button_row(self.recover_button, self.discard_button, name="recover_row")
        self.recover_button.changed.connect(self.recover)
        self.discard_button.changed.connect(self.discard)

    def offer(self) -> None:
        """Shows the row (and a notification) when autosaved pairs of earlier sessions wait."""
        pending = self._training.pending()
        self.row.visible = bool(pending)
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

        Returns:
            The recovered pairs.
        """
        pairs, problems = self._training.recover()
        for problem in problems:
            notify_error(f"Could not recover an autosaved correction: {problem}")
        for pair in pairs:
            add_recovered_layers(self._viewer, pair)
        self.row.visible = False
        self._on_change(f"recovered {len(pairs)} corrected image(s) into the training list")
        return pairs

    def discard(self, *_: Any) -> None:
        """Deletes the autosaved pairs of earlier sessions."""
        self._training.discard()
        self.row.visible = False
        self._on_change("autosaved corrections discarded")
