"""Boundary (edge) targets derived from semantic masks or instance maps."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.segmentation import find_boundaries

__all__ = ["annotated_weight", "boundary_target", "distance_target", "hover_target", "instance_ids",
           "instance_map_target"]


def instance_ids(labels: np.ndarray) -> np.ndarray:
    """Instance ids as int32 at any size: the one conversion of user labels into ids to train on.

    Ids below 2**31 are kept; larger ones (uint32, uint64 or int64 ids up to 2**64 - 1) are
    renumbered by rank, so every object keeps its own id (2**32 + 7 and 7 stay apart) and
    none turns negative. Negative values count as background (0); a bool mask gives 0/1.
    """
    labels = np.asarray(labels)
    if labels.dtype == bool:
        return labels.astype(np.int32)
    if np.issubdtype(labels.dtype, np.signedinteger) and labels.size and labels.min() < 0:
        labels = np.where(labels < 0, 0, labels)
    if not labels.size or int(labels.max()) < 2**31:
        return labels.astype(np.int32)
    values, inverse = np.unique(labels, return_inverse=True)
    ids = inverse.reshape(labels.shape) + int(values[0] != 0)  # 0 stays background
    return ids.astype(np.int32 if int(ids.max()) < 2**31 else np.int64)


def boundary_target(mask: np.ndarray, width: int = 3, instance: bool = False) -> np.ndarray:
    """Boundary band of a mask, optionally including the lines between touching instances.

    The band is ``width`` pixels wide: ``ceil(width / 2)`` pixels inside the objects and
    ``floor(width / 2)`` outside them (``width=1``: the inner rim only). The image border
    is not a boundary.

    For ``instance=True`` every object's own rim counts, including where it touches
    another object (both sides of the contact line are marked, so a touching pair is
    separated by at least ``2 * ceil(width / 2)`` boundary pixels). For ``instance=False``
    only the foreground/background contour counts (``mask > 0``).

    Args:
        mask: (H, W) bool mask or integer instance map (0 = background).
        width: band width in pixels (>= 1).
        instance: treat distinct positive ids as distinct objects.

    Returns:
        bool (H, W) boundary target.

    Raises:
        ValueError: if `mask` is not 2D or `width` < 1.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2D (H, W), got shape {mask.shape}")
    if width < 1:
        raise ValueError(f"boundary width must be >= 1, got {width}")
    foreground = mask > 0
    if not foreground.any():
        return np.zeros(mask.shape, dtype=bool)
    inner_width = (width + 1) // 2
    outer_width = width // 2
    if instance and mask.dtype != bool:
        labels = mask
    else:
        labels = foreground.astype(np.uint8)
    # Rim: object pixels next to a pixel of a different id (background or another object).
    rim = find_boundaries(labels, connectivity=1, mode="inner", background=0) & foreground
    if not rim.any():
        inner = rim
    elif inner_width > 1:
        distance_to_rim = ndimage.distance_transform_edt(~rim)  # (H, W) pixels
        inner = foreground & (distance_to_rim <= inner_width - 1)
    else:
        inner = rim
    if outer_width > 0 and not foreground.all():
        distance_to_object = ndimage.distance_transform_edt(~foreground)  # (H, W) pixels
        outer = ~foreground & (distance_to_object <= outer_width)
        return inner | outer
    return inner


def _objects(labels: np.ndarray):
    """Yields (id, bounding-box slices, bool crop of the object) for each positive id."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"instance map must be 2D (H, W), got shape {labels.shape}")
    if labels.dtype == bool:
        labels = ndimage.label(labels)[0]
    for index, box in enumerate(ndimage.find_objects(labels.astype(np.int64, copy=False)), start=1):
        if box is not None:
            yield index, box, labels[box] == index


def distance_target(labels: np.ndarray) -> np.ndarray:
    """Each object's Euclidean distance to its own border, divided by its largest value.

    Args:
        labels: (H, W) integer instance map (0 = background); a bool mask counts its
            4-connected components as objects.

    Returns:
        float32 (H, W): 0 on background, 1 at each object's most central pixel, falling
        towards its rim (a touching neighbour counts as border).
    """
    out = np.zeros(np.shape(labels), np.float32)
    for _, box, inside in _objects(labels):
        padded = np.pad(inside, 1)  # the crop's edge is the object's border too
        distance = ndimage.distance_transform_edt(padded)[1:-1, 1:-1]  # (h, w) pixels
        out[box][inside] = (distance / distance.max())[inside]
    return out


def hover_target(labels: np.ndarray) -> np.ndarray:
    """HoVer-Net's horizontal and vertical maps (Graham et al. 2019).

    Inside each object, the x (column) and y (row) offset of every pixel from the
    object's centroid, each divided by its largest absolute value in that object, so
    both run from -1 to 1 across the object and jump where two objects touch.

    Args:
        labels: (H, W) integer instance map (0 = background).

    Returns:
        float32 (2, H, W): channel 0 horizontal (x), channel 1 vertical (y); 0 on background.
    """
    out = np.zeros((2, *np.shape(labels)), np.float32)
    for _, box, inside in _objects(labels):
        rows, cols = np.nonzero(inside)
        for channel, offsets in ((0, cols - cols.mean()), (1, rows - rows.mean())):
            peak = np.abs(offsets).max()
            values = offsets / peak if peak > 0 else offsets
            out[channel][box][rows, cols] = values
    return out


def instance_map_target(labels: np.ndarray, instance_map: str) -> np.ndarray | None:
    """The regression target of `ModelConfig.instance_map`: (1, H, W) for ``distance``,
    (2, H, W) for ``hover``, None for ``boundary`` (the boundary target serves)."""
    if instance_map == "distance":
        return distance_target(labels)[None]
    if instance_map == "hover":
        return hover_target(labels)
    if instance_map == "boundary":
        return None
    raise ValueError(f"unknown instance_map {instance_map!r}")


def annotated_weight(labels: np.ndarray, ring: int) -> np.ndarray:
    """Loss weight of a partly annotated instance map: 1 on the annotated objects and
    within `ring` pixels of them, 0 elsewhere (unlabelled pixels far from any annotation
    may be unannotated objects, not background).

    Args:
        labels: (H, W) integer instance map (0 = unlabelled).
        ring: width in pixels of the background ring kept around each object.

    Returns:
        float32 (H, W) in {0, 1}.
    """
    annotated = np.asarray(labels) > 0
    if not annotated.any():
        return np.zeros(annotated.shape, np.float32)
    near = ndimage.distance_transform_edt(~annotated) <= ring  # (H, W)
    return near.astype(np.float32)
