"""The one reader and the one writer of image files (headless: no torch, napari or Qt).

Reading: `read_image` returns a file's pixels unchanged (uint16 stays uint16);
`read_mask` reads a label file as a mask or an instance map.

Writing: `write_result` writes a `SegmentationResult` for the CLI (``data``: mask PNG,
float32 probability and boundary TIFFs, instance labels TIFF, the object table CSV and, for a
model with nucleus types, the class map TIFF) or the demo (``preview``:
8-bit PNGs); `write_labels` writes one label array (the napari writer). Label files are uint16, or
uint32 when an id exceeds 65,535 (`label_dtype`: the one rule, so the files of one batch have
one type unless an image holds more than 65,535 objects). Every write is atomic,
and an existing file is never replaced unless ``overwrite=True``.
"""

from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

__all__ = [
    "CLASS_COLUMNS", "IMAGE_SUFFIXES", "LABEL_DTYPES", "MASK_SUFFIXES", "OBJECT_COLUMNS_PX", "RESULT_FORMATS",
    "SENSOR_BITS", "atomic_write", "image_pages", "label_dtype", "object_table", "read_image", "read_mask",
    "result_paths", "white_level", "write_labels", "write_result",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")
TIFF_SUFFIXES = (".tif", ".tiff")
RESULT_FORMATS = ("data", "preview")
DATA_FILES = ("mask.png", "prob.tif", "boundary.tif")  # plus labels.tif, objects.csv, classes.tif, uncertainty.tif
OBJECT_COLUMNS_PX = ("id", "centroid_x_px", "centroid_y_px", "area_px", "mean_probability")
"""The object table of an image (``S_objects.csv``): pixels of the image, centroids with pixel centres at whole
numbers (x = column, y = row); ``confidence`` follows with ``uncertainty``, then `CLASS_COLUMNS` with types."""
CLASS_COLUMNS = ("class", "class_id", "class_confidence")
"""An object table's columns for a model with nucleus types (images and slides): the type's name, its id (1..T,
``ModelConfig.type_names``) and the object's mean probability of that type (`napari_sgdc.postprocess.assign_types`)."""


# --------------------------------------------------------------------------- reading


def read_image(path: str | Path, page: int | None = None) -> np.ndarray:
    """Reads an image file without changing its dtype or channels.

    Args:
        path: the image file.
        page: the image of a multi-page TIFF to read (0 .. `image_pages` − 1); None reads the file
            as tifffile does (its first series).

    Raises:
        ValueError: naming the file when it cannot be read or holds no pixels, or when it is a
            huge untiled TIFF stored as one strip (it cannot be read in parts; never loaded whole).
    """
    path, refusal = Path(path), None
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            import tifffile

            with tifffile.TiffFile(str(path)) as tiff:
                series, key = (0, None) if page is None else _page_planes(tiff)[page]
                refusal = _whole_read_refusal(tiff.series[series].pages[key or 0])
                image = None if refusal else tiff.asarray(series=series, key=key)
        else:
            from skimage import io as skio

            image = skio.imread(str(path))
    except Exception as error:  # noqa: BLE001 - any reader failure means a bad file
        raise ValueError(f"{path}: cannot read image ({type(error).__name__}: {error})") from None
    if refusal:
        raise ValueError(f"{path}: {refusal}")
    image = np.asarray(image)
    if image.dtype == object or image.size == 0:
        raise ValueError(f"{path}: cannot read image: no pixel data (shape {image.shape})")
    return image


def _whole_read_refusal(page) -> str | None:
    """Why a TIFF page is not read whole (`napari_sgdc.slide.whole_read_problem`: a huge page
    stored as one strip), or None."""
    from .slide import whole_read_problem

    return whole_read_problem(page)


def _page_planes(tiff) -> list[tuple[int, int | None]]:
    """(series, page key) of every image of a TIFF whose pages are images of their own: a series
    of one page, or a series that stacks pages along one axis that is not channels. One entry
    (the whole file) when a series is anything else (z × c hyperstacks, channels as pages, pages
    at most 4 px wide: the channels of one image)."""
    planes: list[tuple[int, int | None]] = []
    for index, series in enumerate(tiff.series):
        leading = series.axes[:len(series.shape) - len(series.pages[0].shape)] if series.pages else "?"
        if not leading:
            planes.append((index, 0))
        elif (len(leading) == 1 and leading not in "CS" and len(series.pages) == series.shape[0]
              and series.shape[-1] > 4):  # (H, W, 2) written as H pages of (W, 2): one image's channels
            planes.extend((index, key) for key in range(series.shape[0]))
        else:
            return [(0, None)]
    return planes or [(0, None)]


def image_pages(path: str | Path) -> int:
    """How many images `path` holds: a multi-page TIFF's pages are each an image of their own
    (whatever their sizes; ``predict`` writes ``S_p0_…``, ``S_p1_…``); 1 for any other file, and
    for a TIFF whose pages form a z × c hyperstack or channels (read whole, `read_image`)."""
    path = Path(path)
    if path.suffix.lower() not in TIFF_SUFFIXES:
        return 1
    try:
        import tifffile

        with tifffile.TiffFile(str(path)) as tiff:
            return len(_page_planes(tiff))
    except Exception:  # noqa: BLE001 - an unreadable file is one (bad) image: read_image names it
        return 1


def read_mask(path: str | Path, instance: bool = False) -> np.ndarray:
    """Reads a label file as a semantic mask or an instance map.

    Args:
        path: single-channel label file (0/255 or 0/1 mask, label PNG/TIFF, uint16
            instance map). RGB(A) masks are accepted: any non-zero colour is foreground.
        instance: return instance ids; binary masks are split into 4-connected components.

    Returns:
        (H, W) bool mask, or (H, W) int32 instance ids when `instance` is True (ids of 2**31 and
        more renumbered by rank, `napari_sgdc.data.targets.instance_ids`).

    Raises:
        ValueError: naming the file when it cannot be read or is not 2D.
    """
    from skimage.measure import label as connected_components

    path = Path(path)
    raw = read_image(path)
    if raw.ndim == 3 and raw.shape[2] in (3, 4):
        raw = (raw[:, :, :3] > 0).any(axis=2).astype(np.uint8)
    elif raw.ndim == 3 and raw.shape[2] == 1:
        raw = raw[:, :, 0]
    if raw.ndim != 2:
        raise ValueError(f"bad mask {path}: expected a 2D label image, got shape {raw.shape}")
    if not np.issubdtype(raw.dtype, np.integer) and raw.dtype != bool:
        if np.issubdtype(raw.dtype, np.floating) and np.all(raw == np.round(raw)):
            raw = raw.astype(np.int64)
        else:
            raise ValueError(f"bad mask {path}: labels must be integers, got {raw.dtype}")
    if not instance:
        return raw > 0
    if raw.dtype == bool or np.unique(raw).size <= 2:
        return connected_components(raw > 0, connectivity=1).astype(np.int32)
    from .data.targets import instance_ids  # ids of 2**31 and more are renumbered, never wrapped

    return instance_ids(raw)


# --------------------------------------------------------------------------- writing


SENSOR_BITS = (8, 10, 12, 14, 16)
"""Bit depths scanners and cameras store in uint16 (10, 12 and 14 bits are common)."""


def white_level(dtype, peak: float) -> float:
    """The value that reads as white (1.0) for integer pixels of `dtype` whose largest value is
    `peak`: 255 for uint8; for uint16 the smallest of `SENSOR_BITS` that holds `peak` (so 12-bit
    data in uint16 spans [0, 1], not [0, 1/16]); other integers 255, 65535 or `peak`. The one
    bit-depth rule, for images (`to_float_rgb`) and slides (`napari_sgdc.slide`) alike."""
    dtype = np.dtype(dtype)
    if dtype == np.uint8:
        return 255.0
    if dtype == np.uint16:
        return float(next(2 ** bits - 1 for bits in SENSOR_BITS if peak <= 2 ** bits - 1))
    return 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else float(peak)


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Calls ``write(tmp_path)`` and moves the result onto `path` atomically.

    A crash or an exception leaves any existing file at `path` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(Path(tmp_name))
        with open(tmp_name, "rb") as stream:
            os.fsync(stream.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_name, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


LABEL_DTYPES = (np.uint16, np.uint32)
"""Label image files are uint16, or uint32 when an id exceeds 65,535 (never uint8, never signed)."""


def label_dtype(labels: np.ndarray) -> np.dtype:
    """The type of a label image file: uint16, or uint32 when an id exceeds 65,535.

    Raises:
        ValueError: negative labels, or ids above 2**32 - 1.
    """
    labels = np.asarray(labels)
    if labels.size and labels.min() < 0:
        raise ValueError(f"labels with negative values cannot be exported (shape {labels.shape})")
    top = int(labels.max()) if labels.size else 0
    for dtype in LABEL_DTYPES:
        if top <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"label value {top} is too large to export")


def _save_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image as PILImage

    PILImage.fromarray(np.ascontiguousarray(array)).save(path, format="PNG")


def _save_tiff(path: Path, array: np.ndarray) -> None:
    import tifffile

    tifffile.imwrite(path, np.ascontiguousarray(array), compression="zlib")


def _save_csv(path: Path, table: dict) -> None:
    """A table ({column: values}) as plain CSV: whole numbers and text as they are, other numbers with 4
    decimals, a NaN as an empty cell."""
    def cell(value) -> str:
        if isinstance(value, (str, int, np.integer)):
            return str(value)
        return f"{value:.4f}" if np.isfinite(value) else ""

    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(list(table))
        writer.writerows([cell(v) for v in row] for row in zip(*table.values()))


def _save(path: Path, array: Any) -> None:
    """Writes `array` atomically as PNG or TIFF, or a table ({column: values}) as CSV, chosen by the suffix."""
    suffix = path.suffix.lower()
    saver = _save_csv if suffix == ".csv" else _save_tiff if suffix in TIFF_SUFFIXES else _save_png
    atomic_write(path, lambda tmp: saver(tmp, array))


def _refuse_existing(paths: Iterable[Path], overwrite: bool) -> None:
    if overwrite:
        return
    existing = [str(path) for path in paths if path.exists()]
    if existing:
        more = f" (+{len(existing) - 1} more)" if len(existing) > 1 else ""
        raise FileExistsError(f"{existing[0]}{more} already exists; not replaced (use overwrite)")


def write_labels(path: str | Path, labels: Any, *, overwrite: bool = True) -> Path | None:
    """Writes a mask or label array to PNG (2-D, ids up to 65535) or TIFF (any shape).

    Label values are written unchanged (0 = background) in `label_dtype`.

    Returns:
        The written path, or None when the suffix is neither PNG nor TIFF.

    Raises:
        ValueError: the labels do not fit the file type.
        FileExistsError: the file exists and `overwrite` is False.
    """
    target = Path(path)
    suffix = target.suffix.lower()
    if suffix not in (".png", *TIFF_SUFFIXES):
        return None
    array = np.asarray(labels)
    try:
        array = _as_label_array(array)
        if suffix == ".png" and array.ndim != 2:
            raise ValueError(f"PNG holds 2-D labels only; these have shape {array.shape}: save as .tif")
        if suffix == ".png" and array.dtype == np.uint32:
            raise ValueError("PNG holds label values up to 65535: save as .tif")
    except ValueError as error:
        raise ValueError(f"{target}: {error}") from None
    _refuse_existing([target], overwrite)
    _save(target, array)
    return target


def _as_label_array(array: np.ndarray) -> np.ndarray:
    """Labels as `label_dtype`; refuses empty arrays and values that are not whole numbers >= 0."""
    if array.size == 0:
        raise ValueError(f"labels are empty (shape {array.shape})")
    if array.dtype == bool:
        return array.astype(LABEL_DTYPES[0])
    if np.issubdtype(array.dtype, np.floating):
        not_whole = array[~np.isfinite(array) | (array != np.round(array))]
        if not_whole.size:
            raise ValueError(f"labels must be whole numbers, got {array.dtype} values such as {not_whole[0]} "
                             f"(shape {array.shape})")
    elif not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"labels must be whole numbers, got dtype {array.dtype} (shape {array.shape})")
    return array.astype(label_dtype(array))


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """A float map in [0, 1] (or a bool mask) as uint8 0..255."""
    return (np.clip(np.nan_to_num(np.asarray(array, np.float32)), 0, 1) * 255).round().astype(np.uint8)


def object_table(result: Any, type_names: tuple[str, ...] = ()) -> dict[str, list]:
    """The objects of a 2-D instance result as table columns: `OBJECT_COLUMNS_PX`, ``confidence`` (the
    object confidence of an ``uncertainty`` run), then `CLASS_COLUMNS` for a result with nucleus types
    (``class``: ``type_names[class_id - 1]``, or the id as text without names). One row per object id present."""
    from skimage.measure import regionprops_table

    props = regionprops_table(np.asarray(result.labels), np.asarray(result.probability, np.float32),
                              properties=("label", "area", "centroid", "intensity_mean"))
    ids = props["label"].astype(np.int64)
    table = {"id": ids.tolist(), "centroid_x_px": props["centroid-1"].tolist(),
             "centroid_y_px": props["centroid-0"].tolist(), "area_px": props["area"].astype(np.int64).tolist(),
             "mean_probability": props["intensity_mean"].tolist()}
    if result.confidence is not None:
        table["confidence"] = np.asarray(result.confidence)[ids].tolist()
    if result.object_types is not None:
        class_ids = np.asarray(result.object_types)[ids].astype(np.int64)
        table["class"] = [type_names[c - 1] if c and len(type_names) >= c else str(c) for c in class_ids]
        table["class_id"] = class_ids.tolist()
        table["class_confidence"] = np.asarray(result.type_confidence)[ids].tolist()
    return table


def _result_arrays(result: Any, stem: str, fmt: str, image: np.ndarray | None,
                   type_names: tuple[str, ...] = ()) -> dict[str, Callable[[], Any]]:
    """File name → a function making its array (or table), for one result in one format."""
    if fmt == "data":
        makers = {"mask.png": lambda: result.mask.astype(np.uint8) * 255,
                  "prob.tif": lambda: np.asarray(result.probability, np.float32),
                  "boundary.tif": lambda: np.asarray(result.boundary, np.float32),
                  "labels.tif": lambda: result.labels.astype(label_dtype(result.labels)),
                  "objects.csv": lambda: object_table(result, type_names),
                  "classes.tif": lambda: result.type_map,
                  "uncertainty.tif": lambda: np.asarray(result.uncertainty, np.float32)}
        kinds = _data_kinds(result.labels is not None, result.uncertainty is not None,
                            getattr(result, "object_types", None) is not None)
        return {f"{stem}_{kind}": makers[kind] for kind in kinds}
    if fmt != "preview":
        raise ValueError(f"unknown result format {fmt!r}; choose from {RESULT_FORMATS}")
    files = {}
    if image is not None:
        files[f"{stem}_image.png"] = lambda: np.asarray(image)
    files[f"{stem}_mask.png"] = lambda: _to_uint8(result.mask)
    files[f"{stem}_probability.png"] = lambda: _to_uint8(result.probability)
    files[f"{stem}_boundary.png"] = lambda: _to_uint8(result.boundary)
    if result.labels is not None:
        def overlay() -> np.ndarray:
            from skimage.color import label2rgb

            return _to_uint8(label2rgb(result.labels, image=image, bg_label=0, alpha=0.35))

        files[f"{stem}_labels.png"] = overlay
    for gate in result.gates or []:
        block = gate.name.replace("@", "_")
        files[f"{stem}_gate1_{block}.png"] = lambda g=gate: _to_uint8(g.data[0])
        files[f"{stem}_gate2_{block}.png"] = lambda g=gate: _to_uint8(g.data[1])
    return files


def _data_kinds(instances: bool, uncertainty: bool, types: bool = False) -> list[str]:
    return [*DATA_FILES, *(["labels.tif", "objects.csv"] if instances else []),
            *(["classes.tif"] if instances and types else []), *(["uncertainty.tif"] if uncertainty else [])]


def result_paths(out_dir: str | Path, stem: str, *, instances: bool, uncertainty: bool = False,
                 types: bool = False) -> list[Path]:
    """The files `write_result` writes in the ``data`` format, without writing anything (`types`: a
    model with nucleus types)."""
    return [Path(out_dir) / f"{stem}_{kind}" for kind in _data_kinds(instances, uncertainty, types)]


def write_result(result: Any, out_dir: str | Path, stem: str, fmt: str = "data", *,
                 image: np.ndarray | None = None, overwrite: bool = False,
                 type_names: tuple[str, ...] = ()) -> list[Path]:
    """Writes a `SegmentationResult` as files named ``<stem>_<kind>.<ext>`` in `out_dir`.

    Args:
        result: the `SegmentationResult` of one 2-D image.
        out_dir: output folder (created if needed).
        stem: file name prefix.
        fmt: ``data``: ``_mask.png`` (0/255), ``_prob.tif`` and ``_boundary.tif``
            (float32), ``_labels.tif`` (instance ids: uint16, or uint32 above 65,535 ids, `label_dtype`),
            ``_objects.csv`` (one row per instance, `object_table`), ``_classes.tif`` (uint8 class id
            of each pixel's instance, 0 = background: `SegmentationResult.type_map`, for a model with
            nucleus types) and ``_uncertainty.tif`` (float32) when the result has them; ``preview``: 8-bit
            PNGs of the image (when given), mask, probability, boundary, a label overlay
            and each gate map.
        image: the segmented image (``preview`` only).
        overwrite: replace existing files; otherwise any existing target is refused
            before anything is written.
        type_names: the model's nucleus type names (``ModelConfig.type_names``), for the object
            table's ``class`` column.

    Returns:
        The written paths.

    Raises:
        FileExistsError: a target exists and `overwrite` is False (nothing is written).
    """
    files = _result_arrays(result, stem, fmt, image, tuple(type_names))
    out_dir = Path(out_dir)
    paths = [out_dir / name for name in files]
    _refuse_existing(paths, overwrite)
    for path, make in zip(paths, files.values()):
        _save(path, make())
    return paths
