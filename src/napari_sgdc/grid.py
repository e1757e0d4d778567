"""The working grid: the one owner of µm per pixel and of resampling.

The *working grid* is the pixel grid the network sees: an image (or a slide level)
resampled from its own µm/px to the model's (``ModelConfig.mpp``), or resized so its
longer side is ``ModelConfig.resize_long_side``. Everything that decides that grid lives
here, and `napari_sgdc.inference.segment`, `napari_sgdc.train.finetune.finetune`,
`napari_sgdc.wholeslide` and the plugin's ``layer_mpp`` call it:

* **The µm/px range** `MPP_RANGE` = (0.01, 100) µm per pixel, exclusive, with one check
  (`check_mpp`, `mpp_problem`) and one message format. 0.01 µm is far below any optical
  scan (a 100× oil objective is about 0.06 µm/px) and 100 µm/px is a slide thumbnail.
* **The working shape** (`working_shape`, `scaled_length`): a length of ``n`` pixels at
  ``s`` working pixels per pixel becomes ``ceil(n · s)`` (a product within 1e-6 of an
  integer is that integer), so the working grid covers every input pixel; a slide's last
  working pixel may reach past its edge (read as white). When the image's µm/px is within
  `RESAMPLE_TOLERANCE` (0.5 %) of the model's, nothing is resampled.
* **The resamplers**, chosen by measurement (`benchmarks/resample.py`, table below):
  `resample_image` for images (and `resample_window` for a window of a slide level at a
  sub-pixel offset: the same filter written at explicit coordinates), `resample_maps` for
  float maps (probabilities back onto the image's pixels).
* **The slide level** read for a target µm/px (`choose_level`, `LEVEL_TOLERANCE`) and the
  default whole-slide tile and margin (`DEFAULT_TILE`, `DEFAULT_MARGIN`).

Resampling benchmark (``python benchmarks/resample.py --repeat 3``, 1000² inputs, AMD EPYC with
avx2, avx512f, avx512_bf16, one thread; RMSE against the exact area-sampled pixels of a continuous
pattern on the target grid: uint8 levels for the RGB image, ×1e-3 for the float map (3, 1000, 1000);
factor = output / input size)::

    factor  method    RGB s    RGB RMSE   map s    map RMSE
    0.5     skimage   0.074    2.88       0.054    11.2      Gaussian + bilinear
            scipy     0.045    2.88       0.043    11.2      the same filter at explicit coordinates
            torch     0.009    0.35       0.005    0.35      bilinear: the exact 2×2 mean at 0.5
            torch-aa  0.007    6.36       0.006    24.9
    2       skimage   0.865    6.80       0.712    26.6      all four are plain bilinear when enlarging
            scipy     0.455    6.80       0.639    26.6
            torch     0.118    6.80       0.139    26.6
            torch-aa  0.073    6.80       0.103    26.6
    1.03    skimage   0.201    4.80       0.156    18.8
            torch     0.033    4.80       0.016    18.8
    0.97    skimage   0.209    4.52       0.169    17.7
            torch     0.013    4.52       0.014    17.7
            torch-aa  0.013    4.63       0.012    18.1
    0.3     skimage   0.054    3.34       0.045    13.0
            scipy     0.073    3.34       0.051    13.0
            torch     0.006   10.69       0.008    41.9      aliasing: no pre-filter
            torch-aa  0.013    5.16       0.008    20.2

Choice. Images: the Gaussian pre-filter (sigma = (f − 1) / 2 source pixels when shrinking by
f) + bilinear at pixel centres (scikit-image's ``resize``, which is exactly that): the most
accurate when shrinking by any factor but exactly 2 (3.3 levels at 0.3 against 10.7 and 5.2),
the same as every other when enlarging; its time (0.05-0.9 s per 1000² image) is small next
to the network's on that image, and it keeps the built-in models' reference outputs (their working
resolution uses it). Maps: torch bilinear, 5–8× faster at equal accuracy when enlarging and
exact when halving, but aliasing beyond 2× (41.9 against 13.0 at 0.3), so maps shrunk by more
than 2× go through the image filter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["MPP_RANGE", "RESAMPLE_TOLERANCE", "LEVEL_TOLERANCE", "DEFAULT_TILE", "DEFAULT_MARGIN", "mpp_problem",
           "mpp_in_range", "check_mpp", "check_image_mpp", "usable_mpp", "scaled_length", "working_shape", "resample_image",
           "resample_window", "resample_maps", "choose_level", "level_factor"]

MPP_RANGE = (0.01, 100.0)
"""Valid µm per pixel, both ends excluded (images, slides, models and layers alike)."""
RESAMPLE_TOLERANCE = 0.005
"""Scales within 0.5 % of 1 are not resampled (less than 5 pixels over a 1000-pixel tile)."""
LEVEL_TOLERANCE = 0.02
"""A slide level counts as fine enough for a target µm/px when its pixels are at most 2 % larger
(slightly enlarging it loses nothing, while the next finer level is typically 2-4× more pixels)."""
DEFAULT_TILE = 1024
"""Whole-slide core (and chunk) size in working pixels."""
DEFAULT_MARGIN = 64
"""Whole-slide context on every side of a core, in working pixels (objects must be smaller)."""
_EXACT = 1e-6  # products this close to an integer are that integer (0.3 / 0.25 * 60 = 72.00000000000001)


def mpp_problem(value: object, what: str = "mpp") -> str | None:
    """The one-line complaint about a µm/px value, or None when it is a number in `MPP_RANGE`."""
    low, high = MPP_RANGE
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not low < float(value) < high:
        return f"{what} must be a number of µm per pixel in ({low:g}, {high:g}), got {value!r}"
    return None


def mpp_in_range(value: object) -> bool:
    """Whether `value` is a number of µm per pixel in `MPP_RANGE`."""
    return mpp_problem(value) is None


def check_mpp(value: object, what: str = "mpp") -> float:
    """`value` as a float; raises a one-line ValueError naming `what` unless it lies in `MPP_RANGE`."""
    problem = mpp_problem(value, what)
    if problem:
        raise ValueError(problem)
    return float(value)


def check_image_mpp(mpp: object, config) -> None:
    """Raises a one-line ValueError unless ``segment(mpp=mpp)`` can run a model of `config`
    (None: the image is taken to be at the model's scale, always fine)."""
    if mpp is None:
        return
    check_mpp(mpp, "mpp")
    if not config.mpp:
        raise ValueError("this model does not record the µm/px it was trained at (ModelConfig.mpp = 0), "
                         "so mpp cannot be used with it")
    if config.resize_long_side:
        raise ValueError("mpp cannot be combined with a model that has a working resolution (resize_long_side)")


def usable_mpp(mpp: float | None, config) -> float | None:
    """The `mpp` to pass `segment` and `finetune` for a model of `config`: the image µm/px
    for models that record their own scale, else None (the image as it is: models without a
    scale, or with a working resolution, ignore the image's scale)."""
    return mpp if mpp and config.mpp and not config.resize_long_side else None


def scaled_length(length: int, scale: float) -> int:
    """``ceil(length · scale)`` (at least 1): the working pixels covering `length` input pixels."""
    return max(1, int(math.ceil(length * scale - _EXACT)))


def working_shape(height: int, width: int, config, mpp: float | None) -> tuple[int, int]:
    """The (h, w) the network sees for an image of (height, width).

    Resampled from `mpp` to ``config.mpp`` when both are known (unchanged within
    `RESAMPLE_TOLERANCE`), else resized so the longer side is ``config.resize_long_side``
    (0: unchanged; the rule training used, `napari_sgdc.data.transforms.working_size`).
    """
    if mpp and config.mpp:
        scale = float(mpp) / config.mpp
        if abs(scale - 1.0) <= RESAMPLE_TOLERANCE:
            return height, width
        return scaled_length(height, scale), scaled_length(width, scale)
    from .data.transforms import working_size

    return working_size(height, width, config.resize_long_side)


def resample_image(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """An (H, W[, C]) image resampled to `size` (Gaussian pre-filter when shrinking + bilinear
    at pixel centres; see the module docstring); keeps the dtype (integers rounded and clipped)."""
    from .data.transforms import resize_image

    return resize_image(image, (int(size[0]), int(size[1])))


def resample_window(read, factor: float, y0: int, x0: int, height: int, width: int) -> np.ndarray:
    """A (height, width, 3) uint8 window of a grid `factor` times coarser than a source image,
    at working pixel (y0, x0), with the filter of `resample_image`.

    Args:
        read: ``read(r0, c0, rows, cols)`` returns (rows, cols, 3) uint8 of the source
            (any position: outside the source it returns what lies there, e.g. white).
        factor: source pixels per working pixel; working pixel k's centre lies at source
            coordinate (k + 0.5) · factor − 0.5.
        y0, x0, height, width: the window on the working grid.
    """
    if abs(factor - 1.0) <= RESAMPLE_TOLERANCE:
        return read(y0, x0, height, width)
    from scipy import ndimage

    sigma = max(0.0, (factor - 1.0) / 2.0)
    pad = 2 + int(math.ceil(3 * sigma))
    rows = (np.arange(y0, y0 + height) + 0.5) * factor - 0.5  # source coordinates of working pixel centres
    cols = (np.arange(x0, x0 + width) + 0.5) * factor - 0.5
    r0, c0 = int(math.floor(rows[0])) - pad, int(math.floor(cols[0])) - pad
    r1, c1 = int(math.ceil(rows[-1])) + pad + 1, int(math.ceil(cols[-1])) + pad + 1
    region = read(r0, c0, r1 - r0, c1 - c0).astype(np.float32)
    out = np.empty((height, width, 3), np.uint8)
    grid = np.meshgrid(rows - r0, cols - c0, indexing="ij")
    for channel in range(3):
        plane = region[..., channel]
        if sigma > 0:
            plane = ndimage.gaussian_filter(plane, sigma, mode="nearest")
        sampled = ndimage.map_coordinates(plane, grid, order=1, mode="nearest")
        out[..., channel] = np.clip(np.round(sampled), 0, 255).astype(np.uint8)
    return out


def resample_maps(maps: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Float maps (C, h, w) resampled to (C, *size), float32: bilinear at pixel centres (torch),
    through the image filter when shrunk by more than 2× (see the module docstring)."""
    size = (int(size[0]), int(size[1]))
    maps = np.ascontiguousarray(maps, dtype=np.float32)
    if maps.shape[1:] == size:
        return maps
    if size[0] * 2 < maps.shape[1] or size[1] * 2 < maps.shape[2]:
        return np.stack([resample_image(plane, size) for plane in maps]).astype(np.float32)
    import torch

    tensor = torch.from_numpy(maps)[None]  # (1, C, h, w)
    resized = torch.nn.functional.interpolate(tensor, size=size, mode="bilinear", align_corners=False)
    return resized[0].numpy()


def choose_level(level_mpps: Sequence[float | None], target: float) -> int:
    """The coarsest level whose pixels are no larger than `target` µm (`LEVEL_TOLERANCE`);
    0 when the levels' µm/px are unknown or `target` is not positive."""
    if not target or target <= 0 or not level_mpps or level_mpps[0] is None:
        return 0
    best = 0
    for level, mpp in enumerate(level_mpps):
        if mpp is not None and mpp <= target * (1.0 + LEVEL_TOLERANCE):
            best = level
    return best


def level_factor(level_mpp: float, target: float) -> float:
    """Level pixels per working pixel (``target / level_mpp``), exactly 1 within `RESAMPLE_TOLERANCE`."""
    factor = float(target) / float(level_mpp)
    return 1.0 if abs(factor - 1.0) <= RESAMPLE_TOLERANCE else factor
