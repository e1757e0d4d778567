"""The review queue: an instance plane's objects ranked by how likely they are wrong (headless).

Four signs of a wrong object, each computed per object of one labels plane:

* **uncertainty** ``u``: the mean per-pixel uncertainty over the object
  (1 − `napari_sgdc.postprocess.object_confidence`);
* **low separation contrast** ``−c`` with ``c`` = the mean separation on the object's edge
  pixels − the highest separation strictly inside it: a ridge inside as high as the edge
  says two merged nuclei, a weak edge says one nucleus cut in two;
* **size** ``s = |ln(area / median area)|``: far from the plane's median object;
* **touching** ``t``: the share of the object's edge pixels that touch another object.

Each sign is turned into its rank fraction among the plane's objects, ``r ∈ [0, 1]`` (0 = the
least suspicious, ties share their mean rank), and

    score = 0.4 · r(u) + 0.2 · r(−c) + 0.2 · r(s) + 0.2 · r(t)

(`REVIEW_WEIGHTS`; a sign whose map is missing, uncertainty or separation, is left out and
the other weights are scaled to sum to 1). Ranks make the four signs comparable whatever
the model's uncertainty scale. The queue is the objects by descending score.

Semantic models (lesions) have no objects to rank: `rank_boundary` cuts the mask's outline
into stretches of `STRETCH_PX` pixels and ranks them by their mean uncertainty (the map's
maximum within 2 px of each outline point, since the uncertain band can sit just inside or
outside the drawn edge). An outline stroke (`napari_sgdc.clicks.reshape_object`) fixes one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["REVIEW_WEIGHTS", "STRETCH_PX", "BoundaryStretch", "ObjectReview", "object_signs", "rank_boundary",
           "rank_objects"]

REVIEW_WEIGHTS = {"uncertainty": 0.4, "contrast": 0.2, "size": 0.2, "touching": 0.2}
"""Weights of the four signs' rank fractions in the review score (module docstring)."""
STRETCH_PX = 32
"""Length in pixels of the outline stretches `rank_boundary` ranks."""


@dataclass(frozen=True)
class ObjectReview:
    """One object of the queue.

    Attributes:
        label: its id.
        score: the review score in [0, 1] (higher: check first).
        area: pixels.
        center: (row, column) of its centroid.
        bbox: (top, left, bottom, right), end-exclusive.
        signs: the raw signs by name (``uncertainty``, ``contrast``, ``size``, ``touching``; those computed).
    """

    label: int
    score: float
    area: int
    center: tuple[float, float]
    bbox: tuple[int, int, int, int]
    signs: dict

    def reason(self) -> str:
        """One line for the status bar, e.g. ``"uncertainty 0.31, contrast -0.10, 2.1× median size"``."""
        parts = []
        if "uncertainty" in self.signs:
            parts.append(f"uncertainty {self.signs['uncertainty']:.2f}")
        if "contrast" in self.signs:
            parts.append(f"contrast {self.signs['contrast']:+.2f}")
        parts.append(f"{np.exp(self.signs['size_log']):.1f}× median size")
        if self.signs["touching"] > 0:
            parts.append(f"{100 * self.signs['touching']:.0f}% of edge touching")
        return ", ".join(parts)


def _edges(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(edge, touching): object pixels with a 4-neighbour of another value, and of another object."""
    padded = np.pad(labels, 1, mode="edge")
    edge = np.zeros(labels.shape, bool)
    touching = np.zeros(labels.shape, bool)
    centre = padded[1:-1, 1:-1]
    for dr, dc in ((0, 1), (2, 1), (1, 0), (1, 2)):
        neighbour = padded[dr:dr + labels.shape[0], dc:dc + labels.shape[1]]
        differs = neighbour != centre
        edge |= differs
        touching |= differs & (neighbour != 0)
    inside = labels != 0
    return edge & inside, touching & inside


def object_signs(labels: np.ndarray, separation: np.ndarray | None = None,
                 uncertainty: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The raw signs of every id 0..K of a (H, W) labels plane (module docstring).

    Returns:
        Arrays of length K + 1 by name: ``area``, ``size_log`` (ln(area / median), signed),
        ``touching``, and ``contrast`` / ``uncertainty`` when their map is given.
    """
    from scipy import ndimage

    from napari_sgdc.postprocess import object_confidence

    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"review: expected a 2-D labels plane, got shape {labels.shape}")
    flat = labels.ravel()
    size = int(labels.max()) + 1 if labels.size else 1
    area = np.bincount(flat, minlength=size).astype(np.float64)
    present = area > 0
    present[0] = False
    median = float(np.median(area[present])) if present.any() else 1.0
    edge, touching = _edges(labels)
    edge_count = np.bincount(flat[edge.ravel()], minlength=size)
    signs = {"area": area, "size_log": np.log(np.maximum(area, 1) / max(median, 1.0)),
             "touching": np.bincount(flat[touching.ravel()], minlength=size) / np.maximum(edge_count, 1)}
    if separation is not None:
        separation = np.nan_to_num(np.asarray(separation, np.float32), nan=1.0)
        edge_mean = np.bincount(flat[edge.ravel()], weights=separation.ravel()[edge.ravel()],
                                minlength=size) / np.maximum(edge_count, 1)
        interior = np.where(edge, 0, labels)
        inner_max = np.asarray(ndimage.maximum(separation, interior, np.arange(size)), np.float64)
        inner_max = np.where(np.bincount(interior.ravel(), minlength=size) > 0, inner_max, edge_mean)
        signs["contrast"] = edge_mean - inner_max
    if uncertainty is not None:
        signs["uncertainty"] = 1.0 - object_confidence(labels, uncertainty).astype(np.float64)
    return signs


def _rank_fraction(values: np.ndarray) -> np.ndarray:
    """Rank of each value among `values` scaled to [0, 1] (ties share their mean rank)."""
    from scipy.stats import rankdata

    if len(values) < 2:
        return np.zeros(len(values))
    return (rankdata(values) - 1.0) / (len(values) - 1.0)


def rank_objects(labels: np.ndarray, separation: np.ndarray | None = None, uncertainty: np.ndarray | None = None,
                 *, weights: dict | None = None) -> list[ObjectReview]:
    """The review queue of a (H, W) instance labels plane: objects by descending review score.

    Args:
        labels: int instance labels (0 = background).
        separation: the plane's separation map (`napari_sgdc.postprocess.separation_map`), or None.
        uncertainty: the plane's per-pixel uncertainty in [0, 1], or None.
        weights: the signs' weights (default `REVIEW_WEIGHTS`).

    Returns:
        One `ObjectReview` per object, most suspicious first (ties: lower id first).
    """
    from scipy import ndimage

    signs = object_signs(labels, separation, uncertainty)
    ids = np.flatnonzero(signs["area"])
    ids = ids[ids > 0]
    if not len(ids):
        return []
    suspicion = {"uncertainty": lambda s: s, "contrast": lambda s: -s, "size": None, "touching": lambda s: s}
    weights = dict(REVIEW_WEIGHTS if weights is None else weights)
    score = np.zeros(len(ids))
    total = 0.0
    for name, weight in weights.items():
        if name == "size":
            values = np.abs(signs["size_log"][ids])
        elif name in signs:
            values = suspicion[name](signs[name][ids])
        else:
            continue
        score += weight * _rank_fraction(values)
        total += weight
    score /= max(total, 1e-12)
    boxes = ndimage.find_objects(labels)
    rows, cols = np.indices(labels.shape, sparse=True)
    flat = labels.ravel()
    count = np.maximum(signs["area"], 1)
    row_mean = np.bincount(flat, weights=np.broadcast_to(rows, labels.shape).ravel(), minlength=len(count)) / count
    col_mean = np.bincount(flat, weights=np.broadcast_to(cols, labels.shape).ravel(), minlength=len(count)) / count
    queue = []
    for index in np.argsort(-score, kind="stable"):
        label = int(ids[index])
        box = boxes[label - 1]
        queue.append(ObjectReview(
            label=label, score=float(score[index]), area=int(signs["area"][label]),
            center=(float(row_mean[label]), float(col_mean[label])),
            bbox=(box[0].start, box[1].start, box[0].stop, box[1].stop),
            signs={name: float(values[label]) for name, values in signs.items() if name != "area"}))
    return queue


@dataclass(frozen=True)
class BoundaryStretch:
    """One stretch of a semantic mask's outline.

    Attributes:
        score: its mean uncertainty.
        points: (N, 2) float (row, column) outline points, in order.
        center: (row, column) of its middle point.
        bbox: (top, left, bottom, right), end-exclusive.
    """

    score: float
    points: np.ndarray
    center: tuple[float, float]
    bbox: tuple[int, int, int, int]

    def reason(self) -> str:
        """One line for the status bar."""
        return f"outline stretch of {len(self.points)} px, uncertainty {self.score:.2f}"


def rank_boundary(mask: np.ndarray, uncertainty: np.ndarray, *, stretch: int = STRETCH_PX) -> list[BoundaryStretch]:
    """The outline of a (H, W) semantic mask cut into `stretch`-pixel stretches, most uncertain first.

    Raises:
        ValueError: maps that are not 2-D or differ in shape, or a stretch under 4 px.
    """
    from scipy import ndimage
    from skimage.measure import find_contours

    mask = np.asarray(mask) > 0
    uncertainty = np.nan_to_num(np.asarray(uncertainty, np.float32))
    if mask.ndim != 2 or uncertainty.shape != mask.shape:
        raise ValueError(f"review: expected 2-D mask and uncertainty of one shape, got {mask.shape}, "
                         f"{uncertainty.shape}")
    if stretch < 4:
        raise ValueError(f"review: a stretch must be at least 4 px, got {stretch}")
    near = ndimage.maximum_filter(uncertainty, size=5)
    stretches = []
    for contour in find_contours(np.pad(mask, 1).astype(np.float32), 0.5):
        contour = np.clip(contour - 1, 0, np.array(mask.shape) - 1)
        for start in range(0, len(contour), stretch):
            points = contour[start:start + stretch + 1]
            if len(points) < 2:
                continue
            rows, cols = np.round(points).astype(int).T
            low, high = points.min(axis=0), points.max(axis=0)
            stretches.append(BoundaryStretch(
                score=float(near[rows, cols].mean()), points=points,
                center=tuple(float(v) for v in points[len(points) // 2]),
                bbox=(int(low[0]), int(low[1]), int(high[0]) + 1, int(high[1]) + 1)))
    return sorted(stretches, key=lambda item: -item.score)
