"""Writer contribution: a mask or labels layer to PNG or TIFF, values kept exactly."""

from __future__ import annotations

from typing import Any

from napari_sgdc.files import write_labels as _write_labels


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """Writes a Labels layer with `napari_sgdc.files.write_labels` (napari has already
    asked the user before replacing an existing file).

    Args:
        path: target file; ``.png``, ``.tif`` or ``.tiff``.
        data: the layer data.
        meta: the layer attributes (unused).

    Returns:
        The written path, or an empty list when the file type is not handled.

    Raises:
        ValueError: the labels do not fit the file type.
    """
    written = _write_labels(path, data, overwrite=True)
    return [] if written is None else [str(written)]
