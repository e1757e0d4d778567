"""Input conversion and training augmentation (NumPy, no torch).

Everything random takes a ``numpy.random.Generator`` so that a run is reproducible
from its seed. Geometric transforms act on an image and its mask together; the mask
may be a boolean semantic mask or an integer instance map (nearest-neighbour
resampling keeps instance ids intact). Photometric transforms act on float RGB images
in [0, 1].
"""

from __future__ import annotations

import math

import numpy as np
from skimage.color import hed2rgb, rgb2hed
from skimage.transform import resize

__all__ = [
    "to_float_rgb",
    "to_uint8_rgb",
    "pad_to_size",
    "random_scale_crop",
    "center_crop",
    "random_flip_rot90",
    "check_image",
    "color_jitter",
    "stain_jitter",
    "augment_pair",
]


def check_image(shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Raises a one-line ValueError (with the full shape) unless (shape, dtype) is a 2-D image
    that `to_float_rgb` accepts: (H, W) or (H, W, C) with C in 1, 3, 4, of a number type."""
    shape = tuple(int(n) for n in shape)
    if 0 in shape:
        raise ValueError(f"image is empty (shape {shape})")
    if len(shape) not in (2, 3):
        raise ValueError(f"image must be 2D (H, W) or (H, W, C) with C in 1, 3, 4; got shape {shape}")
    if len(shape) == 3 and shape[2] not in (1, 3, 4):
        hint = " (channels must be last: use numpy.moveaxis(image, 0, -1))" if shape[0] in (1, 3, 4) else ""
        raise ValueError(f"image must have 1 (gray), 3 (RGB) or 4 (RGBA) channels last; got shape {shape}{hint}")
    if not (np.dtype(dtype) == bool or np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise ValueError(f"image dtype {np.dtype(dtype)} is not a number type")


def to_float_rgb(image: np.ndarray) -> np.ndarray:
    """Converts any supported 2D image to float32 RGB in [0, 1].

    Accepted inputs:
        * shapes ``(H, W)`` (gray, repeated to 3 channels), ``(H, W, 1)``, ``(H, W, 3)``
          and ``(H, W, 4)`` (RGBA: the alpha channel is dropped); channels must be last;
        * dtypes bool, uint8 (divided by 255), uint16 (divided by 65535), other integers
          (divided by 255 when the maximum is at most 255, by 65535 when at most 65535,
          else by the maximum) and floats (kept when within [0, 1], divided by 255 when the
          maximum is at most 255, else min-max scaled). NaN becomes 0. The result is
          clipped to [0, 1].

    Args:
        image: the image array.

    Returns:
        float32 array (H, W, 3) in [0, 1].

    Raises:
        ValueError: for empty arrays, other numbers of dimensions or channels
            (for example 4D stacks or 2-channel images), or non-numeric dtypes.
    """
    array = np.asarray(image)
    check_image(array.shape, array.dtype)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.shape[2] == 4:
        array = array[:, :, :3]
    if array.dtype == bool:
        out = array.astype(np.float32)
    elif array.dtype == np.uint8:
        out = array.astype(np.float32) / 255.0
    elif array.dtype == np.uint16:
        out = array.astype(np.float32) / 65535.0
    elif np.issubdtype(array.dtype, np.integer):
        peak = float(array.max())
        scale = 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else peak
        out = array.astype(np.float32) / scale
    elif np.issubdtype(array.dtype, np.floating):
        out = np.nan_to_num(array.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        low, high = float(out.min()), float(out.max())
        if low >= 0.0 and high <= 1.0:
            pass
        elif low >= 0.0 and high <= 255.0:
            out = out / 255.0
        elif high > low:
            out = (out - low) / (high - low)
        else:
            out = np.zeros_like(out)
    else:  # unreachable: check_image accepts number types only
        raise ValueError(f"image dtype {array.dtype} is not a number type")
    if out.shape[2] == 1:
        out = np.repeat(out, 3, axis=2)
    return np.ascontiguousarray(np.clip(out, 0.0, 1.0), dtype=np.float32)


def to_uint8_rgb(image: np.ndarray) -> np.ndarray:
    """Like `to_float_rgb` but returns uint8 (H, W, 3); uint8 RGB input is returned as is."""
    array = np.asarray(image)
    if array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3:
        return np.ascontiguousarray(array)
    return (to_float_rgb(array) * 255.0 + 0.5).astype(np.uint8)


def pad_to_size(array: np.ndarray, height: int, width: int, mode: str = "reflect") -> np.ndarray:
    """Pads the first two axes at the bottom/right up to at least (height, width).

    Args:
        array: (H, W) or (H, W, C) array.
        height: minimum output height.
        width: minimum output width.
        mode: `numpy.pad` mode (``reflect`` mirrors content, also for pads larger than the array).

    Returns:
        the padded array (unchanged when already large enough).
    """
    pad_h = max(0, height - array.shape[0])
    pad_w = max(0, width - array.shape[1])
    if pad_h == 0 and pad_w == 0:
        return array
    if mode == "reflect" and (array.shape[0] == 1 or array.shape[1] == 1):
        mode = "edge"  # reflect needs at least 2 pixels along an axis
    pads = [(0, pad_h), (0, pad_w)] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, pads, mode=mode)


def _resize_pair(
    image: np.ndarray, mask: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Resizes a square window to size x size: bilinear image, nearest-neighbour mask."""
    if image.shape[0] == size and image.shape[1] == size:
        return image, mask
    downscale = image.shape[0] > size
    image_out = resize(
        image, (size, size), order=1, preserve_range=True, anti_aliasing=downscale
    ).astype(image.dtype if image.dtype != np.uint8 else np.float32)
    if image.dtype == np.uint8:
        image_out = np.clip(image_out + 0.5, 0, 255).astype(np.uint8)
    mask_out = resize(
        mask, (size, size), order=0, preserve_range=True, anti_aliasing=False
    ).astype(mask.dtype)
    return image_out, mask_out


def random_scale_crop(
    image: np.ndarray,
    mask: np.ndarray,
    crop_size: int,
    rng: np.random.Generator,
    scale_range: tuple[float, float] = (0.75, 1.33),
    foreground_prob: float = 0.5,
    weight: np.ndarray | None = None,
):
    """Cuts a random square window and resamples it to crop_size x crop_size.

    The scale factor is log-uniform in `scale_range`
    (a factor above 1 enlarges the content). The window is ``crop_size / factor`` source
    pixels wide. With probability `foreground_prob` it is centred (with jitter of a
    quarter window) on a random foreground pixel, otherwise placed uniformly. Images
    smaller than the window are reflect-padded first.

    Args:
        image: (H, W, 3) image (uint8 or float).
        mask: (H, W) bool mask or integer instance map.
        crop_size: output side in pixels.
        rng: random generator.
        scale_range: range of the random zoom factor.
        foreground_prob: probability of centring the window on foreground.
        weight: optional (H, W) float per-pixel loss weights, cut and resampled
            (nearest neighbour) like the mask. When it has pixels above 1 (user edits,
            see `napari_sgdc.train.corrections`) the window is centred on those instead
            of on foreground.

    Returns:
        (image crop (crop, crop, 3), mask crop (crop, crop)) with the input dtypes, plus
        the weight crop (crop, crop) as a third element when `weight` is given.
    """
    low, high = scale_range
    factor = math.exp(rng.uniform(math.log(low), math.log(high)))
    window = max(1, int(round(crop_size / factor)))
    image = pad_to_size(image, window, window)
    mask = pad_to_size(mask, window, window)
    focus = mask
    if weight is not None:
        weight = pad_to_size(weight, window, window)
        if (weight > 1).any():
            focus = weight > 1
    height, width = mask.shape[:2]
    use_foreground = rng.random() < foreground_prob
    if use_foreground and focus.any():
        rows, cols = np.nonzero(focus)
        pick = rng.integers(len(rows))
        jitter = rng.uniform(-0.25, 0.25, size=2) * window
        top = int(round(rows[pick] + jitter[0] - window / 2))
        left = int(round(cols[pick] + jitter[1] - window / 2))
    else:
        top = int(rng.integers(0, height - window + 1))
        left = int(rng.integers(0, width - window + 1))
    top = min(max(top, 0), height - window)
    left = min(max(left, 0), width - window)
    image_crop = image[top : top + window, left : left + window]
    mask_crop = mask[top : top + window, left : left + window]
    if weight is None:
        return _resize_pair(image_crop, mask_crop, crop_size)
    weight_crop = weight[top : top + window, left : left + window]
    if window != crop_size:
        weight_crop = resize(weight_crop, (crop_size, crop_size), order=0, preserve_range=True,
                             anti_aliasing=False).astype(weight_crop.dtype)
    return (*_resize_pair(image_crop, mask_crop, crop_size), weight_crop)


def center_crop(
    image: np.ndarray, mask: np.ndarray, crop_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Central crop_size x crop_size window (reflect-padded when the image is smaller)."""
    image = pad_to_size(image, crop_size, crop_size)
    mask = pad_to_size(mask, crop_size, crop_size)
    top = (mask.shape[0] - crop_size) // 2
    left = (mask.shape[1] - crop_size) // 2
    return (
        image[top : top + crop_size, left : left + crop_size],
        mask[top : top + crop_size, left : left + crop_size],
    )


def random_flip_rot90(
    image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, weight: np.ndarray | None = None
):
    """Applies one of the 8 dihedral transforms (flips and 90-degree rotations).

    Returns (image, mask), plus the equally transformed `weight` (H, W) when given."""
    turns = int(rng.integers(4))
    flip = bool(rng.integers(2))
    arrays = [image, mask] if weight is None else [image, mask, weight]
    if flip:
        arrays = [array[:, ::-1] for array in arrays]
    if turns:
        arrays = [np.rot90(array, turns, axes=(0, 1)) for array in arrays]
    return tuple(np.ascontiguousarray(array) for array in arrays)


def color_jitter(
    image: np.ndarray, rng: np.random.Generator, strength: float = 1.0
) -> np.ndarray:
    """Random brightness, contrast, saturation and per-channel gain.

    Args:
        image: float (H, W, 3) in [0, 1].
        rng: random generator.
        strength: scales all jitter ranges (0 = identity).

    Returns:
        float32 (H, W, 3) clipped to [0, 1].
    """
    out = image.astype(np.float32, copy=True)
    brightness = 1.0 + rng.uniform(-0.2, 0.2) * strength
    contrast = 1.0 + rng.uniform(-0.2, 0.2) * strength
    saturation = 1.0 + rng.uniform(-0.2, 0.2) * strength
    gains = 1.0 + rng.uniform(-0.05, 0.05, size=3).astype(np.float32) * strength
    out *= brightness
    mean = out.mean()
    out = (out - mean) * contrast + mean
    gray = out.mean(axis=2, keepdims=True)
    out = (out - gray) * saturation + gray
    out *= gains
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def stain_jitter(
    image: np.ndarray,
    rng: np.random.Generator,
    sigma_scale: float = 0.05,
    sigma_shift: float = 0.01,
) -> np.ndarray:
    """H&E stain augmentation in HED colour-deconvolution space (Tellez et al. 2018).

    Each of the haematoxylin, eosin and DAB channels ``c`` becomes
    ``c * a + b`` with ``a ~ U(1 - sigma_scale, 1 + sigma_scale)`` and
    ``b ~ U(-sigma_shift, sigma_shift)``, then the image is converted back to RGB.

    Args:
        image: float (H, W, 3) RGB in [0, 1].
        rng: random generator.
        sigma_scale: half-range of the multiplicative stain factor.
        sigma_shift: half-range of the additive stain offset (HED optical-density units).

    Returns:
        float32 (H, W, 3) clipped to [0, 1].
    """
    hed = rgb2hed(np.clip(image, 0.0, 1.0))  # (H, W, 3) stain concentrations
    scale = rng.uniform(1.0 - sigma_scale, 1.0 + sigma_scale, size=3)
    shift = rng.uniform(-sigma_shift, sigma_shift, size=3)
    rgb = hed2rgb(hed * scale + shift)
    return np.clip(rgb, 0.0, 1.0).astype(np.float32)


def augment_pair(
    image: np.ndarray,
    mask: np.ndarray,
    crop_size: int,
    rng: np.random.Generator,
    *,
    stain: bool = False,
    scale_range: tuple[float, float] = (0.75, 1.33),
    foreground_prob: float = 0.5,
    color_strength: float = 1.0,
    weight: np.ndarray | None = None,
):
    """The full training augmentation: scale-crop, flips/rotations, colour and stain jitter.

    Args:
        image: (H, W, 3) uint8 or float RGB image.
        mask: (H, W) bool mask or integer instance map.
        crop_size: output side.
        rng: random generator (the only source of randomness).
        stain: also apply H&E stain jitter (histology), with probability 0.8.
        scale_range: random zoom range.
        foreground_prob: probability of centring the crop on foreground.
        color_strength: scales the colour jitter ranges.
        weight: optional (H, W) float per-pixel loss weights, cropped, resampled and
            flipped/rotated with the mask (see `random_scale_crop`).

    Returns:
        (float32 image (crop, crop, 3) in [0, 1], mask (crop, crop) with the input dtype),
        plus the weight crop (crop, crop) float32 as a third element when `weight` is given.
    """
    if weight is None:
        image, mask = random_scale_crop(image, mask, crop_size, rng, scale_range, foreground_prob)
        image, mask = random_flip_rot90(image, mask, rng)
    else:
        image, mask, weight = random_scale_crop(
            image, mask, crop_size, rng, scale_range, foreground_prob, np.asarray(weight, np.float32)
        )
        image, mask, weight = random_flip_rot90(image, mask, rng, weight)
    image_float = to_float_rgb(image)
    if stain and rng.random() < 0.8:
        image_float = stain_jitter(image_float, rng)
    image_float = color_jitter(image_float, rng, color_strength)
    if weight is None:
        return image_float, mask
    return image_float, mask, weight


def working_size(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(h, w) with the longer side resized to `long_side` (unchanged when `long_side` is 0)."""
    if not long_side or max(height, width) == long_side:
        return height, width
    scale = long_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an (H, W[, C]) image to `size`, anti-aliased when shrinking; keeps the dtype."""
    from skimage.transform import resize

    if tuple(image.shape[:2]) == tuple(size):
        return image
    shrinking = size[0] < image.shape[0] or size[1] < image.shape[1]
    resized = resize(image, (*size, *image.shape[2:]), order=1, anti_aliasing=shrinking, preserve_range=True)
    if np.issubdtype(image.dtype, np.integer):
        resized = np.clip(np.rint(resized), np.iinfo(image.dtype).min, np.iinfo(image.dtype).max)
    return resized.astype(image.dtype)


def resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a mask or label image to `size`; keeps the dtype."""
    if tuple(labels.shape[:2]) == tuple(size):
        return labels
    rows = np.minimum((np.arange(size[0]) + 0.5) * labels.shape[0] / size[0], labels.shape[0] - 1).astype(int)
    cols = np.minimum((np.arange(size[1]) + 0.5) * labels.shape[1] / size[1], labels.shape[1] - 1).astype(int)
    return labels[rows[:, None], cols[None, :]]
