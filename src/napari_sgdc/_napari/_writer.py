"""Writer contribution: a mask or labels layer to PNG or TIFF, values kept exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

PNG_SUFFIXES = (".png",)
TIFF_SUFFIXES = (".tif", ".tiff")


def _label_dtype(data: np.ndarray) -> np.dtype:
    """Smallest unsigned type holding the labels (uint8, uint16 or uint32)."""
    if data.size and data.min() < 0:
        raise ValueError("labels with negative values cannot be exported")
    top = int(data.max()) if data.size else 0
    for dtype in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"label value {top} is too large to export")


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """Writes a Labels layer to PNG (2-D, 8/16-bit) or TIFF (any shape).

    Label values are written unchanged (0 = background): a semantic mask is 0/1 and
    nuclei keep their instance ids. PNG holds only 2-D labels up to 65535.

    Args:
        path: target file; ``.png``, ``.tif`` or ``.tiff``.
        data: the layer data.
        meta: the layer attributes (unused).

    Returns:
        The written path, or an empty list when the file type is not handled.

    Raises:
        ValueError: the labels do not fit the file type.
    """
    target = Path(path)
    suffix = target.suffix.lower()
    labels = np.asarray(data)
    if labels.dtype == bool:
        labels = labels.astype(np.uint8)
    labels = labels.astype(_label_dtype(labels))
    if suffix in PNG_SUFFIXES:
        if labels.ndim != 2:
            raise ValueError(f"PNG holds 2-D labels only; this layer has shape {labels.shape}: save as .tif")
        if labels.dtype == np.uint32:
            raise ValueError("PNG holds label values up to 65535: save as .tif")
        from PIL import Image as PILImage

        PILImage.fromarray(labels).save(target)
    elif suffix in TIFF_SUFFIXES:
        import tifffile

        tifffile.imwrite(target, labels, compression="zlib")
    else:
        return []
    return [str(target)]
