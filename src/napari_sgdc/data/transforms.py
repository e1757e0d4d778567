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

from ..files import white_level
from skimage.transform import resize

__all__ = [
    "to_float_rgb",
    "to_uint8_rgb",
    "pad_to_size",
    "random_scale_crop",
    "focus_points",
    "center_crop",
    "random_flip_rot90",
    "check_image",
    "color_jitter",
    "stain_jitter",
    "dermoscopy_artifacts",
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
        * dtypes bool, uint8 (divided by 255), uint16 (divided by the white level of the
          smallest of 8, 10, 12, 14 or 16 bits that holds the maximum, `white_level`), other
          integers (divided by 255 when the maximum is at most 255, by 65535 when at most 65535,
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
    elif np.issubdtype(array.dtype, np.integer):
        out = array.astype(np.float32) / white_level(array.dtype, float(array.max()))
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
    """Resizes a window to size x size: bilinear image, nearest-neighbour mask."""
    if image.shape[0] == size and image.shape[1] == size:
        return image, mask
    downscale = max(image.shape[:2]) > size
    image_out = resize(
        image, (size, size), order=1, preserve_range=True, anti_aliasing=downscale
    ).astype(image.dtype if image.dtype != np.uint8 else np.float32)
    if image.dtype == np.uint8:
        image_out = np.clip(image_out + 0.5, 0, 255).astype(np.uint8)
    return image_out, resize_labels(mask, (size, size))


def random_scale_crop(
    image: np.ndarray,
    mask: np.ndarray,
    crop_size: int,
    rng: np.random.Generator,
    scale_range: tuple[float, float] = (0.75, 1.33),
    foreground_prob: float = 0.5,
    weight: np.ndarray | None = None,
    aspect_jitter: float = 1.0,
    focus: tuple[np.ndarray, np.ndarray] | None = None,
):
    """Cuts a random window and resamples it to crop_size x crop_size.

    The scale factor is log-uniform in `scale_range`
    (a factor above 1 enlarges the content). The window is ``crop_size / factor`` source
    pixels on a side; with ``aspect_jitter > 1`` its height and width are then multiplied
    by ``sqrt(r)`` and ``1 / sqrt(r)`` with ``r`` log-uniform in ``[1 / aspect_jitter,
    aspect_jitter]``, so the resampled crop is stretched along one axis (images whose
    aspect ratio was changed, such as ISIC 2018 squashed to squares, and users' images
    that kept theirs, then look alike to the network). With probability `foreground_prob`
    it is centred (with jitter of a quarter window) on a random foreground pixel,
    otherwise placed uniformly. Images smaller than the window are reflect-padded first.

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
        aspect_jitter: largest height/width stretch of the window (1 = square windows).
        focus: optional ``focus_points(mask, weight)`` of these arrays, computed once by the
            caller: the same crop, without searching the whole image for the pixels to
            centre on at every call (used when the image needs no padding for the window).

    Returns:
        (image crop (crop, crop, 3), mask crop (crop, crop)) with the input dtypes, plus
        the weight crop (crop, crop) as a third element when `weight` is given.
    """
    low, high = scale_range
    factor = math.exp(rng.uniform(math.log(low), math.log(high)))
    side = crop_size / factor
    stretch = math.sqrt(math.exp(rng.uniform(-1.0, 1.0) * math.log(aspect_jitter))) if aspect_jitter > 1 else 1.0
    win_h, win_w = max(1, int(round(side * stretch))), max(1, int(round(side / stretch)))
    if focus is not None and (mask.shape[0] < win_h or mask.shape[1] < win_w):
        focus = None  # padding adds mirrored pixels: search the padded arrays
    image = pad_to_size(image, win_h, win_w)
    mask = pad_to_size(mask, win_h, win_w)
    if weight is not None:
        weight = pad_to_size(weight, win_h, win_w)
    height, width = mask.shape[:2]
    use_foreground = rng.random() < foreground_prob
    if use_foreground and focus is None:
        focus = focus_points(mask, weight)
    if use_foreground and len(focus[0]):
        rows, cols = focus
        pick = rng.integers(len(rows))
        jitter = rng.uniform(-0.25, 0.25, size=2) * (win_h, win_w)
        top = int(round(rows[pick] + jitter[0] - win_h / 2))
        left = int(round(cols[pick] + jitter[1] - win_w / 2))
    else:
        top = int(rng.integers(0, height - win_h + 1))
        left = int(rng.integers(0, width - win_w + 1))
    top = min(max(top, 0), height - win_h)
    left = min(max(left, 0), width - win_w)
    image_crop = image[top : top + win_h, left : left + win_w]
    mask_crop = mask[top : top + win_h, left : left + win_w]
    if weight is None:
        return _resize_pair(image_crop, mask_crop, crop_size)
    weight_crop = weight[top : top + win_h, left : left + win_w]
    if weight_crop.shape != (crop_size, crop_size):
        weight_crop = resize_labels(weight_crop, (crop_size, crop_size))
    return (*_resize_pair(image_crop, mask_crop, crop_size), weight_crop)


def focus_points(mask: np.ndarray, weight: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the pixels a random crop may be centred on (`random_scale_crop`): those
    weighing more than 1 when `weight` has any (user edits), else the foreground of `mask`."""
    if weight is not None:
        edited = np.asarray(weight) > 1
        if edited.any():
            return np.nonzero(edited)
    return np.nonzero(np.asarray(mask))


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


def _band(shape: tuple[int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (across, along) in pixels of a random straight line through the image:
    ``across`` is the signed distance from the line, ``along`` the position on it."""
    height, width = shape
    angle = rng.uniform(0.0, math.pi)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    centre_r, centre_c = rng.uniform(0, height), rng.uniform(0, width)
    across = (rows - centre_r) * math.cos(angle) - (cols - centre_c) * math.sin(angle)
    along = (rows - centre_r) * math.sin(angle) + (cols - centre_c) * math.cos(angle)
    return across, along


def _hair(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Dark, thin, curved hairs (quadratic Bezier curves 1-3 px wide) drawn over the image."""
    from scipy.ndimage import binary_dilation

    height, width = image.shape[:2]
    strands = np.zeros((height, width), bool)
    t = np.linspace(0.0, 1.0, 4 * (height + width))[:, None]  # samples under 1 px apart along a curve
    for _ in range(int(rng.integers(1, 11))):
        ends = rng.uniform(-0.2, 1.2, size=(3, 2)) * (height, width)  # start, control, end points
        ends[1] = (ends[0] + ends[2]) / 2 + rng.normal(0.0, 0.15, 2) * (height, width)  # a gentle bend
        curve = (1 - t) ** 2 * ends[0] + 2 * (1 - t) * t * ends[1] + t**2 * ends[2]  # (n, 2) (row, col)
        rows, cols = np.rint(curve).astype(int).T
        keep = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
        strands[rows[keep], cols[keep]] = True
    thickness = int(rng.integers(0, 2))
    if thickness:
        strands = binary_dilation(strands, iterations=thickness)
    colour = rng.uniform(0.02, 0.25) * np.array([1.0, 0.8, 0.7], np.float32) * rng.uniform(0.8, 1.2, 3)
    alpha = rng.uniform(0.6, 1.0)
    out = image.copy()
    out[strands] = (1 - alpha) * out[strands] + alpha * colour
    return out


def _ruler(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A ruler: a light or dark straight band with tick marks every few pixels."""
    across, along = _band(image.shape[:2], rng)
    half = rng.uniform(3.0, 10.0)
    band = np.abs(across) < half
    period = rng.uniform(5.0, 14.0)
    ticks = band & (np.mod(along, period) < max(1.0, period * 0.2)) & (across > -half * rng.uniform(0.0, 0.8))
    light = rng.random() < 0.6
    base = rng.uniform(0.75, 0.95) if light else rng.uniform(0.05, 0.2)
    tick = rng.uniform(0.0, 0.15) if light else rng.uniform(0.8, 1.0)
    out = image.copy()
    out[band] = base
    out[ticks] = tick
    return out


def _ink(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Surgical-marker ink: translucent purple or blue strokes and dots, blended multiplicatively."""
    from skimage.draw import disk

    height, width = image.shape[:2]
    marks = np.zeros((height, width), bool)
    for _ in range(int(rng.integers(1, 4))):
        if rng.random() < 0.5:  # a stroke
            across, along = _band((height, width), rng)
            length = rng.uniform(0.1, 0.6) * max(height, width)
            marks |= (np.abs(across) < rng.uniform(1.5, 5.0)) & (np.abs(along) < length / 2)
        else:  # a dot
            rr, cc = disk((rng.uniform(0, height), rng.uniform(0, width)), rng.uniform(2.0, 8.0), shape=(height, width))
            marks[rr, cc] = True
    tint = np.array([rng.uniform(0.3, 0.6), rng.uniform(0.1, 0.35), rng.uniform(0.5, 0.8)], np.float32)  # purple-blue
    strength = rng.uniform(0.5, 0.9)
    out = image.copy()
    out[marks] = out[marks] * (1 - strength + strength * tint)
    return out


def _vignette(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The dermoscope's round field of view: darkening towards the edge, black outside a circle."""
    height, width = image.shape[:2]
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    centre_r = height / 2 + rng.uniform(-0.15, 0.15) * height
    centre_c = width / 2 + rng.uniform(-0.15, 0.15) * width
    radius = rng.uniform(0.45, 0.7) * math.hypot(height, width)  # the corners are 0.5 diagonals away
    distance = np.hypot(rows - centre_r, cols - centre_c) / radius  # (H, W), 1 at the circle
    softness = rng.uniform(0.02, 0.15)
    inside = np.clip((1.0 - distance) / softness, 0.0, 1.0)
    falloff = 1.0 - rng.uniform(0.2, 0.6) * np.clip(distance, 0.0, 1.0) ** 2
    black = rng.uniform(0.0, 0.1)
    return (image * (inside * falloff)[..., None] + black * (1 - inside)[..., None]).astype(np.float32)


DERMOSCOPY_ARTIFACTS = {"hair": (_hair, 0.3), "ruler": (_ruler, 0.1), "ink": (_ink, 0.1), "vignette": (_vignette, 0.25)}
"""Artifact name: (function, probability per training crop) for `dermoscopy_artifacts`."""


def dermoscopy_artifacts(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Adds the artifacts of real dermoscopy images that leave the lesion mask unchanged.

    Each of `DERMOSCOPY_ARTIFACTS` (hair, a ruler, surgical-marker ink, the dermoscope's
    dark round field of view) is drawn independently with its probability, so most crops
    get none and a few get several. Hair and ink cross lesions; the mask stays the same.

    Args:
        image: float (H, W, 3) RGB in [0, 1].
        rng: random generator.

    Returns:
        float32 (H, W, 3) in [0, 1].
    """
    out = np.asarray(image, np.float32)
    for draw, probability in DERMOSCOPY_ARTIFACTS.values():
        if rng.random() < probability:
            out = draw(out, rng)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


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
    aspect_jitter: float = 1.0,
    artifacts: bool = False,
    focus: tuple[np.ndarray, np.ndarray] | None = None,
):
    """The full training augmentation: scale-crop, flips/rotations, colour and stain jitter,
    and optionally dermoscopy artifacts.

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
        aspect_jitter: largest stretch of the crop window (see `random_scale_crop`).
        artifacts: add hair, rulers, ink and vignetting (`dermoscopy_artifacts`).
        focus: optional precomputed ``focus_points(mask, weight)`` (see `random_scale_crop`).

    Returns:
        (float32 image (crop, crop, 3) in [0, 1], mask (crop, crop) with the input dtype),
        plus the weight crop (crop, crop) float32 as a third element when `weight` is given.
    """
    if weight is None:
        image, mask = random_scale_crop(image, mask, crop_size, rng, scale_range, foreground_prob,
                                        aspect_jitter=aspect_jitter, focus=focus)
        image, mask = random_flip_rot90(image, mask, rng)
    else:
        image, mask, weight = random_scale_crop(
            image, mask, crop_size, rng, scale_range, foreground_prob, np.asarray(weight, np.float32),
            aspect_jitter=aspect_jitter, focus=focus,
        )
        image, mask, weight = random_flip_rot90(image, mask, rng, weight)
    image_float = to_float_rgb(image)
    if stain and rng.random() < 0.8:
        image_float = stain_jitter(image_float, rng)
    if artifacts:  # a child stream: the colour jitter below draws the same numbers with or without
        image_float = dermoscopy_artifacts(image_float, rng.spawn(1)[0])
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
