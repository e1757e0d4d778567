"""Resampling benchmark: the three ways the code base resampled images and maps, timed and
scored against an exact reference (docs/performance.md, "Resampling").

Candidates (each takes an array and an output size):

    skimage   ``skimage.transform.resize(order=1, anti_aliasing=shrinking)``: Gaussian pre-filter
              (sigma = (f - 1) / 2 source pixels, f = the shrink factor) + bilinear at pixel centres
              (``inference.working_shape`` path before issue 22).
    scipy     the same filter written as ``gaussian_filter`` + ``map_coordinates`` at explicit pixel-centre
              coordinates (the whole-slide ``read_working`` before issue 22).
    torch     ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``, no pre-filter
              (``inference._resize_maps`` before issue 22).
    torch-aa  the same with ``antialias=True`` (a triangle filter widened by f when shrinking).
    grid      `napari_sgdc.grid.resample`, the one resampler kept (when importable).

Reference: a continuous pattern (a sum of 2-D sinusoids with random orientations and phases,
amplitude falling with frequency, up to 0.4 cycles per source pixel) is *area-sampled* on both grids,
i.e. each pixel holds the exact mean of the pattern over its square, as a camera pixel does
(for a sinusoid that is its value at the pixel centre times sinc(kx·size)·sinc(ky·size)). The
error of a method is its RMSE against the target grid's exact pixels: in uint8 levels for the
RGB image (1000² uint8, the output rounded to uint8), in probability units ×1000 for the float
map (3, 1000, 1000) in [0, 1]. A one-pixel border is left out (edge modes differ, not the filters).

    python benchmarks/resample.py [--size 1000] [--repeat 5] [--threads 1] [--factors 0.5 2 1.03 0.97 0.3]

Prints the CPU model and SIMD flags, then one row per (input, factor, method): median seconds and RMSE.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def cpu_line() -> str:
    """The CPU model, its SIMD flags and the ISA torch runs with (`napari_sgdc.device.cpu_description`)."""
    from napari_sgdc.device import cpu_description

    return cpu_description()


def pattern(shape: tuple[int, int], pixel: float, channels: int, seed: int = 0) -> np.ndarray:
    """(channels, h, w) float64 in about [0, 1]: the area-sampled pattern on a grid of `pixel`-sized pixels
    (source pixel units), so grids of different pixel sizes sample the same continuous image."""
    rng = np.random.default_rng(seed)
    h, w = shape
    cy = (np.arange(h) + 0.5) * pixel
    cx = (np.arange(w) + 0.5) * pixel
    out = np.zeros((channels, h, w))
    for c in range(channels):
        waves = [(rng.uniform(0.01, 0.4), rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)) for _ in range(40)]
        scale = 0.15 / np.sqrt(sum((1.0 / (1.0 + 10 * k)) ** 2 / 2 for k, _, _ in waves))  # std 0.15 around 0.5
        for k, angle, phase in waves:
            ky, kx = k * np.sin(angle), k * np.cos(angle)
            gain = scale / (1.0 + 10 * k) * np.sinc(ky * pixel) * np.sinc(kx * pixel)  # mean over a pixel's square
            # cos(a + b) = cos a cos b - sin a sin b: separable, so no (h, w) meshgrid per wave
            out[c] += gain * np.cos(2 * np.pi * ky * cy + phase)[:, None] * np.cos(2 * np.pi * kx * cx)[None, :]
            out[c] -= gain * np.sin(2 * np.pi * ky * cy + phase)[:, None] * np.sin(2 * np.pi * kx * cx)[None, :]
    out += 0.5
    return out


def _skimage(array: np.ndarray, size: tuple[int, int], channels_last: bool) -> np.ndarray:
    from skimage.transform import resize

    shape = (*size, array.shape[-1]) if channels_last else (array.shape[0], *size)
    shrinking = size[0] < array.shape[-3 if channels_last else -2]
    return resize(array, shape, order=1, anti_aliasing=shrinking, preserve_range=True)


def _scipy(array: np.ndarray, size: tuple[int, int], channels_last: bool) -> np.ndarray:
    from scipy import ndimage

    planes = np.moveaxis(array, -1, 0) if channels_last else array
    factor = planes.shape[1] / size[0]
    sigma = max(0.0, (factor - 1.0) / 2.0)
    rows = (np.arange(size[0]) + 0.5) * planes.shape[1] / size[0] - 0.5
    cols = (np.arange(size[1]) + 0.5) * planes.shape[2] / size[1] - 0.5
    grid = np.meshgrid(rows, cols, indexing="ij")
    out = []
    for plane in planes.astype(np.float32):
        if sigma > 0:
            plane = ndimage.gaussian_filter(plane, sigma, mode="nearest")
        out.append(ndimage.map_coordinates(plane, grid, order=1, mode="nearest"))
    out = np.stack(out)
    return np.moveaxis(out, 0, -1) if channels_last else out


def _torch(array: np.ndarray, size: tuple[int, int], channels_last: bool, antialias: bool = False) -> np.ndarray:
    import torch

    planes = np.moveaxis(array, -1, 0) if channels_last else array
    tensor = torch.from_numpy(np.ascontiguousarray(planes, dtype=np.float32))[None]
    out = torch.nn.functional.interpolate(tensor, size=size, mode="bilinear", align_corners=False,
                                          antialias=antialias)[0].numpy()
    return np.moveaxis(out, 0, -1) if channels_last else out


def _grid(array: np.ndarray, size: tuple[int, int], channels_last: bool) -> np.ndarray:
    from napari_sgdc import grid

    return grid.resample_image(array, size) if channels_last else grid.resample_maps(array, size)


METHODS = {"skimage": _skimage, "scipy": _scipy, "torch": _torch,
           "torch-aa": lambda a, s, c: _torch(a, s, c, antialias=True), "grid": _grid}


def _time(function, repeat: int) -> tuple[float, np.ndarray]:
    times, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = function()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--factors", type=float, nargs="+", default=[0.5, 2.0, 1.03, 0.97, 0.3],
                        help="output size / input size (< 1 shrinks)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    try:
        import napari_sgdc.grid  # noqa: F401
    except ImportError:
        METHODS.pop("grid")
    print(f"# CPU: {cpu_line()}; torch threads: {args.threads}")
    n = args.size
    source = pattern((n, n), 1.0, 3)
    image = np.clip(np.round(np.moveaxis(source, 0, -1) * 255), 0, 255).astype(np.uint8)  # (n, n, 3)
    maps = np.clip(source, 0, 1).astype(np.float32)  # (3, n, n)
    print("| input | factor | method | seconds | RMSE |")
    print("|---|---|---|---|---|")
    for factor in args.factors:
        m = int(round(n * factor))
        truth = np.clip(pattern((m, m), n / m, 3), 0, 1)  # (3, m, m) exact pixels of the target grid
        inner = (slice(None), slice(1, -1), slice(1, -1))
        for name, method in METHODS.items():
            seconds, out = _time(lambda: method(image, (m, m), True), args.repeat)
            out = np.moveaxis(np.clip(np.round(out), 0, 255), -1, 0)
            rmse = float(np.sqrt(np.mean((out[inner] - truth[inner] * 255) ** 2)))
            print(f"| RGB uint8 {n}² | {factor} | {name} | {seconds:.4f} | {rmse:.3f} levels |", flush=True)
        for name, method in METHODS.items():
            seconds, out = _time(lambda: method(maps, (m, m), False), args.repeat)
            rmse = float(np.sqrt(np.mean((out[inner] - truth[inner]) ** 2)))
            print(f"| float (3, {n}, {n}) | {factor} | {name} | {seconds:.4f} | {1000 * rmse:.3f} ×1e-3 |",
                  flush=True)


if __name__ == "__main__":
    main()
