"""What the user changed: edited pixels, loss weights around them, and the region to train on.

Headless (arrays in, arrays out). The GUI keeps the prediction a labels layer started
from; `edit_summary` tells the user what they changed and `finetune(...,
predictions=...)` uses `edited_pixels`, `loss_weight_map` and `crop_to_edits` to learn
most from it:

* **edited pixels** — where the corrected labels differ from the prediction (as
  foreground for semantic models; as objects for instance models, so splitting,
  merging or relabelling an object counts, but renumbering does not); for models with
  nucleus types also the objects whose type differs from the type the model gave the
  object there (`retyped_pixels`): a changed type is weighted like a corrected outline;
* **weights** — edited pixels and a band of ``band`` pixels around them weigh
  ``weight`` in the loss, every other pixel 1;
* **crop** — on a large image only the edited bounding box plus a margin is used for
  training (at least one training patch in size), so correcting a corner of a whole
  slide does not train on the rest of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..data.targets import instance_ids

__all__ = [
    "EDIT_BAND",
    "EDIT_MARGIN",
    "EDIT_WEIGHT",
    "Crop",
    "EditSummary",
    "crop_to_edits",
    "edit_summary",
    "edited_pixels",
    "loss_weight_map",
    "retyped_pixels",
]

EDIT_WEIGHT = 4.0
"""Loss weight of edited pixels and of the band around them (other pixels weigh 1)."""
EDIT_BAND = 6
"""Width in pixels (at the model's working resolution) of the band around edits that gets `EDIT_WEIGHT`."""
EDIT_MARGIN = 64
"""Pixels of context kept around the edited bounding box when training on part of an image."""


@dataclass(frozen=True)
class EditSummary:
    """What a user changed in a labels array.

    Attributes:
        pixels: number of edited pixels.
        objects: objects involved: objects of the labels touching an edited pixel, plus
            objects of the prediction touching one that no counted label object
            continues (erased objects). For semantic comparisons the objects are the
            connected regions of the foreground.
        bbox: ``(top, left, bottom, right)`` of the edited pixels (bottom/right
            exclusive), or None when nothing was edited.
        shape: (H, W) of the labels.
    """

    pixels: int
    objects: int
    bbox: tuple[int, int, int, int] | None
    shape: tuple[int, int]

    @property
    def fraction(self) -> float:
        """Edited pixels as a fraction of the image."""
        return self.pixels / max(1, self.shape[0] * self.shape[1])

    def __str__(self) -> str:
        if not self.pixels:
            return "no edits"
        noun = "object" if self.objects == 1 else "objects"
        return f"{self.pixels} edited pixels ({100 * self.fraction:.1f}%) in {self.objects} {noun}"


def _check_pair(labels: np.ndarray, prediction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels, prediction = np.asarray(labels), np.asarray(prediction)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2D (H, W), got shape {labels.shape}")
    if prediction.shape != labels.shape:
        raise ValueError(f"prediction has shape {prediction.shape} but the labels have {labels.shape}")
    return labels, prediction


def _as_ids(array: np.ndarray) -> np.ndarray:
    """Non-negative int64 ids below 2**31 (bool → 0/1; negative values count as background;
    larger ids are renumbered, keeping which pixels share an object: `instance_ids`)."""
    if not (array.dtype == bool or np.issubdtype(array.dtype, np.integer)):
        array = np.rint(np.nan_to_num(array)).astype(np.int64)
    return instance_ids(array).astype(np.int64)


def _compare_as_ids(labels: np.ndarray, prediction: np.ndarray, instance: bool | None) -> bool:
    if instance is not None:
        return bool(instance)
    return labels.dtype != bool and prediction.dtype != bool


def _partners(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Overlap pairs of two id maps (from `_as_ids`) on pixels where both are foreground.

    Returns:
        (first ids, second ids, mutual) per distinct overlapping pair, where ``mutual``
        marks pairs in which each object is the other's largest overlap.
    """
    both = (first > 0) & (second > 0)
    a, b = first[both], second[both]
    if a.size == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0, bool)
    base = int(b.max()) + 1
    codes, counts = np.unique(a * base + b, return_counts=True)  # ids < 2**31 (see _as_ids): no overflow
    pair_a, pair_b = codes // base, codes % base
    mutual = np.zeros(codes.size, bool)
    mutual[np.intersect1d(_best_partner(pair_a, counts), _best_partner(pair_b, counts))] = True
    return pair_a, pair_b, mutual


def _best_partner(keys: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Index of the largest-count pair of every key (ties: the first)."""
    order = np.lexsort((-counts, keys))
    first = np.ones(order.size, bool)
    first[1:] = keys[order][1:] != keys[order][:-1]
    return order[first]


def edited_pixels(labels: np.ndarray, prediction: np.ndarray, *, instance: bool | None = None) -> np.ndarray:
    """The pixels where `labels` differ from the `prediction` they were corrected from.

    Args:
        labels: (H, W) the corrected labels (mask or instance ids, 0 = background).
        prediction: (H, W) what the model predicted (the labels before correction).
        instance: compare as instances (True), as foreground only (False), or None:
            as instances when neither array is boolean.

    As foreground, a pixel is edited when ``labels > 0`` and ``prediction > 0``
    disagree. As instances it is also edited when it lies in both foregrounds but its
    label object and prediction object are not each other's largest overlap: a split
    marks the smaller part, a merge the absorbed object, a relabelled object all of
    itself; objects that were only renumbered are not edits.

    Returns:
        (H, W) bool.
    """
    labels, prediction = _check_pair(labels, prediction)
    edited = (labels > 0) != (prediction > 0)
    if not _compare_as_ids(labels, prediction, instance):
        return edited
    ids, predicted = _as_ids(labels), _as_ids(prediction)
    first, second, mutual = _partners(ids, predicted)
    if first.size == 0:
        return edited
    both = (ids > 0) & (predicted > 0)
    # a pixel in both foregrounds is unedited when its label object's mutual partner is its prediction object
    order = np.argsort(first[mutual])
    partner_of, partner = first[mutual][order], second[mutual][order]  # one-to-one, sorted by label id
    label_ids, predicted_ids = ids[both], predicted[both]
    position = np.minimum(np.searchsorted(partner_of, label_ids), partner_of.size - 1)
    kept = (partner_of[position] == label_ids) & (partner[position] == predicted_ids)
    edited[both] = ~kept
    return edited


def _lookup(table: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``table[ids]`` with 0 for ids beyond the table."""
    table = np.asarray(table, np.int64).ravel()
    inside = ids < table.size
    return np.where(inside, table[np.where(inside, ids, 0)], 0)


def retyped_pixels(labels: np.ndarray, prediction: np.ndarray, types: np.ndarray | None,
                   predicted_types: np.ndarray | None) -> np.ndarray:
    """The pixels of objects whose type the user changed.

    Args:
        labels: (H, W) the corrected instance labels.
        prediction: (H, W) the labels the model wrote.
        types: the type table of `labels` (indexed by its ids; 0 = no type), or None.
        predicted_types: the type table of `prediction`, or None.

    Returns:
        (H, W) bool: pixels in both foregrounds whose type in `labels` is known and differs from
        their type in `prediction` (all False when a table is missing).
    """
    labels, prediction = _check_pair(labels, prediction)
    if types is None or predicted_types is None:
        return np.zeros(labels.shape, bool)
    ids, predicted = _as_ids(labels), _as_ids(prediction)
    now, before = _lookup(types, ids), _lookup(predicted_types, predicted)
    return (ids > 0) & (predicted > 0) & (now > 0) & (now != before)


def _object_ids(array: np.ndarray, as_ids: bool) -> np.ndarray:
    if as_ids:
        return _as_ids(array)
    return ndimage.label(array > 0)[0].astype(np.int64)


def _bbox(edited: np.ndarray) -> tuple[int, int, int, int] | None:
    rows = np.flatnonzero(edited.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(edited.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def edit_summary(labels: np.ndarray, prediction: np.ndarray, *, instance: bool | None = None) -> EditSummary:
    """Counts what was edited between a `prediction` and the corrected `labels`.

    Args:
        labels: (H, W) the corrected labels (mask or instance ids, 0 = background).
        prediction: (H, W) the labels before correction.
        instance: as in `edited_pixels` (pass ``model.config.is_instance``).

    Returns:
        an `EditSummary` (pixels, objects, bbox); ``str()`` gives a one-line description.

    Raises:
        ValueError: when the arrays are not 2D or differ in shape.
    """
    labels, prediction = _check_pair(labels, prediction)
    edited = edited_pixels(labels, prediction, instance=instance)
    shape = (int(labels.shape[0]), int(labels.shape[1]))
    box = _bbox(edited)
    if box is None:
        return EditSummary(0, 0, None, shape)
    as_ids = _compare_as_ids(labels, prediction, instance)
    ids, predicted = _object_ids(labels, as_ids), _object_ids(prediction, as_ids)
    touched_labels = np.unique(ids[edited & (ids > 0)])
    touched_predictions = np.unique(predicted[edited & (predicted > 0)])
    # a touched prediction object continued by a counted label object is the same object
    first, second, _ = _partners(ids, predicted)
    continued = np.unique(second[np.isin(first, touched_labels)])
    erased = np.setdiff1d(touched_predictions, continued)
    return EditSummary(int(edited.sum()), int(touched_labels.size + erased.size), box, shape)


def loss_weight_map(edited: np.ndarray, band: int = EDIT_BAND, weight: float = EDIT_WEIGHT) -> np.ndarray:
    """Per-pixel loss weights: `weight` on edited pixels and within `band` pixels of them, 1 elsewhere.

    Args:
        edited: (H, W) bool, e.g. from `edited_pixels`.
        band: band width in pixels (Euclidean distance to the nearest edited pixel; 0 = edited pixels only).
        weight: weight of the edited region (> 0).

    Returns:
        (H, W) float32.
    """
    edited = np.asarray(edited, dtype=bool)
    if edited.ndim != 2:
        raise ValueError(f"edited must be 2D (H, W), got shape {edited.shape}")
    if band < 0:
        raise ValueError(f"band must be >= 0, got {band}")
    if not weight > 0:
        raise ValueError(f"weight must be > 0, got {weight}")
    weights = np.ones(edited.shape, np.float32)
    box = _bbox(edited)
    if box is None:
        return weights
    band = int(band)
    top, left = max(0, box[0] - band), max(0, box[1] - band)
    bottom, right = min(edited.shape[0], box[2] + band), min(edited.shape[1], box[3] + band)
    window = edited[top:bottom, left:right]  # only the neighbourhood of the edits is measured
    near = ndimage.distance_transform_edt(~window) <= band if band else window
    weights[top:bottom, left:right][near] = weight
    return weights


@dataclass(frozen=True)
class Crop:
    """The part of an image used for training.

    Attributes:
        image: the image crop (H', W'[, C]).
        labels: the labels crop (H', W').
        prediction: the prediction crop (H', W').
        box: ``(top, left, bottom, right)`` in the full image (bottom/right exclusive).
    """

    image: np.ndarray
    labels: np.ndarray
    prediction: np.ndarray
    box: tuple[int, int, int, int]


def _span(start: int, stop: int, margin: int, least: int, length: int) -> tuple[int, int]:
    """[start - margin, stop + margin) grown to at least `least`, shifted to fit in [0, length)."""
    start, stop = start - margin, stop + margin
    if stop - start < least:
        grow = least - (stop - start)
        start, stop = start - grow // 2, stop + grow - grow // 2
    if start < 0:
        start, stop = 0, stop - start
    if stop > length:
        start, stop = max(0, start - (stop - length)), length
    return start, stop


def crop_to_edits(
    image: np.ndarray,
    labels: np.ndarray,
    prediction: np.ndarray,
    margin: int = EDIT_MARGIN,
    *,
    min_size: int = 256,
    instance: bool | None = None,
    also: np.ndarray | None = None,
) -> Crop:
    """The edited bounding box plus `margin`, at least `min_size` square, within the image.

    When nothing was edited the whole image is returned.

    Args:
        image: (H, W[, C]) the image.
        labels: (H, W) the corrected labels.
        prediction: (H, W) the labels before correction.
        margin: context kept on every side of the edited box.
        min_size: the crop is at least this many pixels along each axis (the training
            patch size), or the whole axis when the image is smaller.
        instance: as in `edited_pixels`.
        also: (H, W) bool, more edited pixels (e.g. `retyped_pixels`), or None.

    Returns:
        a `Crop` of views into the inputs.
    """
    labels, prediction = _check_pair(labels, prediction)
    image = np.asarray(image)
    if image.shape[:2] != labels.shape:
        raise ValueError(f"image has shape {image.shape[:2]} but the labels have {labels.shape}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    height, width = labels.shape
    edited = edited_pixels(labels, prediction, instance=instance)
    box = _bbox(edited if also is None else edited | np.asarray(also, bool))
    if box is None:
        top, left, bottom, right = 0, 0, height, width
    else:
        top, bottom = _span(box[0], box[2], int(margin), int(min_size), height)
        left, right = _span(box[1], box[3], int(margin), int(min_size), width)
    window = (slice(top, bottom), slice(left, right))
    return Crop(image[window], labels[window], prediction[window], (top, left, bottom, right))
