"""Review, most uncertain first: the Segment dock's Next region (Shift-N).

`RegionReview` moves the view to the most uncertain region of the picked image's current
plane that was not visited yet (regions ranked by `napari_sgdc.regions.rank_regions` on the
session's cached uncertainty) and outlines it in ``<image> next region``.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import numpy as np
from magicgui.widgets import PushButton, SpinBox
from napari.layers import Image
from napari.utils.notifications import show_info

from napari_sgdc._napari._layers import current_plane, show_region
from napari_sgdc.session import CorrectionSession

NEXT_REGION_SHORTCUT = "Shift-N"
REGION_FILL = 0.8
"""Fraction of the canvas (on its tighter axis) that a region fills after Next region."""


class RegionReview:
    """The region size box, the Next region button and the regions visited per image.

    Args:
        viewer: the viewer.
        session: the session (its cached uncertainty).
        status: called with a status line.

    Attributes:
        region_size, next_region_button: the controls to put in the dock.
    """

    def __init__(self, viewer: Any, session: CorrectionSession, status: Callable[[str], None]) -> None:
        self._viewer, self._session, self._status = viewer, session, status
        self._visited: "weakref.WeakKeyDictionary[Image, set[tuple[int, ...]]]" = weakref.WeakKeyDictionary()
        self.region_size = SpinBox(
            name="region_size", label="region size (px)", min=16, max=4096, step=16, value=128,
            tooltip="Side of the square regions that Next region ranks by mean uncertainty.")
        self.next_region_button = PushButton(
            name="next_region_button", text=f"Next region ({NEXT_REGION_SHORTCUT})",
            tooltip="Zoom to the most uncertain region of the current image not yet visited.")

    def forget(self, image: Image) -> None:
        """A new result of `image`: its regions are new to the user."""
        self._visited.pop(image, None)

    def next_region(self, image: Image | None) -> Any:
        """Shows the most uncertain region of `image`'s current plane not visited yet; when all
        were visited a notification says so and the next call starts over.

        Returns:
            The `Region` shown, or None (a notification says why).
        """
        from napari_sgdc.regions import rank_regions

        if image is None or image not in self._viewer.layers:
            show_info("Next region: no image. Open an image and segment it first.")
            return None
        cache = self._session.results.get(image)
        plane = current_plane(image, self._viewer.dims.point)
        if cache is None or not cache.has_uncertainty(plane):
            where = " (this plane)" if cache is not None and cache.lead_shape else ""
            show_info(f"Next region: no uncertainty for '{image.name}'{where} yet. Segment first, "
                      "with 'uncertainty layer' ticked.")
            return None
        size = int(self.region_size.value)
        regions = rank_regions(cache.uncertainty[plane], size)
        visited = self._visited.setdefault(image, set())
        keys = [(plane, size, region.top, region.left) for region in regions]
        todo = [index for index, key in enumerate(keys) if key not in visited]
        if not todo:
            visited.difference_update(keys)
            show_info(f"Next region: all {len(regions)} regions of '{image.name}' ({size} px) were visited. "
                      "Press again to start over from the most uncertain.")
            self._status(f"all {len(regions)} regions visited")
            return None
        region = regions[todo[0]]
        visited.add(keys[todo[0]])
        lead = tuple(int(i) for i in np.unravel_index(plane, cache.lead_shape)) if cache.lead_shape else ()
        show_region(self._viewer, image, lead, (region.top, region.left, region.bottom, region.right))
        look_at(self._viewer, image, lead, region)
        self._status(f"region {len(regions) - len(todo) + 1}/{len(regions)}, uncertainty {region.score:.2f}")
        return region


def look_at(viewer: Any, image: Image, lead: tuple[int, ...], region: Any) -> None:
    """Centres the camera on `region` and zooms so it fills `REGION_FILL` of the canvas."""
    point = np.array(viewer.dims.point, dtype=float)  # world axes; the image holds the last ones
    point[-image.ndim:] = image.data_to_world((*lead, *region.center))
    viewer.camera.center = tuple(point[list(viewer.dims.displayed)])
    if viewer.dims.ndisplay != 2:
        return
    world_size = np.abs(np.asarray(image.scale[-2:], dtype=float)) * (
        region.bottom - region.top, region.right - region.left)
    try:
        canvas = np.asarray(viewer.canvas.viewbox_size(viewer.layers), dtype=float)
    except Exception:  # noqa: BLE001 - older napari: the whole canvas
        canvas = np.asarray(viewer.canvas.size, dtype=float)
    viewer.camera.zoom = float(REGION_FILL * np.min(canvas / np.maximum(world_size, 1e-9)))
