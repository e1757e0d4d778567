"""Synthetic slides and a pixel-wise fake model for the whole-slide tests (no real model needed)."""

from __future__ import annotations

import time

import numpy as np
import tifffile
import torch

from napari_sgdc.config import ModelConfig

TISSUE = (235, 170, 200)
INTERIOR = (60, 30, 110)
RIM = (120, 40, 70)


def synthetic_rgb(size=(1280, 1536), seed=0, n_nuclei=260, radius=(5, 10)) -> np.ndarray:
    """White slide, a tissue blob over about half of it, dark nuclei with a reddish rim: single
    nuclei and touching pairs (split by the rim), each unit apart from the others, many across tile borders."""
    rng = np.random.default_rng(seed)
    h, w = size
    rgb = np.full((h, w, 3), 255, np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    tissue = ((yy - h * 0.5) / (h * 0.42)) ** 2 + ((xx - w * 0.42) / (w * 0.36)) ** 2 < 1
    rgb[tissue] = TISSUE
    ys, xs = np.nonzero(tissue)
    placed: list[tuple[float, float, float]] = []  # (y, x, extent radius) of each unit

    def free(y, x, extent):
        return all(np.hypot(y - py, x - px) > extent + pe + 3 for py, px, pe in placed)

    for _ in range(n_nuclei * 20):
        if len(placed) >= n_nuclei:
            break
        k = rng.integers(len(ys))
        y, x, r = int(ys[k]), int(xs[k]), int(rng.integers(*radius))
        pair = rng.random() < 0.3  # a touching pair: split by the rim (the boundary head)
        extent = 2 * r if pair else r
        if not free(y, x, extent + 1):
            continue
        placed.append((y, x, extent + 1))
        discs = [(y, x - r + 1), (y, x + r - 1)] if pair else [(y, x)]
        for cy, cx in discs:
            y0, y1, x0, x1 = max(0, cy - r - 1), min(h, cy + r + 2), max(0, cx - r - 1), min(w, cx + r + 2)
            d = np.hypot(yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx)
            rgb[y0:y1, x0:x1][d <= r] = RIM
        for n, (cy, cx) in enumerate(discs):
            # the two halves of a pair differ slightly, so their seeds never tie in the watershed
            y0, y1, x0, x1 = max(0, cy - r - 1), min(h, cy + r + 2), max(0, cx - r - 1), min(w, cx + r + 2)
            d = np.hypot(yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx)
            rgb[y0:y1, x0:x1][d <= r - 1.5] = (INTERIOR[0] - 10 * n, *INTERIOR[1:])
    return rgb


def write_slide(path, rgb, mpp=0.25, *, ome=True, levels=3, tile=256, compression="zlib"):
    """A tiled pyramidal TIFF: OME (SubIFDs) or generic (one page per level), mpp in the metadata
    (mpp=None: no resolution at all)."""
    pyramid = [rgb[:: 2 ** k, :: 2 ** k] for k in range(levels)]
    resolution = {} if mpp is None else dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(str(path), bigtiff=ome) as writer:
        if ome:
            meta = {"axes": "YXS"}
            if mpp is not None:
                meta.update(PhysicalSizeX=mpp, PhysicalSizeY=mpp, PhysicalSizeXUnit="µm", PhysicalSizeYUnit="µm")
            writer.write(pyramid[0], tile=(tile, tile), compression=compression, photometric="rgb",
                         subifds=levels - 1, metadata=meta, **resolution)
            for level in pyramid[1:]:
                writer.write(level, tile=(tile, tile), compression=compression, photometric="rgb", subfiletype=1)
        else:
            for k, level in enumerate(pyramid):
                res = {} if mpp is None else dict(resolution=(1e4 / (mpp * 2 ** k),) * 2, resolutionunit="CENTIMETER")
                writer.write(level, tile=(tile, tile), compression=compression, photometric="rgb",
                             subfiletype=1 if k else 0, metadata=None, **res)
    return path


class PixelModel(torch.nn.Module):
    """Pixel-wise fake nuclei model: dark = nucleus, reddish rim = boundary (tiling cannot change it)."""

    def __init__(self, mpp=0.25, delay=0.0):
        super().__init__()
        self.config = ModelConfig(encoder="mini", pretrained=False, task="instance", mpp=mpp)
        self.delay = delay

    def forward(self, x, return_gates=False):
        if self.delay:
            time.sleep(self.delay)
        gray = x.mean(1, keepdim=True)
        return {"mask": 40 * (0.45 - gray), "edge": 40 * (x[:, :1] - x[:, 2:3] - 0.1)}


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two label images hold the same objects up to relabelling."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


class TypedPixelModel(PixelModel):
    """`PixelModel` with two nucleus types, pixel-wise by the red channel: ``dark`` (type 1) where red is below
    55/255 (the interior of the second disc of a touching pair), ``red`` (type 2) elsewhere (single discs, rims)."""

    TYPES = dict(type_names=("dark", "red"), type_colors=("#1e90ff", "#ff8000"))

    def __init__(self, mpp=0.25):
        super().__init__(mpp)
        self.config = ModelConfig(encoder="mini", pretrained=False, task="instance", mpp=mpp, **self.TYPES)

    def forward(self, x, return_gates=False):
        out = super().forward(x, return_gates)
        red = 200 * (x[:, :1] - 55 / 255)
        out["type"] = torch.cat([-red, red], dim=1)
        return out
