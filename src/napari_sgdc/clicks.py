"""Click tools: correct a labels plane with one click (or a short stroke) using the model's own maps (headless).

Every tool takes the labels plane the user corrects (the ``<image> mask`` layer's current
plane), the model's maps of that plane (`PlaneMaps`: probability, separation, options) and
where the user clicked, and returns an `Edit`: the changed pixels with their old and new
values and a one-line description. Nothing is written: ``edit.apply(labels)`` writes it, and
the napari bindings (`napari_sgdc._napari._clicks`) hand the same pixels to
``Labels.data_setitem``, so napari's undo takes the edit back in one step and the Fine-tune
dock counts it as edited pixels and objects exactly as painting.

Instance models:

* `add_object`: decode a missed object at the click. The probability is thresholded at
  ``min(threshold, ½ × the local peak)`` (the peak within `PEAK_RADIUS` px of the click,
  never below `ADD_FLOOR`), restricted to free pixels within a search radius (`search_radius`:
  `SEARCH_FACTOR` × the median object radius); the seeds of that region
  (`napari_sgdc.postprocess.seed_markers`) plus a marker at the click are flooded on the
  separation map (`napari_sgdc.postprocess.marker_watershed`) and the click's basin, holes
  filled, is the new object. No pixel is painted by hand.
* `split_object`: re-run the marker watershed inside one object only, from two or more
  clicked markers, or from the pieces a short stroke across the object cuts it into; with
  one click, from the object's own seeds at the highest split level that gives two of them
  (else the two farthest peaks of its distance transform).
* `merge_objects`: the second object takes the first one's id; background gaps of up to
  `MERGE_GAP` px between them are filled.
* `delete_object`: the object under the click becomes background.

Semantic models (lesions): `add_region` adds the connected region of the probability
thresholded as for `add_object` at the click; `remove_region` removes the clicked
8-connected region of the mask.

Fix outline (`reshape_object`, nuclei and lesions alike): an *outline stroke*, not a drag of
the boundary and not a paint stroke that snaps to the probability. The user draws the new
boundary stretch from the object's edge, out or in, back to its edge: what the stroke and the
object enclose is added, what the stroke cuts off (every piece but the largest) is removed,
and the stroke's pixels join the object. Pixels of other objects are never taken. A stroke
is one gesture whatever the shape (a drag of the boundary needs handles and moves only
one stretch's vertices), and it needs no map: where the model's probability is wrong, which
is where the user corrects, a stroke snapping to it would snap to the wrong edge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from napari_sgdc.postprocess import PostprocessOptions, marker_watershed, seed_markers

__all__ = [
    "ADD_FLOOR",
    "ClickError",
    "Edit",
    "PlaneMaps",
    "add_object",
    "add_region",
    "delete_object",
    "merge_objects",
    "remove_region",
    "reshape_object",
    "search_radius",
    "split_object",
]

ADD_FLOOR = 0.05
"""The lowest probability threshold `add_object` and `add_region` decode at."""
PEAK_RADIUS = 3
"""Pixels around a click searched for the probability peak (and for a foreground pixel near the click)."""
SEARCH_FACTOR = 2.5
"""An added object stays within this many median object radii of the click."""
DEFAULT_RADIUS = 12.0
"""The object radius assumed when the plane has no objects yet."""
MERGE_GAP = 2
"""`merge_objects` joins objects at most this many pixels apart, filling the gap."""
OUTLINE_REACH = 3
"""An outline stroke starts and ends within this many pixels of the object it reshapes."""

_CROSS = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool)
_SQUARE = np.ones((3, 3), bool)


class ClickError(ValueError):
    """A click the tool cannot act on; the message is one line for the status bar."""


@dataclass(frozen=True)
class PlaneMaps:
    """The model's maps of one plane.

    Attributes:
        probability: (H, W) float foreground probability.
        separation: (H, W) float separation map (`napari_sgdc.postprocess.separation_map`), or None
            for semantic models.
        options: the post-processing options the mask was made with (threshold, split level, min size).
    """

    probability: np.ndarray
    separation: np.ndarray | None = None
    options: PostprocessOptions = PostprocessOptions()


@dataclass(frozen=True)
class Edit:
    """The pixels a click tool changes.

    Attributes:
        index: (rows, columns) of the changed pixels.
        old: their values before.
        new: their values after.
        text: one line for the status bar (``"added object 12 (140 px)"``).
    """

    index: tuple[np.ndarray, np.ndarray]
    old: np.ndarray
    new: np.ndarray
    text: str

    @property
    def pixels(self) -> int:
        """Number of changed pixels."""
        return int(self.old.size)

    def apply(self, labels: np.ndarray) -> np.ndarray:
        """Writes the edit into `labels` (in place) and returns it."""
        labels[self.index] = self.new
        return labels

    def revert(self, labels: np.ndarray) -> np.ndarray:
        """Takes the edit back (in place) and returns `labels`."""
        labels[self.index] = self.old
        return labels


def _diff(labels: np.ndarray, window: tuple[slice, slice], new: np.ndarray, text: str) -> Edit:
    """The edit that turns ``labels[window]`` into `new`."""
    old = labels[window]
    rows, cols = np.nonzero(old != new)
    return Edit((rows + window[0].start, cols + window[1].start), old[rows, cols].copy(), new[rows, cols].copy(), text)


def _point(labels: np.ndarray, point: Sequence[float], tool: str) -> tuple[int, int]:
    """(row, column) of a click as integers; a ClickError outside the plane."""
    if labels.ndim != 2:
        raise ValueError(f"{tool}: expected a 2-D labels plane, got shape {labels.shape}")
    row, col = (int(round(float(value))) for value in point[-2:])
    if not (0 <= row < labels.shape[0] and 0 <= col < labels.shape[1]):
        raise ClickError(f"{tool}: ({row}, {col}) is outside the image")
    return row, col


def _window(shape: tuple[int, ...], top: int, left: int, bottom: int, right: int, pad: int) -> tuple[slice, slice]:
    return (slice(max(0, top - pad), min(shape[0], bottom + pad)),
            slice(max(0, left - pad), min(shape[1], right + pad)))


def _object_window(labels: np.ndarray, label: int, pad: int = 1) -> tuple[slice, slice]:
    """The bounding box of object `label`, `pad` px wider (clipped to the plane)."""
    rows, cols = np.nonzero(labels == label)
    return _window(labels.shape, int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1, pad)


def _label_at(labels: np.ndarray, point: Sequence[float], tool: str) -> tuple[int, tuple[int, int]]:
    row, col = _point(labels, point, tool)
    label = int(labels[row, col])
    if label == 0:
        raise ClickError(f"{tool}: no object at ({row}, {col}); click inside one")
    return label, (row, col)


def _next_id(labels: np.ndarray, new_id: int | None) -> int:
    return int(labels.max()) + 1 if new_id is None else int(new_id)


def search_radius(labels: np.ndarray) -> float:
    """How far from a click an added object may reach: `SEARCH_FACTOR` × the median equivalent
    radius of the plane's objects (`DEFAULT_RADIUS` when there are none), in pixels."""
    areas = np.bincount(labels.ravel())[1:] if labels.size else np.zeros(0)
    areas = areas[areas > 0]
    radius = float(np.sqrt(np.median(areas) / np.pi)) if areas.size else DEFAULT_RADIUS
    return SEARCH_FACTOR * max(radius, 2.0)


def _decode(labels: np.ndarray, maps: PlaneMaps, row: int, col: int, tool: str,
            radius: float) -> tuple[tuple[slice, slice], np.ndarray, tuple[int, int], float]:
    """The free pixels near a click whose probability passes the click's lower threshold.

    Returns:
        ``(window, region, (r, c), threshold)``: the window, the region in it (bool), the seed
        pixel (the click, or the nearest region pixel within `PEAK_RADIUS`) in window
        coordinates, and the threshold used.
    """
    from scipy import ndimage

    probability = np.asarray(maps.probability)
    if probability.shape != labels.shape:
        raise ValueError(f"{tool}: probability {probability.shape} and labels {labels.shape} differ")
    reach = int(np.ceil(radius))
    window = _window(labels.shape, row, col, row + 1, col + 1, reach)
    prob = np.nan_to_num(probability[window].astype(np.float32))
    r, c = row - window[0].start, col - window[1].start
    rr, cc = np.ogrid[:prob.shape[0], :prob.shape[1]]
    near = (rr - r) ** 2 + (cc - c) ** 2
    peak = float(prob[near <= PEAK_RADIUS ** 2].max())
    threshold = max(ADD_FLOOR, min(maps.options.threshold, 0.5 * peak))
    region = (prob > threshold) & (labels[window] == 0) & (near <= radius ** 2)
    if not region[r, c]:
        candidates = region & (near <= PEAK_RADIUS ** 2)
        if not candidates.any():
            raise ClickError(f"{tool}: the model sees nothing at ({row}, {col}) (probability {prob[r, c]:.2f}); "
                             "paint it instead")
        flat = np.flatnonzero(candidates)
        r, c = np.unravel_index(flat[np.argmin(near.ravel()[flat])], region.shape)
    pieces, _ = ndimage.label(region, structure=_SQUARE)
    return window, pieces == pieces[r, c], (int(r), int(c)), threshold


def _fill(labels: np.ndarray, window: tuple[slice, slice], region: np.ndarray, value: int, text: str) -> Edit:
    """The edit writing `value` into `region` (holes filled) where ``labels[window]`` is background;
    `text` names the pixel count ``{pixels}``."""
    from scipy import ndimage

    region = ndimage.binary_fill_holes(region) & (labels[window] == 0)
    new = np.where(region, value, labels[window])
    return _diff(labels, window, new, text.format(pixels=int(region.sum())))


def add_object(labels: np.ndarray, maps: PlaneMaps, point: Sequence[float], *, new_id: int | None = None,
               radius: float | None = None) -> Edit:
    """Decodes a missed object at a click (module docstring).

    Args:
        labels: (H, W) int instance labels (0 = background); not changed.
        maps: the plane's maps; without a separation map the region at the click is added whole.
        point: the click, (row, column) in pixels (trailing two values used).
        new_id: the new object's id (default: the plane's largest + 1; the GUI passes the
            layer's, so ids stay unique across planes).
        radius: the search radius in pixels (default `search_radius(labels)`).

    Raises:
        ClickError: the click is on an object, outside the plane, or where the model sees nothing.
    """
    row, col = _point(labels, point, "Add")
    if labels[row, col]:
        raise ClickError(f"Add: object {int(labels[row, col])} is already at ({row}, {col})")
    radius = search_radius(labels) if radius is None else float(radius)
    window, region, (r, c), threshold = _decode(labels, maps, row, col, "Add", radius)
    if maps.separation is not None:
        separation = np.nan_to_num(np.asarray(maps.separation, np.float32)[window], nan=1.0)
        markers, count = seed_markers(region, separation, maps.options.split_level)
        marker = int(markers[r, c])
        if marker == 0:
            marker = count + 1
            markers[r, c] = marker
        region = marker_watershed(region, separation, markers) == marker
    label = _next_id(labels, new_id)
    return _fill(labels, window, region, label, f"added object {label} ({{pixels}} px, threshold {threshold:.2f})")


def delete_object(labels: np.ndarray, point: Sequence[float]) -> Edit:
    """The object under the click becomes background.

    Raises:
        ClickError: no object at the click.
    """
    label, _ = _label_at(labels, point, "Delete")
    window = _object_window(labels, label, 0)
    new = np.where(labels[window] == label, 0, labels[window])
    edit = _diff(labels, window, new, "")
    return Edit(edit.index, edit.old, edit.new, f"deleted object {label} ({edit.pixels} px)")


def merge_objects(labels: np.ndarray, first: Sequence[float], second: Sequence[float]) -> Edit:
    """The object at `second` joins the object at `first` (keeping the first's id); background
    gaps of up to `MERGE_GAP` px between them are filled.

    Raises:
        ClickError: a click off any object, both clicks on one object, or objects farther apart.
    """
    from scipy import ndimage

    keep, _ = _label_at(labels, first, "Merge")
    other, _ = _label_at(labels, second, "Merge")
    if keep == other:
        raise ClickError(f"Merge: both clicks are on object {keep}; click a second, touching object")
    rows, cols = np.nonzero((labels == keep) | (labels == other))
    window = _window(labels.shape, int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1,
                     MERGE_GAP + 1)
    plane = labels[window]
    near = ndimage.binary_dilation(plane == keep, _SQUARE, iterations=MERGE_GAP)
    if not (near & (plane == other)).any():
        raise ClickError(f"Merge: objects {keep} and {other} are more than {MERGE_GAP} px apart")
    union = (plane == keep) | (plane == other)
    fill = ndimage.binary_closing(union, _SQUARE, iterations=MERGE_GAP) & (plane == 0)
    for alone in (plane == keep, plane == other):  # not each object's own notches: only the gap between
        fill &= ~ndimage.binary_closing(alone, _SQUARE, iterations=MERGE_GAP)
    new = np.where(union | fill, keep, plane)
    return _diff(labels, window, new, f"merged object {other} into {keep}")


def _stroke_pixels(stroke: Sequence[Sequence[float]], shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The pixels of a polyline (clipped to the plane)."""
    from skimage.draw import line

    points = np.round(np.asarray(stroke, float)[:, -2:]).astype(int)
    rows, cols = [points[:1, 0]], [points[:1, 1]]
    for (r0, c0), (r1, c1) in zip(points[:-1], points[1:]):
        rr, cc = line(r0, c0, r1, c1)
        rows.append(rr)
        cols.append(cc)
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    inside = (rows >= 0) & (rows < shape[0]) & (cols >= 0) & (cols < shape[1])
    return rows[inside], cols[inside]


def _stroke_markers(obj: np.ndarray, cut: np.ndarray, min_piece: int) -> np.ndarray:
    """Markers: the pieces of `obj` a thickened stroke `cut` leaves, of at least `min_piece` px."""
    from scipy import ndimage

    pieces, count = ndimage.label(obj & ~ndimage.binary_dilation(cut, _SQUARE), structure=_CROSS)
    sizes = np.bincount(pieces.ravel(), minlength=count + 1)
    big = np.flatnonzero(sizes >= min_piece)
    big = big[big > 0]
    return np.where(np.isin(pieces, big), np.searchsorted(big, pieces) + 1, 0).astype(np.int32)


def _auto_markers(obj: np.ndarray, separation: np.ndarray | None, level: float, min_piece: int) -> np.ndarray:
    """Two or more seeds inside one object: the object's seeds at the highest level (from the split
    level down) that gives two, else the two farthest peaks of its distance transform."""
    from scipy import ndimage

    if separation is not None and obj.any():
        values = separation[obj]
        for cut in np.linspace(min(level, float(values.max())), float(values.min()), 16):
            seeds, _ = seed_markers(obj, separation, float(cut))
            sizes = np.bincount(seeds.ravel())
            big = np.flatnonzero(sizes >= min_piece)
            big = big[big > 0]
            if len(big) >= 2:
                return np.where(np.isin(seeds, big), np.searchsorted(big, seeds) + 1, 0).astype(np.int32)
    from skimage.feature import peak_local_max

    distance = ndimage.distance_transform_edt(np.pad(obj, 1))[1:-1, 1:-1]
    peaks = peak_local_max(distance, min_distance=2, labels=obj.astype(np.int32), exclude_border=False)
    markers = np.zeros(obj.shape, np.int32)
    if len(peaks) >= 2:
        gaps = np.linalg.norm(peaks[:, None] - peaks[None], axis=-1)
        i, j = np.unravel_index(np.argmax(gaps), gaps.shape)
        markers[tuple(peaks[i])], markers[tuple(peaks[j])] = 1, 2
    return markers


def split_object(labels: np.ndarray, maps: PlaneMaps | None, points: Sequence[Sequence[float]] = (), *,
                 stroke: Sequence[Sequence[float]] | None = None, new_id: int | None = None) -> Edit:
    """Re-runs the marker watershed inside one object only (module docstring).

    Args:
        labels: (H, W) int instance labels; not changed.
        maps: the plane's maps (the separation map is the watershed's relief; None: flat).
        points: clicks inside the object: two or more are the markers; one asks for the
            object's own seeds. The object is the one under the first click.
        stroke: instead, a polyline (rows, columns) drawn across the object; the pieces it cuts
            the object into are the markers. The object is the one the stroke crosses most.
        new_id: the first id of the new pieces (default: the plane's largest + 1).

    Returns:
        The edit; the largest piece keeps the object's id.

    Raises:
        ClickError: no object, clicks in different objects, or nothing to split along.
    """
    if stroke is not None and len(stroke) >= 2:
        rows, cols = _stroke_pixels(stroke, labels.shape)
        hit = labels[rows, cols]
        if not hit.any():
            raise ClickError("Split: the stroke crosses no object")
        label = int(np.bincount(hit[hit > 0]).argmax())
    elif len(points):
        label, _ = _label_at(labels, points[0], "Split")
        for point in points[1:]:
            other, where = _label_at(labels, point, "Split")
            if other != label:
                raise ClickError(f"Split: {where} is in object {other}, not in object {label}")
    else:
        raise ClickError("Split: click inside the object, or draw a stroke across it")
    window = _object_window(labels, label)
    obj = labels[window] == label
    separation = None
    if maps is not None and maps.separation is not None:
        separation = np.nan_to_num(np.asarray(maps.separation, np.float32)[window], nan=1.0)
    min_size = maps.options.min_size if maps is not None else 0
    min_piece = max(2, int(obj.sum()) // 8, min_size // 2)  # a stroke's pieces and an automatic split's
    if stroke is not None and len(stroke) >= 2:
        cut = np.zeros(obj.shape, bool)
        rows, cols = rows - window[0].start, cols - window[1].start
        inside = (rows >= 0) & (rows < obj.shape[0]) & (cols >= 0) & (cols < obj.shape[1])
        cut[rows[inside], cols[inside]] = True
        markers = _stroke_markers(obj, cut, min_piece)
    elif len(points) >= 2:
        markers = np.zeros(obj.shape, np.int32)
        for index, point in enumerate(points, start=1):
            row, col = _point(labels, point, "Split")
            markers[row - window[0].start, col - window[1].start] = index
    else:
        level = maps.options.split_level if maps is not None else 0.5
        markers = _auto_markers(obj, separation, level, max(2, int(obj.sum()) // 25, min_size // 4))
    if markers.max() < 2:
        raise ClickError(f"Split: found no two parts in object {label}; click two points or draw a stroke across it")
    relief = separation if separation is not None else np.zeros(obj.shape, np.float32)
    pieces = marker_watershed(obj, relief, markers)
    sizes = np.bincount(pieces.ravel())
    sizes[0] = 0
    if len(points) == 1 and stroke is None and sizes[sizes > 0].min() < min_piece:
        raise ClickError(f"Split: object {label} has no two parts of {min_piece} px or more; click two points "
                         "or draw a stroke across it")
    order = np.argsort(-sizes[1:]) + 1  # largest piece first: it keeps the id
    first = _next_id(labels, new_id)
    ids = np.zeros(len(sizes), np.int64)
    ids[order[0]] = label
    ids[order[1:]] = first + np.arange(len(order) - 1)
    new = np.where(obj, ids[pieces], labels[window])
    count = int((sizes > 0).sum())
    return _diff(labels, window, new, f"split object {label} into {count}")


def add_region(mask: np.ndarray, maps: PlaneMaps, point: Sequence[float], *, value: int = 1) -> Edit:
    """Semantic models: adds the connected region of the probability at the click, thresholded at
    ``min(threshold, ½ × the local peak)`` (never below `ADD_FLOOR`), holes filled.

    Raises:
        ClickError: the click is already in the mask, or the model sees nothing there.
    """
    row, col = _point(mask, point, "Add region")
    if mask[row, col]:
        raise ClickError(f"Add region: ({row}, {col}) is already in the mask")
    radius = float(max(mask.shape))
    window, region, _, threshold = _decode(mask, maps, row, col, "Add region", radius)
    return _fill(mask, window, region, value, f"added a region of {{pixels}} px (threshold {threshold:.2f})")


def remove_region(mask: np.ndarray, point: Sequence[float]) -> Edit:
    """Semantic models: the clicked 8-connected region of the mask becomes background.

    Raises:
        ClickError: the click is on background.
    """
    from scipy import ndimage

    row, col = _point(mask, point, "Remove region")
    if not mask[row, col]:
        raise ClickError(f"Remove region: ({row}, {col}) is background; click inside a region")
    regions, _ = ndimage.label(mask > 0, structure=_SQUARE)
    rows, cols = np.nonzero(regions == regions[row, col])
    return Edit((rows, cols), mask[rows, cols].copy(), np.zeros(rows.size, mask.dtype),
                f"removed a region of {rows.size} px")


def _stroke_object(labels: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> int:
    """The object an outline stroke reshapes: the one under its start, else its end, else the
    one it crosses most."""
    for index in (0, -1):
        if labels[rows[index], cols[index]]:
            return int(labels[rows[index], cols[index]])
    hit = labels[rows, cols]
    if not hit.any():
        raise ClickError("Outline: start or end the stroke on the object to reshape")
    return int(np.bincount(hit[hit > 0]).argmax())


def reshape_object(labels: np.ndarray, stroke: Sequence[Sequence[float]]) -> Edit:
    """Fix outline: an outline stroke from the object's edge, out or in, back to its edge
    replaces that stretch of its boundary (module docstring). Works on instance labels and on
    semantic masks (the region keeps its value).

    Raises:
        ClickError: a stroke of fewer than two points, or one that touches no object.
    """
    from scipy import ndimage

    if stroke is None or len(stroke) < 2:
        raise ClickError("Outline: draw a stroke from the object's edge and back")
    rows, cols = _stroke_pixels(stroke, labels.shape)
    if not rows.size:
        raise ClickError("Outline: the stroke is outside the image")
    label = _stroke_object(labels, rows, cols)
    obj_rows, obj_cols = np.nonzero(labels == label)
    top, left = min(obj_rows.min(), rows.min()), min(obj_cols.min(), cols.min())
    bottom, right = max(obj_rows.max(), rows.max()) + 1, max(obj_cols.max(), cols.max()) + 1
    window = _window(labels.shape, int(top), int(left), int(bottom), int(right), 2)
    plane = labels[window]
    free = (plane == 0) | (plane == label)
    line = np.zeros(plane.shape, bool)
    line[rows - window[0].start, cols - window[1].start] = True
    near = ndimage.binary_dilation(plane == label, _SQUARE, iterations=OUTLINE_REACH)
    for row, col in ((rows[0], cols[0]), (rows[-1], cols[-1])):
        if not near[row - window[0].start, col - window[1].start]:
            raise ClickError(f"Outline: start and end the stroke on the edge of object {label}")
    line = ndimage.binary_dilation(line, _CROSS) & free  # a 4-connected barrier
    grown = ndimage.binary_fill_holes((plane == label) | line) & free
    pieces, count = ndimage.label(grown & ~line, structure=_CROSS)
    if count == 0:
        raise ClickError(f"Outline: the stroke would leave nothing of object {label}")
    sizes = np.bincount(pieces.ravel())
    sizes[0] = 0
    kept = pieces == int(sizes.argmax())
    new_obj = kept | (line & ndimage.binary_dilation(kept, _SQUARE))
    new = np.where(new_obj, label, np.where(plane == label, 0, plane))
    added, removed = int((new_obj & (plane != label)).sum()), int((~new_obj & (plane == label)).sum())
    return _diff(labels, window, new, f"reshaped object {label} (+{added} px, -{removed} px)")
