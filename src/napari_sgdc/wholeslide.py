"""Whole-slide segmentation: `segment_slide` streams tiles of a `Slide` through a model
into a chunked OME-Zarr store, with bounded memory, resume, seams resolved by ownership,
an object table, QuPath GeoJSON, and optional execution on a Dask cluster.

Geometry. Everything is computed on the *working grid*: the slide resampled to the
model's µm/px (``ModelConfig.mpp``; the slide's own level-0 resolution when the model's
is unknown). The slide is read at the coarsest level that is at least that fine
(`Slide.best_level`) and resampled (bilinear, Gaussian pre-filter when shrinking) where
the level's pixel size differs by more than 0.5 %. The grid is cut into square *cores*
of ``tile`` pixels, which are also the chunks of every level-0 array in the store.

One tile (phase 1, one task): the core plus a ``margin`` on every side is read and run
through the model in one pass (`napari_sgdc.inference.predict_maps`), then through the
one post-processing stage (`napari_sgdc.postprocess.postprocess`). Ownership rule: the
tile keeps exactly the objects whose centroid lies in its core (half-open, so every
centroid has exactly one owner); an object is whole because it lies inside the window
(objects that reach the window's edge are larger than the margin and are dropped and
counted as ``too_large``). The core's probability and boundary are written to their
chunk; the owned objects' local labels go to a scratch array; their measurements and
polygons to a per-tile record, written last (the record marks the tile done).

Labels (phase 2, one task per chunk): a chunk's labels are pasted from the owned objects
of its tile and its 8 neighbours (margin <= tile), with global ids = the tile's offset
(the number of objects owned by the tiles before it in row-major order) + local id, so
ids are unique, 1..N, and independent of the order or the machines tiles ran on.
Where objects of different tiles overlap, the first painted wins (own tile, then
neighbours in row-major order). Phase 3 builds the pyramid levels chunk by chunk.

Resume: tiles whose record exists are not run again; phases 2 and 3 are recomputed
(deterministic), so a resumed store equals an uninterrupted run's. Memory: one window
of the model plus a few chunks, independent of the slide size.

Store layout (zarr v2, OME-NGFF 0.4)::

    S.ome.zarr/            multiscale image, axes (c, y, x): c = probability, boundary (uint8, p·255;
                           the separation map for distance and HoVer models)
    S.ome.zarr/labels/nuclei   multiscale int32 instance labels (0 = background)
    S.ome.zarr/labels/tissue   uint8 tissue mask (1 = tissue, 2 = tissue and processed) at thumbnail scale
    S.ome.zarr/tiles/i_j.npz   per-tile object records (`export_objects` reads them)

Scale-out: pass a ``dask.distributed`` ``Client``; tasks carry the slide path and the
store path, each worker opens the slide and loads (or receives) the model once. Tasks are
idempotent, so a task lost with a worker is simply run again elsewhere.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .imageio import atomic_write
from .postprocess import PostprocessOptions, postprocess
from .slide import Slide, SlideError, TissueMask, detect_tissue, open_slide

__all__ = ["SlideResult", "StoreExistsError", "export_objects", "read_store_labels", "segment_slide",
           "OBJECT_COLUMNS", "DEFAULT_TILE", "DEFAULT_MARGIN"]

DEFAULT_TILE = 1024
DEFAULT_MARGIN = 64
OBJECT_COLUMNS = ("id", "centroid_x_um", "centroid_y_um", "area_um2", "bbox_x0_um", "bbox_y0_um", "bbox_x1_um",
                  "bbox_y1_um", "mean_probability")
FORMAT = "napari-sgdc-wholeslide/1"
_SCRATCH = "_work"
_RESAMPLE_TOLERANCE = 0.005


class StoreExistsError(FileExistsError):
    """The output store exists and neither ``resume`` nor ``overwrite`` was asked for."""


@dataclass
class SlideResult:
    """Summary of a `segment_slide` run.

    Attributes:
        store: the OME-Zarr store.
        n_objects: objects (instances) found.
        tiles_total: tiles of the grid; tiles_run: tiles with tissue (run or resumed);
        tiles_resumed: tiles already done by an earlier run.
        too_large: objects dropped because they reached a window's edge (larger than the margin).
        mpp: µm per pixel of the outputs (the working grid); shape: its (height, width).
        level: slide level read; tissue_fraction: of the grid's tiles, the share run.
        seconds: wall time.
    """

    store: Path
    n_objects: int
    tiles_total: int
    tiles_run: int
    tiles_resumed: int
    too_large: int
    mpp: float
    shape: tuple[int, int]
    level: int
    tissue_fraction: float
    seconds: float


@dataclass(frozen=True)
class _Plan:
    """Everything a task needs (picklable, small)."""

    slide_path: str
    backend: str
    slide_mpp: float
    level: int
    level_downsample: float
    factor: float  # level pixels per working pixel
    mpp: float  # working µm/px
    height: int
    width: int
    tile: int
    margin: int
    store: str
    threshold: float
    boundary_threshold: float
    min_size: int
    instances: bool
    roi: tuple[int, int, int, int]  # working px: y0, x0, y1, x1
    threads: int = 0
    amp: bool = False  # bf16 autocast where the device runs it natively

    @property
    def grid(self) -> tuple[int, int]:
        return math.ceil(self.height / self.tile), math.ceil(self.width / self.tile)

    @property
    def window(self) -> int:
        return self.tile + 2 * self.margin

    @property
    def to_level0(self) -> float:
        """Level-0 slide pixels per working pixel."""
        return self.factor * self.level_downsample

    def options(self) -> PostprocessOptions:
        return PostprocessOptions(self.threshold, self.boundary_threshold, self.min_size)

    def signature(self) -> dict:
        """What must match for a resume (threads do not matter)."""
        values = asdict(self)
        values.pop("threads")
        values.pop("store")
        return values


# --------------------------------------------------------------------------- reading on the working grid


_SLIDES: dict[tuple, Slide] = {}
_SLIDES_LOCK = threading.Lock()


def _worker_slide(plan: _Plan) -> Slide:
    """The slide, opened once per process."""
    key = (plan.slide_path, plan.backend, plan.slide_mpp)
    with _SLIDES_LOCK:
        if key not in _SLIDES:
            _SLIDES[key] = open_slide(plan.slide_path, backend=plan.backend, mpp=plan.slide_mpp)
        return _SLIDES[key]


def read_working(slide: Slide, plan: _Plan, y0: int, x0: int, height: int, width: int) -> np.ndarray:
    """(height, width, 3) uint8 of the working grid at working pixel (y0, x0); white outside the slide."""
    d, f, level = plan.level_downsample, plan.factor, plan.level
    if abs(f - 1.0) <= _RESAMPLE_TOLERANCE:
        return slide.read_region(int(round(x0 * d)), int(round(y0 * d)), width, height, level)
    from scipy import ndimage

    sigma = max(0.0, (f - 1.0) / 2.0)
    pad = 2 + int(math.ceil(3 * sigma))
    rows = (np.arange(y0, y0 + height) + 0.5) * f - 0.5  # level coordinates of working pixel centres
    cols = (np.arange(x0, x0 + width) + 0.5) * f - 0.5
    r0, c0 = int(math.floor(rows[0])) - pad, int(math.floor(cols[0])) - pad
    r1, c1 = int(math.ceil(rows[-1])) + pad + 1, int(math.ceil(cols[-1])) + pad + 1
    region = slide.read_region(int(round(c0 * d)), int(round(r0 * d)), c1 - c0, r1 - r0, level).astype(np.float32)
    out = np.empty((height, width, 3), np.uint8)
    grid = np.meshgrid(rows - r0, cols - c0, indexing="ij")
    for channel in range(3):
        plane = region[..., channel]
        if sigma > 0:
            plane = ndimage.gaussian_filter(plane, sigma, mode="nearest")
        sampled = ndimage.map_coordinates(plane, grid, order=1, mode="nearest")
        out[..., channel] = np.clip(np.round(sampled), 0, 255).astype(np.uint8)
    return out


# --------------------------------------------------------------------------- the model on workers


_MODELS: dict[object, object] = {}


def _model_config(model):
    """The config of a model object, or of a built-in name / checkpoint path (read from its
    metadata: the main process of a cluster run does not load the weights)."""
    if isinstance(model, (str, Path)):
        from .io import read_model_config

        return read_model_config(model)
    return getattr(model, "config", None)


def _resolve_model(model):
    """A model object from a model, a built-in name or a checkpoint path (loaded once per process)."""
    if isinstance(model, (str, Path)):
        key = str(model)
        if key not in _MODELS:
            from .io import load_model

            _MODELS[key] = load_model(key, device="cpu")
        return _MODELS[key]
    return model


# --------------------------------------------------------------------------- store


def _open_group(store: str | Path, mode: str = "r+"):
    import zarr

    return zarr.open_group(str(store), mode=mode, zarr_format=2)


def _compressor():
    from numcodecs import Blosc

    return Blosc(cname="zstd", clevel=3, shuffle=Blosc.BITSHUFFLE)


def _n_levels(plan: _Plan) -> int:
    levels, side = 1, max(plan.height, plan.width)
    while side > plan.tile and levels < 12:
        side = math.ceil(side / 2)
        levels += 1
    return levels


def _level_shape(plan: _Plan, level: int) -> tuple[int, int]:
    return math.ceil(plan.height / 2 ** level), math.ceil(plan.width / 2 ** level)


def _create_store(plan: _Plan, tissue: TissueMask, processed: np.ndarray, name: str) -> None:
    root = _open_group(plan.store, mode="w")
    levels = _n_levels(plan)
    for level in range(levels):
        h, w = _level_shape(plan, level)
        root.create_array(str(level), shape=(2, h, w), chunks=(1, plan.tile, plan.tile), dtype="uint8",
                          fill_value=0, compressors=_compressor(), chunk_key_encoding={"name": "v2", "separator": "/"})
    labels = root.create_group("labels")
    nuclei = labels.create_group("nuclei")
    for level in range(levels):
        h, w = _level_shape(plan, level)
        nuclei.create_array(str(level), shape=(h, w), chunks=(plan.tile, plan.tile), dtype="int32", fill_value=0,
                            compressors=_compressor(), chunk_key_encoding={"name": "v2", "separator": "/"})
    tissue_group = labels.create_group("tissue")
    # the tissue mask, with 2 where the tile grid was processed
    tissue_map = tissue.mask.astype(np.uint8)
    tissue_group.create_array("0", shape=tissue_map.shape, chunks=tissue_map.shape, dtype="uint8", fill_value=0,
                              compressors=_compressor())[...] = tissue_map + _processed_on(tissue, processed, plan)
    ny, nx = plan.grid
    scratch = root.create_group(_SCRATCH)
    scratch.create_array("owned", shape=(ny, nx, plan.window, plan.window), chunks=(1, 1, plan.window, plan.window),
                         dtype="int32", fill_value=0, compressors=_compressor(), chunk_key_encoding={"name": "v2", "separator": "/"})
    (Path(plan.store) / "tiles").mkdir(exist_ok=True)
    um = plan.mpp
    tissue_um = plan.slide_mpp * tissue.downsample
    axes_yx = [{"name": "y", "type": "space", "unit": "micrometer"}, {"name": "x", "type": "space", "unit": "micrometer"}]
    datasets = [{"path": str(level), "coordinateTransformations": [
        {"type": "scale", "scale": [1.0, um * 2 ** level, um * 2 ** level]}]} for level in range(levels)]
    root.attrs.update({
        "multiscales": [{"version": "0.4", "name": name, "axes": [{"name": "c", "type": "channel"}] + axes_yx,
                         "datasets": datasets, "type": "mean"}],
        "omero": {"channels": [
            {"label": "probability", "color": "FF00FF", "window": {"start": 0, "end": 255, "min": 0, "max": 255}},
            {"label": "boundary", "color": "00FFFF", "window": {"start": 0, "end": 255, "min": 0, "max": 255}}]},
        "napari_sgdc": {"format": FORMAT, "complete": False, "plan": plan.signature(),
                        "probability_scale": "uint8 = round(255 * p)"},
    })
    labels.attrs["labels"] = ["nuclei", "tissue"]
    nuclei.attrs.update({"multiscales": [{"version": "0.4", "name": "nuclei", "axes": axes_yx, "datasets": [
        {"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": [um * 2 ** level] * 2}]}
        for level in range(levels)], "type": "nearest"}], "image-label": {"version": "0.4", "source": {"image": "../../"}}})
    tissue_group.attrs.update({"multiscales": [{"version": "0.4", "name": "tissue", "axes": axes_yx, "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [tissue_um, tissue_um]}]}]}],
        "image-label": {"version": "0.4", "source": {"image": "../../"},
                        "colors": [{"label-value": 1, "rgba": [0, 160, 0, 96]},
                                   {"label-value": 2, "rgba": [0, 255, 0, 96]}]}})


def _processed_on(tissue: TissueMask, processed: np.ndarray, plan: _Plan) -> np.ndarray:
    """1 on the tissue-mask pixels whose tile was run (so the saved mask shows what was skipped)."""
    rows = ((np.arange(tissue.mask.shape[0]) + 0.5) * tissue.downsample / plan.to_level0 // plan.tile).astype(int)
    cols = ((np.arange(tissue.mask.shape[1]) + 0.5) * tissue.downsample / plan.to_level0 // plan.tile).astype(int)
    rows, cols = np.clip(rows, 0, processed.shape[0] - 1), np.clip(cols, 0, processed.shape[1] - 1)
    return (processed[rows[:, None], cols[None, :]] & tissue.mask).astype(np.uint8)


def _record_path(plan: _Plan, i: int, j: int) -> Path:
    return Path(plan.store) / "tiles" / f"{i}_{j}.npz"


# --------------------------------------------------------------------------- phase 1: one tile


def _tile_task(plan: _Plan, model, i: int, j: int) -> int:
    """Runs tile (i, j) and writes its chunk, owned labels and record; returns its object count."""
    import torch
    from scipy import ndimage

    from .inference import predict_maps

    record = _record_path(plan, i, j)
    if record.exists():
        return int(np.load(record)["ids"].size)
    if plan.threads:
        torch.set_num_threads(plan.threads)
    model = _resolve_model(model)
    slide = _worker_slide(plan)
    t, m = plan.tile, plan.margin
    y0, x0 = i * t, j * t
    wy, wx = y0 - m, x0 - m
    rgb = read_working(slide, plan, wy, wx, plan.window, plan.window)
    prob, separation = predict_maps(model, rgb, tile=None, amp=plan.amp)
    options = plan.options()
    mask, labels = postprocess(prob, separation, options, single_object=False, instances=plan.instances)
    if labels is None:
        labels = ndimage.label(mask, structure=np.ones((3, 3), bool))[0].astype(np.int32)
    root = _open_group(plan.store)
    core_h, core_w = min(t, plan.height - y0), min(t, plan.width - x0)
    core = (slice(m, m + core_h), slice(m, m + core_w))
    quantised = np.stack([prob[core], separation[core]])
    root["0"][:, y0:y0 + core_h, x0:x0 + core_w] = np.round(np.clip(quantised, 0, 1) * 255).astype(np.uint8)

    n = int(labels.max())
    ids = np.arange(1, n + 1)
    owned_local = np.zeros(0, np.int64)
    too_large = 0
    stats = {}
    if n:
        rows, cols = np.indices(labels.shape)
        area = np.bincount(labels.ravel(), minlength=n + 1)[1:].astype(np.float64)
        cy = np.bincount(labels.ravel(), weights=rows.ravel(), minlength=n + 1)[1:] / np.maximum(area, 1)
        cx = np.bincount(labels.ravel(), weights=cols.ravel(), minlength=n + 1)[1:] / np.maximum(area, 1)
        mean_p = np.bincount(labels.ravel(), weights=prob.ravel().astype(np.float64), minlength=n + 1)[1:] \
            / np.maximum(area, 1)
        gy, gx = cy + wy, cx + wx  # global working coordinates of the centroids
        ry0, rx0, ry1, rx1 = plan.roi
        own = (area > 0) & (gy >= y0) & (gy < y0 + t) & (gx >= x0) & (gx < x0 + t) \
            & (gy >= ry0) & (gy < ry1) & (gx >= rx0) & (gx < rx1)
        edge = np.zeros(n + 1, bool)
        for border in (labels[0], labels[-1], labels[:, 0], labels[:, -1]):
            edge[border] = True
        touching = edge[1:]
        too_large = int((own & touching).sum())
        own &= ~touching
        owned_local = ids[own]
        stats = {"centroid_y": gy[own], "centroid_x": gx[own], "area": area[own], "mean_probability": mean_p[own]}
    remap = np.zeros(n + 1, np.int32)
    remap[owned_local] = np.arange(1, owned_local.size + 1, dtype=np.int32)
    owned = remap[labels]
    if owned_local.size:
        root[f"{_SCRATCH}/owned"][i, j] = owned
    boxes = ndimage.find_objects(owned)
    bbox = np.array([[b[0].start + wy, b[1].start + wx, b[0].stop + wy, b[1].stop + wx] for b in boxes],
                    np.int64).reshape(-1, 4)
    points, offsets = _polygons(owned, boxes, wy, wx, plan.to_level0)
    arrays = {"ids": np.arange(1, owned_local.size + 1), "bbox": bbox, "poly_xy": points, "poly_offsets": offsets,
              "too_large": np.array(too_large)}
    for name in ("centroid_y", "centroid_x", "area", "mean_probability"):
        arrays[name] = stats.get(name, np.zeros(0))

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as stream:
            np.savez(stream, **arrays)

    atomic_write(record, write)
    return int(owned_local.size)


def _drop_collinear(ring: np.ndarray) -> np.ndarray:
    """A closed (N, 2) ring (first point = last) without its collinear vertices: the same polygon.

    Marching-squares contours of a pixel mask run in straight steps (axis-parallel and 45°),
    so this removes about 60 % of the points, vectorised (Douglas-Peucker in
    `skimage.measure.approximate_polygon` was about 80 % of the polygon step's time).
    """
    points = ring[:-1]
    if len(points) < 4:
        return ring
    before, after = np.roll(points, 1, axis=0), np.roll(points, -1, axis=0)
    cross = (points[:, 0] - before[:, 0]) * (after[:, 1] - points[:, 1]) \
        - (points[:, 1] - before[:, 1]) * (after[:, 0] - points[:, 0])
    kept = points[np.abs(cross) > 1e-9]
    return np.concatenate([kept, kept[:1]]) if len(kept) >= 3 else ring


def _polygons(owned: np.ndarray, boxes, wy: int, wx: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Outer contour of every owned object, in level-0 slide pixels (x, y), concatenated with offsets."""
    from skimage.measure import find_contours

    chunks, offsets = [], [0]
    for index, box in enumerate(boxes, start=1):
        crop = np.pad(owned[box] == index, 1).astype(np.float32)
        contours = find_contours(crop, 0.5)
        ring = _drop_collinear(max(contours, key=len)) if contours else np.zeros((0, 2))
        # contour (row, col) in the padded crop → pixel-corner coordinates: col - 1 + 0.5 (pad, centre)
        xy = np.stack([ring[:, 1] - 0.5 + box[1].start + wx, ring[:, 0] - 0.5 + box[0].start + wy], axis=1) * scale
        chunks.append(xy.astype(np.float32))
        offsets.append(offsets[-1] + len(xy))
    points = np.concatenate(chunks) if chunks else np.zeros((0, 2), np.float32)
    return points, np.asarray(offsets, np.int64)


# --------------------------------------------------------------------------- phase 2 and 3: labels and pyramid


def _label_chunk_task(plan: _Plan, i: int, j: int, offsets: dict) -> None:
    """Pastes the owned objects of tile (i, j) and its neighbours into label chunk (i, j)."""
    root = _open_group(plan.store)
    t, m, window = plan.tile, plan.margin, plan.window
    y0, x0 = i * t, j * t
    h, w = min(t, plan.height - y0), min(t, plan.width - x0)
    out = np.zeros((h, w), np.int32)
    owned = root[f"{_SCRATCH}/owned"]
    ny, nx = plan.grid
    neighbours = [(i, j)] + [(a, b) for a in range(i - 1, i + 2) for b in range(j - 1, j + 2) if (a, b) != (i, j)]
    for a, b in neighbours:
        if not (0 <= a < ny and 0 <= b < nx) or offsets.get((a, b), (0, 0))[1] == 0:
            continue
        wy, wx = a * t - m, b * t - m  # window origin of tile (a, b)
        r0, r1 = max(y0, wy), min(y0 + h, wy + window)
        c0, c1 = max(x0, wx), min(x0 + w, wx + window)
        if r1 <= r0 or c1 <= c0:
            continue
        local = np.asarray(owned[a, b, r0 - wy:r1 - wy, c0 - wx:c1 - wx])
        target = out[r0 - y0:r1 - y0, c0 - x0:c1 - x0]
        paint = (local > 0) & (target == 0)
        target[paint] = local[paint] + offsets[(a, b)][0]
    root["labels/nuclei/0"][y0:y0 + h, x0:x0 + w] = out


def _pyramid_task(plan: _Plan, level: int, i: int, j: int) -> None:
    """Chunk (i, j) of pyramid level `level` (>= 1) from level − 1: 2×2 mean for the image,
    the top-left pixel of each 2×2 block for the labels."""
    root = _open_group(plan.store)
    t = plan.tile
    h, w = _level_shape(plan, level)
    y0, x0 = i * t, j * t
    y1, x1 = min(y0 + t, h), min(x0 + t, w)
    source = np.asarray(root[str(level - 1)][:, 2 * y0:2 * y1, 2 * x0:2 * x1]).astype(np.float32)
    ph, pw = 2 * (y1 - y0) - source.shape[1], 2 * (x1 - x0) - source.shape[2]
    if ph or pw:
        source = np.pad(source, ((0, 0), (0, ph), (0, pw)), mode="edge")
    mean = source.reshape(2, y1 - y0, 2, x1 - x0, 2).mean(axis=(2, 4))
    root[str(level)][:, y0:y1, x0:x1] = np.round(mean).astype(np.uint8)
    labels = np.asarray(root[f"labels/nuclei/{level - 1}"][2 * y0:2 * y1:2, 2 * x0:2 * x1:2])
    root[f"labels/nuclei/{level}"][y0:y1, x0:x1] = labels


# --------------------------------------------------------------------------- execution


class _LocalExecutor:
    """Runs tasks one after the other in this process (the default: no cluster)."""

    def __init__(self, model):
        self.model = model

    def run(self, function, items: list, progress=None, cancel=None, with_model=False) -> list:
        from .inference import Cancelled

        results = []
        for done, item in enumerate(items, start=1):
            if cancel is not None and cancel.is_set():
                raise Cancelled("whole-slide segmentation cancelled")
            args = (self.model, *item[1:]) if with_model else item[1:]
            results.append(function(item[0], *args))
            if progress is not None:
                progress(done)
        return results


class _DaskExecutor:
    """Runs tasks on a dask.distributed Client; the model is sent to every worker once."""

    def __init__(self, client, model, retries: int = 3):
        self.client = client
        self.retries = retries
        if isinstance(model, (str, Path)):
            self.model = str(model)  # each worker loads it once (_resolve_model caches it)
        else:
            self.model = client.scatter(model, broadcast=True, hash=False)

    def run(self, function, items: list, progress=None, cancel=None, with_model=False) -> list:
        from distributed import as_completed

        from .inference import Cancelled

        futures = []
        for item in items:
            args = (self.model, *item[1:]) if with_model else item[1:]
            futures.append(self.client.submit(function, item[0], *args, pure=False, retries=self.retries))
        index = {future.key: n for n, future in enumerate(futures)}
        results: list = [None] * len(futures)
        try:
            for done, future in enumerate(as_completed(futures), start=1):
                if cancel is not None and cancel.is_set():
                    raise Cancelled("whole-slide segmentation cancelled")
                results[index[future.key]] = future.result()
                if progress is not None:
                    progress(done)
        except BaseException:
            self.client.cancel(futures)
            raise
        return results


# --------------------------------------------------------------------------- the public entry point


def _plan(config, slide: Slide, out: Path, roi, mpp, tile: int, margin: int, options: PostprocessOptions,
          threads: int, amp: bool = False) -> _Plan:
    model_mpp = float(getattr(config, "mpp", 0.0) or 0.0)
    slide_mpp = mpp if mpp is not None else slide.mpp
    if slide_mpp is None:
        raise SlideError(f"{slide.path}: the slide has no µm/px (mpp) in its metadata; pass mpp= (CLI: --mpp), "
                         "e.g. 0.25 for a 40x scan")
    if not 0.01 < float(slide_mpp) < 100:
        raise SlideError(f"{slide.path}: mpp must be in (0.01, 100) µm per pixel, got {slide_mpp!r}")
    slide.mpp = float(slide_mpp)
    if model_mpp <= 0:
        warnings.warn("the model does not record its µm/px (ModelConfig.mpp = 0): the slide is segmented at its "
                      "full resolution", stacklevel=3)
        model_mpp = slide.mpp
    level = slide.best_level(model_mpp)
    level_mpp = slide.level_mpp(level)
    factor = model_mpp / level_mpp
    if abs(factor - 1.0) <= _RESAMPLE_TOLERANCE:
        factor = 1.0
    height = int(math.ceil(slide.level_shapes[level][0] / factor))
    width = int(math.ceil(slide.level_shapes[level][1] / factor))
    if tile < 128 or tile % 32:
        raise ValueError(f"tile must be a multiple of 32 and at least 128, got {tile}")
    if margin < 0 or margin % 32 or margin > tile:
        raise ValueError(f"margin must be a multiple of 32 in [0, tile], got {margin}")
    to_level0 = factor * slide.level_downsamples[level]
    if roi is None:
        box = (0, 0, height, width)
    else:
        x, y, w, h = (float(v) for v in roi)
        if w <= 0 or h <= 0:
            raise ValueError(f"roi (x, y, width, height) needs a positive size, got {roi}")
        box = (max(0, int(y // to_level0)), max(0, int(x // to_level0)),
               min(height, int(math.ceil((y + h) / to_level0))), min(width, int(math.ceil((x + w) / to_level0))))
        if box[2] <= box[0] or box[3] <= box[1]:
            raise ValueError(f"roi {roi} lies outside the slide (level-0 size {slide.shape[1]}×{slide.shape[0]})")
    return _Plan(slide_path=str(Path(slide.path).resolve()), backend=slide.backend, slide_mpp=slide.mpp, level=level,
                 level_downsample=slide.level_downsamples[level], factor=factor, mpp=model_mpp, height=height,
                 width=width, tile=tile, margin=margin, store=str(out), threshold=options.threshold,
                 boundary_threshold=options.boundary_threshold, min_size=options.min_size,
                 instances=bool(getattr(config, "is_instance", True)), roi=box, threads=threads,
                 amp=bool(amp))


def _tiles_to_run(plan: _Plan, tissue: TissueMask | None) -> np.ndarray:
    """bool (ny, nx): tiles whose core meets the roi and the tissue.

    A tile owns the objects whose centroid lies in its core, and a centroid lies on the
    object, so on tissue: a core without tissue owns nothing, even when its margin (read
    by the neighbours that own the objects there) holds tissue. So only the core is
    tested; testing core + margin ran most blank tiles next to tissue.
    """
    ny, nx = plan.grid
    run = np.zeros((ny, nx), bool)
    ry0, rx0, ry1, rx1 = plan.roi
    s = plan.to_level0
    for i in range(ny):
        for j in range(nx):
            y0, x0 = i * plan.tile, j * plan.tile
            if y0 >= ry1 or y0 + plan.tile <= ry0 or x0 >= rx1 or x0 + plan.tile <= rx0:
                continue
            run[i, j] = tissue is None or tissue.any_in(x0 * s, y0 * s, (x0 + plan.tile) * s, (y0 + plan.tile) * s)
    return run


def segment_slide(model, slide: Slide | str | Path, out: str | Path, *, roi=None, tissue="auto",
                  mpp: float | None = None, tile: int = DEFAULT_TILE, margin: int = DEFAULT_MARGIN,
                  options: PostprocessOptions | None = None, progress: Callable[[int, int], None] | None = None,
                  cancel: threading.Event | None = None, resume: bool = False, overwrite: bool = False,
                  client=None, threads: int = 0, amp: bool = False) -> SlideResult:
    """Segments a whole slide into an OME-Zarr store (see the module docstring).

    Args:
        model: an `SGDCSegmenter` (or any module with ``.config`` and the same outputs), or a
            built-in model name / checkpoint path (then each Dask worker loads it itself).
        slide: a `Slide` or a slide path (opened with `open_slide`).
        out: the store directory to create, conventionally ``<stem>.ome.zarr``.
        roi: ``(x, y, width, height)`` in level-0 slide pixels; None = the whole slide. Objects
            whose centroid lies in the roi are kept whole.
        tissue: ``"auto"`` (`detect_tissue`, background tiles skipped), ``"none"`` (every tile),
            or a precomputed `TissueMask`.
        mpp: the slide's µm per level-0 pixel, overriding or supplying its metadata.
        tile: core (and chunk) size in working pixels (a multiple of 32, >= 128).
        margin: context added on every side of a core (multiple of 32, <= tile); objects larger
            than the margin are dropped (counted in ``too_large``).
        options: post-processing thresholds (default: the model's, `PostprocessOptions.for_model`).
        progress: ``progress(done, total)`` after every tile.
        cancel: a `threading.Event`; when set, the run stops after the current tile and raises
            `napari_sgdc.inference.Cancelled`; ``resume=True`` continues it later.
        resume: continue an interrupted run into an existing store made with the same settings.
        overwrite: replace an existing store (only one written by this function).
        client: a ``dask.distributed.Client``: tiles run as tasks on its cluster.
        threads: torch threads per task (0 = leave as is).
        amp: bf16 autocast for the network where the device runs bf16 natively (as in
            `napari_sgdc.inference.segment`); part of the settings a resume must match.

    Returns:
        A `SlideResult`.

    Raises:
        SlideError: a slide that cannot be read, or no µm/px; nothing is written.
        StoreExistsError: `out` exists and neither `resume` nor `overwrite` is set.
        Cancelled: `cancel` was set.
    """
    start = time.perf_counter()
    owned_slide = not isinstance(slide, Slide)
    if owned_slide:
        slide = open_slide(slide, mpp=mpp)
    try:
        out = Path(out)
        config = _model_config(model)
        options = options or PostprocessOptions.for_model(config)
        plan = _plan(config, slide, out.resolve(), roi, mpp, int(tile), int(margin), options, int(threads),
                     bool(amp))
        if out.exists():
            attrs = _store_attrs(out)
            if attrs is None:
                raise StoreExistsError(f"{out} exists and is not a napari-sgdc slide store; not replaced")
            if overwrite:
                shutil.rmtree(out)
            elif resume:
                stored = {"amp": False, **(attrs.get("plan") or {})}  # stores written before amp existed
                if stored != json.loads(json.dumps(plan.signature())):
                    raise ValueError(f"{out}: cannot resume: the store was made with other settings "
                                     "(slide, model µm/px, tile, margin, thresholds, roi or amp); use overwrite")
            else:
                raise StoreExistsError(f"{out} already exists; not replaced (resume or overwrite it)")
        if isinstance(tissue, TissueMask):
            tissue_mask = tissue
        elif tissue == "auto":
            tissue_mask = detect_tissue(slide)
        elif tissue in ("none", None):
            level = slide.thumbnail_level()
            h, w = slide.level_shapes[level]
            tissue_mask = TissueMask(np.ones((h, w), bool), slide.level_downsamples[level])
        else:
            raise ValueError(f"tissue must be 'auto', 'none' or a TissueMask, got {tissue!r}")
        run = _tiles_to_run(plan, tissue_mask)
        if not out.exists():
            _create_store(plan, tissue_mask, run, out.name.split(".")[0])
        tiles = [(int(i), int(j)) for i, j in zip(*np.nonzero(run))]
        resumed = sum(_record_path(plan, i, j).exists() for i, j in tiles)
        executor = _DaskExecutor(client, model) if client is not None else _LocalExecutor(model)
        pending = [(plan, i, j) for i, j in tiles if not _record_path(plan, i, j).exists()]

        def tile_done(done: int) -> None:
            if progress is not None:
                progress(resumed + done, len(tiles))

        counts_pending = executor.run(_tile_task, pending, tile_done, cancel, with_model=True)
        counts = dict(zip([(i, j) for _, i, j in pending], counts_pending))
        for i, j in tiles:
            if (i, j) not in counts:
                counts[(i, j)] = int(np.load(_record_path(plan, i, j))["ids"].size)
        offsets, total = {}, 0
        for key in sorted(counts):
            offsets[key] = (total, counts[key])
            total += counts[key]
        ny, nx = plan.grid
        chunks = sorted({(a, b) for i, j in tiles for a in range(i - 1, i + 2) for b in range(j - 1, j + 2)
                         if 0 <= a < ny and 0 <= b < nx})
        executor.run(_label_chunk_task, [(plan, a, b, _near(offsets, a, b)) for a, b in chunks], cancel=cancel)
        active = set(chunks)
        for level in range(1, _n_levels(plan)):
            active = sorted({(a // 2, b // 2) for a, b in active})
            executor.run(_pyramid_task, [(plan, level, a, b) for a, b in active], cancel=cancel)
        too_large = sum(int(np.load(_record_path(plan, i, j))["too_large"]) for i, j in tiles)
        shutil.rmtree(out / _SCRATCH, ignore_errors=True)  # the scratch labels are no longer needed
        root = _open_group(out)
        meta = dict(root.attrs["napari_sgdc"])
        meta.update({"complete": True, "n_objects": total, "too_large": too_large})
        root.attrs["napari_sgdc"] = meta
        return SlideResult(store=out, n_objects=total, tiles_total=ny * nx, tiles_run=len(tiles),
                           tiles_resumed=resumed, too_large=too_large, mpp=plan.mpp, shape=(plan.height, plan.width),
                           level=plan.level, tissue_fraction=len(tiles) / max(1, ny * nx),
                           seconds=time.perf_counter() - start)
    finally:
        if owned_slide:
            slide.close()


def _near(offsets: dict, i: int, j: int) -> dict:
    """The id offsets of tile (i, j) and its 8 neighbours (all a label chunk needs)."""
    return {(a, b): offsets[(a, b)] for a in range(i - 1, i + 2) for b in range(j - 1, j + 2) if (a, b) in offsets}


def _store_attrs(out: Path) -> dict | None:
    try:
        with open(out / ".zattrs") as stream:
            return json.load(stream).get("napari_sgdc")
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- outputs


def read_store_labels(store: str | Path, level: int = 0) -> np.ndarray:
    """The instance labels of a (small) store at pyramid `level`, in memory."""
    return np.asarray(_open_group(store, mode="r")[f"labels/nuclei/{level}"][...])


def _iter_records(store: Path) -> Iterable[tuple[int, dict]]:
    """(id offset, record) of every tile in row-major order."""
    keys = []
    for path in (store / "tiles").glob("*.npz"):
        i, j = path.stem.split("_")
        keys.append((int(i), int(j), path))
    offset = 0
    for _, _, path in sorted(keys):
        with np.load(path) as data:
            record = {name: data[name] for name in data.files}
        yield offset, record
        offset += int(record["ids"].size)


def export_objects(store: str | Path, table: str | Path | None = None, geojson: str | Path | None = None, *,
                   overwrite: bool = False) -> int:
    """Writes the object table (CSV, or Parquet for a ``.parquet`` path: needs pyarrow) and the
    QuPath GeoJSON (detections, polygons in level-0 slide pixels) of a finished store.

    Table columns: `OBJECT_COLUMNS` (µm on the slide, origin at its top-left corner).
    Streams tile by tile; returns the number of objects.
    """
    store = Path(store)
    attrs = _store_attrs(store)
    if attrs is None or not attrs.get("complete"):
        raise ValueError(f"{store}: not a finished napari-sgdc slide store")
    um = attrs["plan"]["mpp"]
    for path in (table, geojson):
        if path is not None and Path(path).exists() and not overwrite:
            raise FileExistsError(f"{path} already exists; not replaced (use overwrite)")
    count = 0

    def rows():
        for offset, record in _iter_records(store):
            for k in range(record["ids"].size):
                y0, x0, y1, x1 = record["bbox"][k]
                yield (offset + k + 1, (record["centroid_x"][k] + 0.5) * um, (record["centroid_y"][k] + 0.5) * um,
                       record["area"][k] * um * um, x0 * um, y0 * um, x1 * um, y1 * um,
                       record["mean_probability"][k])

    if table is not None:
        table = Path(table)
        if table.suffix.lower() == ".parquet":
            import pandas as pd

            frame = pd.DataFrame(list(rows()), columns=OBJECT_COLUMNS)
            atomic_write(table, lambda tmp: frame.to_parquet(tmp, index=False))
            count = len(frame)
        else:
            def write_csv(tmp: Path) -> None:
                nonlocal count
                with open(tmp, "w", newline="") as stream:
                    writer = csv.writer(stream)
                    writer.writerow(OBJECT_COLUMNS)
                    for row in rows():
                        writer.writerow([row[0]] + [f"{v:.4f}" for v in row[1:]])
                        count += 1

            atomic_write(table, write_csv)
    if geojson is not None:
        def write_geojson(tmp: Path) -> None:
            nonlocal count
            count = 0
            with open(tmp, "w") as stream:
                stream.write('{"type": "FeatureCollection", "features": [\n')
                first = True
                for offset, record in _iter_records(store):
                    points, offsets = record["poly_xy"], record["poly_offsets"]
                    for k in range(record["ids"].size):
                        ring = points[offsets[k]:offsets[k + 1]].astype(np.float64).round(2).tolist()
                        if len(ring) < 3:
                            continue
                        if ring[0] != ring[-1]:
                            ring.append(ring[0])
                        feature = {"type": "Feature", "id": f"nucleus-{offset + k + 1}",
                                   "geometry": {"type": "Polygon", "coordinates": [ring]},
                                   "properties": {"objectType": "detection", "name": str(offset + k + 1),
                                                  "classification": {"name": "Nucleus", "color": [255, 0, 255]},
                                                  "measurements": {
                                                      "area_um2": round(float(record["area"][k]) * um * um, 3),
                                                      "mean_probability": round(
                                                          float(record["mean_probability"][k]), 4)}}}
                        stream.write(("" if first else ",\n") + json.dumps(feature))
                        first = False
                        count += 1
                stream.write("\n]}\n")

        atomic_write(geojson, write_geojson)
    return count
