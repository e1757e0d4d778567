"""The tasks of a whole-slide run, each idempotent and given only the plan (and the model):

* `tile_task` (phase 1): one tile's window through the model and the post-processing; the
  core's maps, the owned objects' labels (scratch) and the object record (written last). It is
  three stages, `read_tile`, `tile_maps` (the network) and `decode_tile` (post-processing,
  polygons and the writes), which the single-process pipeline (`pipeline`) overlaps.
* `label_chunk_task` (phase 2): a label chunk pasted from the owned objects of its tile
  and its 8 neighbours with slide-wide ids.
* `pyramid_task` (phase 3): one chunk of a coarser pyramid level.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..files import atomic_write
from ..postprocess import assign_types, postprocess
from ..slide import SlideError
from .plan import SlidePlan, read_working
from .store import SCRATCH, SLIDE_LABEL_DTYPE, level_shape, open_group, record_path
from .workers import resolve_model, worker_slide

__all__ = ["Stages", "tile_task", "read_tile", "tile_maps", "decode_tile", "owned_objects", "label_chunk_task", "pyramid_task", "drop_collinear", "polygons", "haematoxylin_od"]

HE_STAINS = ((0.65111, 0.70119, 0.29049), (0.2159, 0.8012, 0.5581))
"""QuPath's default H&E stain vectors (haematoxylin, eosin): the OD a unit of each stain adds to R, G, B."""


class Stages:
    """Seconds spent per stage, summed over the tiles of a run (`SlideResult.stages`). Each stage may
    run on its own thread (the pipeline, `napari_sgdc.wholeslide.pipeline`), so adding is locked."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    @contextmanager
    def time(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)


def tile_task(plan: SlidePlan, model, i: int, j: int, stages: Stages | None = None) -> int:
    """Runs tile (i, j) and writes its chunk, owned labels and record; returns its object count.

    The three stages one after the other: `read_tile`, `tile_maps` (the network) and `decode_tile`
    (post-processing, owned objects, polygons, then the writes); the single-process pipeline
    (`napari_sgdc.wholeslide.pipeline`) runs the same three functions on three threads."""
    import torch

    record = record_path(plan, i, j)
    if record.exists():
        return int(np.load(record)["ids"].size)
    if plan.threads:
        torch.set_num_threads(plan.threads)
    stages = stages if stages is not None else Stages()
    model = resolve_model(model)
    with stages.time("read"):
        rgb = read_tile(plan, i, j)
    with stages.time("network"):
        maps = tile_maps(plan, model, rgb)
    return decode_tile(plan, i, j, rgb, maps, stages)


def read_tile(plan: SlidePlan, i: int, j: int) -> np.ndarray:
    """Tile (i, j)'s window (core + margins) on the working grid; a SlideError names the tile."""
    t, m = plan.tile, plan.margin
    wy, wx = i * t - m, j * t - m
    try:
        return read_working(worker_slide(plan), plan, wy, wx, plan.window, plan.window)
    except SlideError as error:  # a corrupted tile stops the run, named (docs/wholeslide.md)
        raise SlideError(f"{error} [tile {i},{j}: level-0 pixels x {int(wx * plan.to_level0)}, "
                         f"y {int(wy * plan.to_level0)}]") from None


def tile_maps(plan: SlidePlan, model, rgb: np.ndarray) -> tuple:
    """The network on one window: (probability, separation, type probabilities or None)."""
    from ..inference import predict_maps

    return predict_maps(model, rgb, tile=None, amp=plan.amp, tta=plan.tta, types=True, engine=plan.engine)


def decode_tile(plan: SlidePlan, i: int, j: int, rgb: np.ndarray, maps: tuple, stages: Stages | None = None) -> int:
    """Tile (i, j) from its window and maps: post-processing, the owned objects, their measurements and
    polygons (stage ``decode``, of which ``postprocess`` and ``polygons``), then the writes (stage
    ``write``): the core's maps, the owned labels (scratch) and the record, last (it marks the tile
    done). Returns the tile's object count."""
    from scipy import ndimage

    stages = stages if stages is not None else Stages()
    prob, separation, type_probability = maps
    t, m = plan.tile, plan.margin
    y0, x0 = i * t, j * t
    wy, wx = y0 - m, x0 - m
    with stages.time("decode"):
        with stages.time("postprocess"):
            mask, labels = postprocess(prob, separation, plan.options(), single_object=False,
                                       instances=plan.instances)
            if labels is None:
                labels = ndimage.label(mask, structure=np.ones((3, 3), bool))[0].astype(np.int32)
        core_h, core_w = min(t, plan.height - y0), min(t, plan.width - x0)
        core = (slice(m, m + core_h), slice(m, m + core_w))
        quantised = np.stack([prob[core], separation[core]])
        quantised = np.round(np.clip(quantised, 0, 1) * 255).astype(np.uint8)

        n = int(labels.max())
        owned_local, too_large, stats = owned_objects(plan, labels, prob, rgb, i, j)
        remap = np.zeros(n + 1, np.int32)
        remap[owned_local] = np.arange(1, owned_local.size + 1, dtype=np.int32)
        owned = remap[labels]
        boxes = ndimage.find_objects(owned)
        bbox = np.array([[b[0].start + wy, b[1].start + wx, b[0].stop + wy, b[1].stop + wx] for b in boxes],
                        np.int64).reshape(-1, 4)
        with stages.time("polygons"):
            points, offsets = polygons(owned, boxes, wy, wx, plan.to_level0)
        arrays = {"ids": np.arange(1, owned_local.size + 1), "bbox": bbox, "poly_xy": points,
                  "poly_offsets": offsets, "too_large": np.array(too_large)}
        for name in ("centroid_y", "centroid_x", "area", "mean_probability", "mean_haematoxylin_od"):
            arrays[name] = stats.get(name, np.zeros(0))
        if plan.type_names:  # each owned object's class (type id, 1..T) and its mean type probability
            arrays["class_id"], arrays["class_confidence"] = _owned_types(plan, labels, type_probability, owned_local)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as stream:
            np.savez(stream, **arrays)

    with stages.time("write"):
        root = open_group(plan.store)
        root["0"][:, y0:y0 + core_h, x0:x0 + core_w] = quantised
        if owned_local.size:
            root[f"{SCRATCH}/owned"][i, j] = owned
        atomic_write(record_path(plan, i, j), write)
    return int(owned_local.size)


def _owned_types(plan: SlidePlan, labels: np.ndarray, type_probability: np.ndarray | None,
                 owned_local: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int16 type id, float32 confidence) of each owned object (`napari_sgdc.postprocess.assign_types`)."""
    if type_probability is None:
        raise ValueError(f"the model gives no nucleus types, but the run {plan.store} records "
                         f"{len(plan.type_names)}: use the model that started it")
    types, confidence = assign_types(labels, type_probability)
    return types[owned_local].astype(np.int16), confidence[owned_local].astype(np.float32)


def owned_objects(plan: SlidePlan, labels: np.ndarray, prob: np.ndarray, rgb: np.ndarray, i: int,
                  j: int) -> tuple[np.ndarray, int, dict[str, np.ndarray]]:
    """The ownership rule for tile (i, j)'s window labels: the local ids whose centroid lies in the
    core and the roi and that do not reach the window's edge; how many reached it (too large); and
    the owned objects' measurements (global working centroids, area, mean probability and
    haematoxylin OD)."""
    n = int(labels.max())
    if not n:
        return np.zeros(0, np.int64), 0, {}
    t, m = plan.tile, plan.margin
    y0, x0 = i * t, j * t
    wy, wx = y0 - m, x0 - m
    flat = labels.ravel()
    rows, cols = np.indices(labels.shape)
    area = np.bincount(flat, minlength=n + 1)[1:].astype(np.float64)

    def mean(values: np.ndarray) -> np.ndarray:
        return np.bincount(flat, weights=values.ravel().astype(np.float64), minlength=n + 1)[1:] / np.maximum(area, 1)

    gy, gx = mean(rows) + wy, mean(cols) + wx  # global working coordinates of the centroids
    ry0, rx0, ry1, rx1 = plan.roi
    own = (area > 0) & (gy >= y0) & (gy < y0 + t) & (gx >= x0) & (gx < x0 + t) \
        & (gy >= ry0) & (gy < ry1) & (gx >= rx0) & (gx < rx1)
    edge = np.zeros(n + 1, bool)
    for border in (labels[0], labels[-1], labels[:, 0], labels[:, -1]):
        edge[border] = True
    touching = edge[1:]
    too_large = int((own & touching).sum())
    own &= ~touching
    stats = {"centroid_y": gy[own], "centroid_x": gx[own], "area": area[own], "mean_probability": mean(prob)[own],
             "mean_haematoxylin_od": mean(haematoxylin_od(rgb))[own]}
    return np.arange(1, n + 1)[own], too_large, stats


def haematoxylin_od(rgb: np.ndarray) -> np.ndarray:
    """(H, W) haematoxylin optical density of a uint8 RGB image by colour deconvolution as QuPath does it
    (its *Hematoxylin OD*): OD = −log10(max(I, 1) / 255) per channel, unmixed with `HE_STAINS` and a third,
    residual vector (Ruifrok and Johnston's rule)."""
    stains = np.array(HE_STAINS, np.float64)
    stains /= np.linalg.norm(stains, axis=1, keepdims=True)
    residual = np.sqrt(np.clip(1.0 - (stains ** 2).sum(axis=0), 0.0, None))
    matrix = np.vstack([stains, residual / np.linalg.norm(residual)])
    lookup = -np.log10(np.maximum(np.arange(256), 1) / 255.0)
    return (lookup[np.asarray(rgb)[..., :3]] @ np.linalg.inv(matrix)[:, 0]).astype(np.float32)


def drop_collinear(ring: np.ndarray) -> np.ndarray:
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


def polygons(owned: np.ndarray, boxes, wy: int, wx: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Outer contour of every owned object, in level-0 slide pixels (x, y), concatenated with offsets."""
    from skimage.measure import find_contours

    chunks, offsets = [], [0]
    for index, box in enumerate(boxes, start=1):
        crop = np.pad(owned[box] == index, 1).astype(np.float32)
        contours = find_contours(crop, 0.5)
        ring = drop_collinear(max(contours, key=len)) if contours else np.zeros((0, 2))
        # contour (row, col) in the padded crop → pixel-corner coordinates: col - 1 + 0.5 (pad, centre)
        xy = np.stack([ring[:, 1] - 0.5 + box[1].start + wx, ring[:, 0] - 0.5 + box[0].start + wy], axis=1) * scale
        chunks.append(xy.astype(np.float32))
        offsets.append(offsets[-1] + len(xy))
    points = np.concatenate(chunks) if chunks else np.zeros((0, 2), np.float32)
    return points, np.asarray(offsets, np.int64)


# --------------------------------------------------------------------------- phase 2 and 3: labels and pyramid


def label_chunk_task(plan: SlidePlan, i: int, j: int, offsets: dict) -> None:
    """Pastes the owned objects of tile (i, j) and its neighbours into label chunk (i, j)."""
    root = open_group(plan.store)
    t, m, window = plan.tile, plan.margin, plan.window
    y0, x0 = i * t, j * t
    h, w = min(t, plan.height - y0), min(t, plan.width - x0)
    out = np.zeros((h, w), SLIDE_LABEL_DTYPE)
    owned = root[f"{SCRATCH}/owned"]
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
        target[paint] = local[paint].astype(np.uint64) + offsets[(a, b)][0]
    root["labels/nuclei/0"][y0:y0 + h, x0:x0 + w] = out


def pyramid_task(plan: SlidePlan, level: int, i: int, j: int) -> None:
    """Chunk (i, j) of pyramid level `level` (>= 1) from level − 1: 2×2 mean for the image,
    the top-left pixel of each 2×2 block for the labels."""
    root = open_group(plan.store)
    t = plan.tile
    h, w = level_shape(plan, level)
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
