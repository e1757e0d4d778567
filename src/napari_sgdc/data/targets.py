"""Boundary (edge) targets derived from semantic masks or instance maps."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.segmentation import find_boundaries

__all__ = ["boundary_target"]


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
