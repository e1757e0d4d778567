"""Whole-slide images: one lazy `Slide` type over OpenSlide and tifffile, and tissue detection.

Headless (no napari, Qt or torch). Nothing here ever holds a full-resolution level in
memory: `Slide.read_region` decodes only the tiles it touches, and `Slide.level_array`
is a lazy dask array.

Backends:
    ``tifffile`` (with zarr): pyramidal OME-TIFF (``.ome.tif``, SubIFD pyramids) and other
        tiled or pyramidal TIFFs; default for ``.tif``/``.tiff``.
    ``openslide`` (openslide-python + the openslide-bin wheels): Aperio ``.svs``,
        Hamamatsu ``.ndpi``, MIRAX ``.mrxs`` and generic tiled TIFF.

µm per pixel (``mpp``) comes from the metadata (OpenSlide's ``openslide.mpp-x``, the
OME ``PhysicalSizeX``, or the TIFF resolution tags in cm or inch); None when absent. Every
error about a file is a `SlideError` (a ValueError) whose one-line message names the file.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .grid import choose_level, mpp_in_range, mpp_problem

__all__ = ["SLIDE_SUFFIXES", "OPENSLIDE_SUFFIXES", "Slide", "SlideError", "TissueMask", "detect_tissue",
           "is_slide", "open_slide", "whole_read_problem"]

OPENSLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs")
TIFF_SUFFIXES = (".tif", ".tiff")
SLIDE_SUFFIXES = OPENSLIDE_SUFFIXES + TIFF_SUFFIXES
BACKENDS = ("auto", "openslide", "tifffile")
LARGE_PLAIN_SIDE = 8192
"""A tiled, single-level TIFF at least this long on a side also counts as a slide (`is_slide`)."""
BACKGROUND = 255  # pixels outside the slide (and OpenSlide's transparent ones) read as white


class SlideError(ValueError):
    """A slide that cannot be opened or read; the message is one line naming the file."""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".ome.tif" if name.endswith((".ome.tif", ".ome.tiff")) else path.suffix.lower()


def _tiff_mpp(tiff) -> float | None:
    """µm/px of a TiffFile from OME PhysicalSizeX, or the resolution tags (cm or inch)."""
    if tiff.is_ome:
        match = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tiff.ome_metadata or "")
        unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', tiff.ome_metadata or "")
        if match:
            value = float(match.group(1))
            scale = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3}.get(unit.group(1) if unit else "µm")
            if scale and value > 0:
                return value * scale
    page = tiff.pages[0]
    description = page.description or ""
    match = re.search(r"\bMPP\s*=\s*([0-9.]+)", description)  # Aperio
    if match and float(match.group(1)) > 0:
        return float(match.group(1))
    tags = page.tags
    if "XResolution" in tags and "ResolutionUnit" in tags:
        numerator, denominator = tags["XResolution"].value
        unit = int(tags["ResolutionUnit"].value)
        per_unit = numerator / denominator if denominator else 0
        microns = {2: 25400.0, 3: 10000.0}.get(unit)  # inch, centimetre
        if microns and per_unit > 0:
            mpp = microns / per_unit
            if mpp_in_range(mpp):
                return mpp
    return None


def _check_tiff_extents(path: Path, tiff) -> None:
    """Refuses a truncated TIFF: every tile or strip must lie inside the file."""
    size = path.stat().st_size
    for page in tiff.pages:
        offsets, counts = page.dataoffsets, page.databytecounts
        if len(offsets) and max(int(o) + int(c) for o, c in zip(offsets, counts) if c) > size:
            raise SlideError(f"{path}: truncated or corrupt slide (image data past the end of the file)")


@dataclass
class TissueMask:
    """Tissue detected on a low-resolution level.

    Attributes:
        mask: bool (h, w), True on tissue.
        downsample: level-0 pixels per mask pixel (the mask covers the whole slide).
    """

    mask: np.ndarray
    downsample: float

    def any_in(self, x0: float, y0: float, x1: float, y1: float) -> bool:
        """Whether any tissue lies in the level-0 box [x0, x1) × [y0, y1)."""
        d = self.downsample
        r0, r1 = max(0, int(y0 // d)), min(self.mask.shape[0], int(np.ceil(y1 / d)))
        c0, c1 = max(0, int(x0 // d)), min(self.mask.shape[1], int(np.ceil(x1 / d)))
        return r1 > r0 and c1 > c0 and bool(self.mask[r0:r1, c0:c1].any())


class Slide:
    """A lazily read whole-slide image (use `open_slide`).

    Attributes:
        path: the file.
        backend: ``openslide`` or ``tifffile``.
        level_shapes: (height, width) of every level, level 0 (full resolution) first.
        level_downsamples: level-0 pixels per pixel of every level.
        mpp: µm per level-0 pixel, from the metadata or the `open_slide` override; None if unknown.
    """

    def __init__(self, path: Path, backend: str, level_shapes, level_downsamples, mpp, handle):
        self.path = path
        self.backend = backend
        self.level_shapes = [tuple(int(v) for v in shape) for shape in level_shapes]
        self.level_downsamples = [float(d) for d in level_downsamples]
        self.mpp = mpp
        self._handle = handle
        self._arrays: dict[int, object] = {}
        self._lock = threading.Lock()  # OpenSlide handles are thread-safe; zarr-over-tifffile is guarded
        self._white: float | None = None  # the white level of non-uint8 pixels (`files.white_level`)

    def __repr__(self) -> str:
        return (f"Slide({str(self.path)!r}, backend={self.backend!r}, levels={self.level_shapes}, "
                f"mpp={self.mpp})")

    @property
    def level_count(self) -> int:
        return len(self.level_shapes)

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of level 0."""
        return self.level_shapes[0]

    def level_mpp(self, level: int) -> float | None:
        return None if self.mpp is None else self.mpp * self.level_downsamples[level]

    def best_level(self, mpp: float) -> int:
        """The coarsest level whose pixels are no larger than `mpp` µm (`napari_sgdc.grid.choose_level`);
        0 without slide mpp."""
        return choose_level([self.level_mpp(level) for level in range(self.level_count)], mpp)

    def _zarr_level(self, level: int):
        if level not in self._arrays:
            import zarr

            series = self._handle.series[0]
            group = zarr.open(series.aszarr(), mode="r")
            self._arrays.update({i: group[str(i)] for i in range(len(series.levels))} if hasattr(group, "keys")
                                else {0: group})
        return self._arrays[level]

    def read_region(self, x: int, y: int, width: int, height: int, level: int = 0) -> np.ndarray:
        """Reads (height, width, 3) uint8 RGB at `level`; (x, y) is the top-left corner in **level-0** pixels.

        Pixels outside the slide are white (255). Raises `SlideError` naming the file on a read failure.
        """
        width, height = int(width), int(height)
        try:
            if self.backend == "openslide":
                region = np.asarray(self._handle.read_region((int(x), int(y)), level, (width, height)))
                rgb = region[..., :3].copy()
                rgb[region[..., 3] == 0] = BACKGROUND
                return rgb
            d = self.level_downsamples[level]
            lh, lw = self.level_shapes[level]
            ly, lx = int(round(y / d)), int(round(x / d))
            out = np.full((height, width, 3), BACKGROUND, np.uint8)
            r0, r1, c0, c1 = max(ly, 0), min(ly + height, lh), max(lx, 0), min(lx + width, lw)
            if r1 > r0 and c1 > c0:
                out[r0 - ly:r1 - ly, c0 - lx:c1 - lx] = self._read_level(level, r0, r1, c0, c1)
            return out
        except SlideError:
            raise
        except Exception as error:  # noqa: BLE001 - any decoder failure is a bad slide
            raise SlideError(f"{self.path}: cannot read region at level {level} "
                             f"({type(error).__name__}: {_one_line(error)})") from None

    def _read_level(self, level: int, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """(r1 - r0, c1 - c0, 3) uint8 RGB of a window inside level `level` (tifffile backend);
        any decoder failure is a `SlideError` naming the file."""
        try:
            with self._lock:
                data = np.asarray(self._zarr_level(level)[r0:r1, c0:c1])
            return _to_rgb(data, self._white_level(data.dtype))
        except Exception as error:  # noqa: BLE001 - a damaged tile or header is a bad slide
            raise SlideError(f"{self.path}: cannot read level {level} ({type(error).__name__}: "
                             f"{_one_line(error)})") from None

    def _white_level(self, dtype) -> float:
        """One white level for the whole slide (never per tile): `napari_sgdc.files.white_level` of
        the coarsest level's largest value, so 10/12/14-bit scans in uint16 read as full range."""
        from .files import white_level

        if np.dtype(dtype) == np.uint8:
            return 255.0
        if self._white is None:
            coarsest = self.level_count - 1
            with self._lock:
                peak = float(np.asarray(self._zarr_level(coarsest)[...]).max())
            self._white = white_level(dtype, peak)
        return self._white

    def level_array(self, level: int = 0, chunk: int = 1024):
        """Level `level` as a lazy dask array (H, W, 3) uint8; nothing is read until computed, and
        a damaged tile raises `SlideError` naming the file when it is."""
        import dask.array as da

        height, width = self.level_shapes[level]
        d = self.level_downsamples[level]
        chunks = (_chunks(height, chunk), _chunks(width, chunk), (3,))

        def read_block(block_info=None):
            (r0, r1), (c0, c1), _ = block_info[None]["array-location"]
            if self.backend == "tifffile":
                return self._read_level(level, r0, r1, c0, c1)
            return self.read_region(int(round(c0 * d)), int(round(r0 * d)), c1 - c0, r1 - r0, level)

        return da.map_blocks(read_block, chunks=chunks, dtype=np.uint8, meta=np.empty((0, 0, 3), np.uint8))

    def band_rows(self, level: int, step: int, rows: int = 1024) -> int:
        """Rows to read at once when striding a level by `step`: a multiple of `step` and of the
        level's tile (chunk) height, so each stored tile is decoded at most once."""
        import math

        chunk = 1
        if self.backend == "tifffile":
            with self._lock:
                chunk = int(self._zarr_level(level).chunks[0])
        band = math.lcm(step, chunk)
        if band > 8 * rows:  # an odd tile height: close to it, a tile may be decoded twice
            band = step * max(1, rows // step)
        return band * max(1, rows // band)

    def thumbnail_level(self, max_side: int = 2048) -> int:
        """The finest level whose longer side is at most `max_side` (else the coarsest)."""
        for level, (h, w) in enumerate(self.level_shapes):
            if max(h, w) <= max_side:
                return level
        return self.level_count - 1

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.close()

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self):  # a Slide travels to Dask workers as its path and reopens there
        return {"path": str(self.path), "backend": self.backend, "mpp": self.mpp}

    def __setstate__(self, state):
        other = open_slide(state["path"], backend=state["backend"], mpp=state["mpp"])
        self.__dict__.update(other.__dict__)


def _chunks(length: int, chunk: int) -> tuple[int, ...]:
    full, rest = divmod(length, chunk)
    return (chunk,) * full + ((rest,) if rest else ())


def _to_rgb(data: np.ndarray, white: float) -> np.ndarray:
    """uint8 RGB of a level window: gray repeated to 3 channels, other dtypes scaled by `white`."""
    if data.ndim == 2:
        data = np.repeat(data[..., None], 3, axis=-1)
    if data.dtype != np.uint8:
        data = np.round(data.astype(np.float32) * (255.0 / max(white, 1e-9))).clip(0, 255).astype(np.uint8)
    return data[..., :3]


def _large_chunked(page) -> bool:
    """At least `LARGE_PLAIN_SIDE` on a side and stored in tiles or several strips (readable in parts)."""
    chunked = page.is_tiled or len(page.dataoffsets) > 1
    return bool(chunked and max(page.shape[:2]) >= LARGE_PLAIN_SIDE)


def whole_read_problem(page) -> str | None:
    """Why a TIFF page must not be read whole, or None: at least `LARGE_PLAIN_SIDE` px on a side
    but stored as one strip, so it can be read neither in parts (as a slide) nor in memory."""
    height, width = int(page.imagelength), int(page.imagewidth)
    if page.is_tiled or len(page.dataoffsets) > 1 or max(height, width) < LARGE_PLAIN_SIDE:
        return None
    return (f"a {width}×{height} TIFF stored as one strip cannot be read in parts and is too large to load "
            f"whole; save it tiled (e.g. vips tiffsave IN OUT.tif --tile --pyramid) and run again")


def is_slide(path: str | Path) -> bool:
    """Whether `path` is read as a whole slide: ``.svs``/``.ndpi``/``.mrxs``, or a TIFF that is
    tiled and pyramidal, or at least `LARGE_PLAIN_SIDE` px on a side and stored in tiles or
    strips (read in parts, never whole); a smaller plain TIFF is an image."""
    path = Path(path)
    suffix = _suffix(path)
    if suffix in OPENSLIDE_SUFFIXES:
        return True
    if suffix not in TIFF_SUFFIXES + (".ome.tif",) or not path.is_file():
        return False
    try:
        import tifffile

        with tifffile.TiffFile(str(path)) as tiff:
            series = tiff.series[0]
            page = tiff.pages[0]
            pyramidal = len(series.levels) > 1
            return bool((page.is_tiled and pyramidal) or _large_chunked(page))
    except Exception:  # noqa: BLE001 - unreadable files are not slides here; open_slide explains
        return False


def open_slide(path: str | Path, *, backend: str = "auto", mpp: float | None = None) -> Slide:
    """Opens a whole-slide image lazily.

    Args:
        path: ``.svs``, ``.ndpi``, ``.mrxs``, ``.ome.tif`` or a tiled/pyramidal ``.tif``.
        backend: ``auto`` (OpenSlide for svs/ndpi/mrxs, tifffile for TIFF), ``openslide`` or ``tifffile``.
        mpp: µm per level-0 pixel, overriding (or supplying missing) metadata.

    Raises:
        SlideError: one line naming the file: missing, unsupported format, not a tiled or
            pyramidal slide, truncated or corrupt, or an invalid `mpp`.
    """
    path = Path(path)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if mpp is not None and mpp_problem(mpp):
        raise SlideError(f"{path}: {mpp_problem(mpp)}")
    if not path.exists():
        raise SlideError(f"{path}: no such slide file")
    suffix = _suffix(path)
    if suffix not in SLIDE_SUFFIXES + (".ome.tif",):
        raise SlideError(f"{path}: unsupported slide format {suffix or '(no suffix)'} "
                         f"(supported: {' '.join(SLIDE_SUFFIXES)} .ome.tif)")
    if backend == "auto":
        backend = "openslide" if suffix in OPENSLIDE_SUFFIXES else "tifffile"
    if backend == "tifffile" and suffix == ".mrxs":
        raise SlideError(f"{path}: MIRAX slides need the openslide backend")
    if suffix != ".mrxs":
        _check_tiff(path, require_tiled=backend == "tifffile")
    slide = _open_openslide(path) if backend == "openslide" else _open_tifffile(path)
    if mpp is not None:
        slide.mpp = float(mpp)
    return slide


def _check_tiff(path: Path, require_tiled: bool) -> None:
    import tifffile

    try:
        with tifffile.TiffFile(str(path)) as tiff:
            _check_tiff_extents(path, tiff)
            page = tiff.pages[0]
            if require_tiled and not page.is_tiled and len(tiff.series[0].levels) < 2 and not _large_chunked(page):
                raise SlideError(f"{path}: not a whole slide (a plain, untiled TIFF of shape {page.shape}); "
                                 "open it as an image instead")
    except SlideError:
        raise
    except Exception as error:  # noqa: BLE001
        raise SlideError(f"{path}: truncated or corrupt slide ({type(error).__name__}: {_one_line(error)})") from None


def _open_openslide(path: Path) -> Slide:
    try:
        import openslide
    except ImportError as error:
        raise SlideError(f"{path}: the openslide backend needs openslide-python and openslide-bin "
                         f"(pip install openslide-python openslide-bin): {error}") from None
    try:
        handle = openslide.OpenSlide(str(path))
    except Exception as error:  # noqa: BLE001 - OpenSlideError, UnsupportedFormat, …
        raise SlideError(f"{path}: cannot open slide with OpenSlide "
                         f"({type(error).__name__}: {_one_line(error) or 'unsupported or corrupt'})") from None
    mpp = handle.properties.get("openslide.mpp-x")
    shapes = [(h, w) for w, h in handle.level_dimensions]
    return Slide(path, "openslide", shapes, handle.level_downsamples, float(mpp) if mpp else None, handle)


def _open_tifffile(path: Path) -> Slide:
    import tifffile

    try:
        tiff = tifffile.TiffFile(str(path))
    except Exception as error:  # noqa: BLE001
        raise SlideError(f"{path}: truncated or corrupt slide ({type(error).__name__}: {_one_line(error)})") from None
    try:
        series = tiff.series[0]
        axes = series.axes
        levels = series.levels
        if axes not in ("YXS", "YX") or (axes == "YXS" and series.shape[-1] not in (3, 4)):
            raise SlideError(f"{path}: not an RGB or gray slide (axes {axes}, shape {series.shape})")
        shapes = [level.shape[:2] for level in levels]
        downsamples = [shapes[0][1] / shape[1] for shape in shapes]
        mpp = _tiff_mpp(tiff)
    except SlideError:
        tiff.close()
        raise
    except Exception as error:  # noqa: BLE001
        tiff.close()
        raise SlideError(f"{path}: cannot read slide structure ({type(error).__name__}: {_one_line(error)})") from None
    return Slide(path, "tifffile", shapes, downsamples, mpp, tiff)


# --------------------------------------------------------------------------- tissue


def detect_tissue(slide: Slide, *, max_side: int = 2048, min_saturation: float = 0.04,
                  closing_um: float = 50.0, min_area_um2: float = 5000.0, mpp: float | None = None) -> TissueMask:
    """Tissue on a low-resolution level: Otsu on the HSV saturation (on a gray slide, where no
    pixel has colour, on the darkness 1 − value), small holes closed.

    The level read is the finest with a longer side of at most `max_side` pixels (a
    thumbnail-sized image). Saturation above max(Otsu, `min_saturation`) is tissue; it
    is closed with a disk of `closing_um` µm; holes (not reaching the slide's edge) and specks
    smaller than `min_area_um2` µm² are filled and removed (µm/px: `mpp`, else the slide's, else 0.25).

    Returns:
        A `TissueMask` covering the whole slide.
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu
    from skimage.morphology import remove_small_objects

    level = slide.thumbnail_level(max_side)
    height, width = slide.level_shapes[level]
    downsample = slide.level_downsamples[level]
    if max(height, width) > max_side:  # the coarsest level is still large: read in bands and stride
        step = int(np.ceil(max(height, width) / max_side))
        band = slide.band_rows(level, step)
        rows = [slide.read_region(0, int(y * downsample), width, min(band, height - y), level)[::step, ::step]
                for y in range(0, height, band)]
        rgb, downsample = np.concatenate(rows), downsample * step
    else:
        rgb = slide.read_region(0, 0, width, height, level)
    rgb = rgb.astype(np.float32)
    high, low = rgb.max(axis=-1), rgb.min(axis=-1)
    saturation = np.where(high > 0, (high - low) / np.maximum(high, 1), 0.0)
    if float(saturation.max()) < min_saturation:  # a gray slide: no colour anywhere; tissue is darker than glass
        saturation = 1.0 - high / 255.0
    threshold = min_saturation
    if saturation.max() - saturation.min() > 1e-3:
        threshold = max(float(threshold_otsu(saturation)), min_saturation)
    mask = saturation > threshold
    px_um = (mpp or slide.mpp or 0.25) * downsample
    radius = max(1, int(round(closing_um / px_um / 2)))
    # closing with a disk of `radius` via distance transforms (linear time, any radius)
    padded = np.pad(mask, radius + 1)
    dilated = ndimage.distance_transform_edt(~padded) <= radius
    mask = (ndimage.distance_transform_edt(dilated) > radius)[radius + 1:-radius - 1, radius + 1:-radius - 1]
    area = max(1, int(round(min_area_um2 / px_um ** 2)))
    holes, _ = ndimage.label(~mask)
    sizes = np.bincount(holes.ravel())
    open_background = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
    small = sizes < area
    small[0] = False
    small[open_background] = False  # background reaching the slide's edge is never a hole
    mask = remove_small_objects(mask | small[holes], max_size=area)
    return TissueMask(mask=np.ascontiguousarray(mask), downsample=float(downsample))
