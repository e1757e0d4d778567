"""Regions to check next: the image cut into square tiles, ranked by mean uncertainty.

The Segment widget's *Next region* button and `benchmarks/uncertainty.py` use the same
ranking, so what the benchmark measures is what the user is shown.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Region", "rank_regions"]


@dataclass(frozen=True)
class Region:
    """One tile of a plane, in pixel coordinates (end-exclusive).

    Attributes:
        top, left, bottom, right: the tile's bounds.
        score: its mean uncertainty.
    """

    top: int
    left: int
    bottom: int
    right: int
    score: float

    @property
    def center(self) -> tuple[float, float]:
        """(row, column) of the tile's centre."""
        return (self.top + self.bottom - 1) / 2.0, (self.left + self.right - 1) / 2.0

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.top, self.bottom), slice(self.left, self.right)


def rank_regions(uncertainty: np.ndarray, tile: int) -> list[Region]:
    """Cuts a (H, W) uncertainty map into `tile`-pixel squares (the last row and column of
    tiles may be smaller) and returns them most uncertain first (ties: top-left first).

    Raises:
        ValueError: a map that is not 2-D, or a tile smaller than 8 pixels.
    """
    uncertainty = np.asarray(uncertainty, np.float32)
    if uncertainty.ndim != 2 or uncertainty.size == 0:
        raise ValueError(f"uncertainty must be a 2-D (H, W) map, got shape {uncertainty.shape}")
    if isinstance(tile, bool) or not isinstance(tile, (int, np.integer)) or tile < 8:
        raise ValueError(f"region size must be a whole number of at least 8 pixels, got {tile!r}")
    height, width = uncertainty.shape
    regions = []
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            window = uncertainty[top:top + tile, left:left + tile]
            regions.append(Region(top, left, top + window.shape[0], left + window.shape[1],
                                  float(np.nan_to_num(window).mean())))
    return sorted(regions, key=lambda region: -region.score)
