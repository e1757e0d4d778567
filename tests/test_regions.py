"""Ranking of the regions to check next."""

from __future__ import annotations

import numpy as np
import pytest

from napari_sgdc.regions import rank_regions


def test_regions_cover_the_map_most_uncertain_first():
    uncertainty = np.zeros((50, 70), np.float32)
    uncertainty[40:50, 60:70] = 1.0  # bottom-right corner tile (smaller than the others)
    uncertainty[0:20, 20:40] = 0.3   # second tile of the first row
    regions = rank_regions(uncertainty, 20)
    assert len(regions) == 3 * 4
    covered = np.zeros_like(uncertainty, int)
    for region in regions:
        covered[region.slices] += 1
    assert (covered == 1).all()
    first, second = regions[:2]
    assert (first.top, first.left, first.bottom, first.right) == (40, 60, 50, 70)
    assert first.score == pytest.approx(1.0) and first.center == (44.5, 64.5)
    assert (second.top, second.left) == (0, 20) and second.score == pytest.approx(0.3)
    assert [r.score for r in regions] == sorted((r.score for r in regions), reverse=True)


@pytest.mark.parametrize("uncertainty, tile", [(np.zeros((4, 4, 3)), 16), (np.zeros((40, 40)), 4),
                                               (np.zeros((40, 40)), 16.5)])
def test_bad_region_requests_are_refused(uncertainty, tile):
    with pytest.raises(ValueError):
        rank_regions(uncertainty, tile)
