"""The one post-processing stage: probabilities → mask and instance labels.

`segment()`, the napari sliders, the CLI, the demo and whole-slide inference all call
`postprocess` with one `PostprocessOptions`, so a threshold means the same thing
everywhere and the sliders never need a new forward pass.

Semantic mask: ``probability > threshold``; with ``single_object`` (one lesion per
image) only the largest 8-connected region is kept, with holes filled; otherwise
8-connected regions smaller than ``min_size`` pixels are removed.

Instance labels come from a separation map ``s`` in [0, 1], high between touching
objects (`separation_map`, by ``ModelConfig.instance_map``):

    boundary: s = the boundary probability
    distance: s = 1 − the predicted distance to the border (1 at each object's centre)
    hover:    s = the HoVer-Net gradient energy: clip(max(−∂x/∂x, −∂y/∂y) / 0.01, 0, 1)
              of the predicted x and y offset maps (derivative-of-Gaussian, σ = 1 px):
              inside an object each map rises by about 2 / diameter per pixel; where
              two objects touch it falls from +1 to −1 within a few pixels

Seeds (markers) are the 4-connected components of (mask and s ≤ ``split_level``, the *split level*);
a watershed on s floods the raw mask from them; mask components without any seed
become their own instance; instances smaller than ``min_size`` pixels are removed; ids
are 1..K, and unique across the planes of a stack (plane i's ids follow plane i − 1's).
The same threshold slider therefore splits nuclei for every instance map. Each model carries
its own default split level, ``ModelConfig.split_level``, which training tunes on validation
AJI (`PostprocessOptions.for_model`).

Nucleus types (models with ``ModelConfig.type_names``): each instance takes the type
with the highest mean probability over its pixels, and that mean is its type confidence
(`assign_types`); the type map paints each instance with its type id.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from .deprecation import rename_keys, renamed_field

__all__ = [
    "PostprocessOptions",
    "assign_types",
    "marker_watershed",
    "object_confidence",
    "postprocess",
    "seed_markers",
    "separation_map",
]

HOVER_SMOOTHING = 1.0  # σ in pixels of the derivative-of-Gaussian applied to the HoVer maps
# A fall of this much per pixel in an x or y map is a full border (s = 1). Calibrated with
# benchmarks/hover_scale.py on CoNSeP val parents 19-20 (32 patches) with the 1,500-step HoVer model of the
# issue-10 ablation (seed 0): the best AJI is flat in the scale (0.5286 to 0.5298 over 0.01 to 0.09, each at
# its best level), but the best level moves: 0.05-0.1 at 0.045 and above, 0.4-0.5 at 0.01, where every level
# from 0.05 to 0.9 stays within 0.006 AJI of the best. So 0.01: the default level 0.5 is near the best and
# the whole slider range is usable.
HOVER_GRADIENT_SCALE = 0.01

# scipy and scikit-image are imported where used: `import napari_sgdc` imports this module
# eagerly (a lazily exported `postprocess` would be shadowed by this submodule's name).
_CROSS = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool)  # 4-connectivity
_SQUARE = np.ones((3, 3), bool)  # 8-connectivity


@renamed_field("boundary_threshold", "split_level")
@dataclass(frozen=True)
class PostprocessOptions:
    """How probabilities become a mask and instances (validated on construction).

    Attributes:
        threshold: mask probability threshold in [0, 1] (mask = probability > threshold).
        split_level: the instance split level: separation value in [0, 1] above which pixels
            do not seed instances (splits touching nuclei): the boundary probability, or,
            for distance and HoVer models, their separation map (see the module docstring).
            Called ``boundary_threshold`` before 0.2 (still accepted, deprecated).
        min_size: objects smaller than this many pixels are removed (>= 0).
    """

    threshold: float = 0.5
    split_level: float = 0.5
    min_size: int = 20

    def __post_init__(self) -> None:
        for name in ("threshold", "split_level"):
            value = getattr(self, name)
            if not _is_unit_number(value):
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
            object.__setattr__(self, name, float(value))
        size = self.min_size
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0:
            raise ValueError(f"min_size must be a whole number of pixels >= 0, got {size!r}")
        object.__setattr__(self, "min_size", int(size))

    @classmethod
    def for_model(cls, config, **overrides) -> "PostprocessOptions":
        """The defaults for a model: its ``ModelConfig`` fields of the same names (tuned on
        validation for instance models), then `overrides` (fields; None keeps the default)."""
        fields = {name: getattr(config, name, getattr(cls, name)) for name in ("threshold", "split_level", "min_size")}
        fields.update({name: value for name, value in rename_keys(cls, overrides).items() if value is not None})
        return cls(**fields)


def _is_unit_number(value: object) -> bool:
    """A real number (not a bool) in [0, 1]; huge integers and NaN are not."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        return False
    try:
        return math.isfinite(value) and 0.0 <= value <= 1.0
    except OverflowError:
        return False


def _check_map(name: str, array: np.ndarray) -> None:
    if not (array.dtype == bool or np.issubdtype(array.dtype, np.number)) or np.iscomplexobj(array):
        raise ValueError(f"{name} must hold real numbers, got dtype {array.dtype} (shape {array.shape})")
    if array.ndim not in (2, 3) or array.size == 0:
        raise ValueError(f"expected (H, W) or (N, H, W) {name} maps, got shape {array.shape}")


def _remove_small(objects: np.ndarray, min_size: int, connectivity: int = 1) -> np.ndarray:
    """Removes objects (a bool mask's components, or labels) of fewer than `min_size` pixels."""
    if min_size <= 1:
        return objects
    from skimage.morphology import remove_small_objects

    with warnings.catch_warnings():  # "only one label": a plane with one instance is fine
        warnings.filterwarnings("ignore", message="Only one label", category=UserWarning)
        return remove_small_objects(objects, max_size=min_size - 1, connectivity=connectivity)


def _semantic_plane(mask: np.ndarray, min_size: int, single_object: bool) -> np.ndarray:
    """Largest region with holes filled (single object), or small regions removed."""
    if not single_object:
        return _remove_small(mask, min_size, connectivity=2)
    from scipy import ndimage

    regions, count = ndimage.label(mask, structure=_SQUARE)
    if count == 0:
        return mask
    areas = np.bincount(regions.ravel())
    areas[0] = 0
    return ndimage.binary_fill_holes(regions == int(areas.argmax()))


def seed_markers(mask: np.ndarray, separation: np.ndarray, split_level: float) -> tuple[np.ndarray, int]:
    """The instance seeds of a plane: 4-connected components of (mask and separation ≤ split level).

    Returns:
        ``(markers, n)``: int32 marker ids 1..n (0 = no seed), and n.
    """
    from scipy import ndimage

    markers, count = ndimage.label(mask & ~(separation > split_level), structure=_CROSS)
    return markers.astype(np.int32), int(count)


def marker_watershed(mask: np.ndarray, separation: np.ndarray, markers: np.ndarray) -> np.ndarray:
    """Floods `mask` from `markers` on the separation map (4-connected); mask components that
    no marker reaches become their own objects, numbered after the markers' largest id.

    Click tools (`napari_sgdc.clicks`) re-run this inside one object with their own markers.

    Returns:
        int32 labels (0 outside `mask`).
    """
    from scipy import ndimage
    from skimage.segmentation import watershed

    if markers.any():
        labels = watershed(separation, markers, mask=mask, connectivity=1).astype(np.int32)
    else:
        labels = np.zeros(mask.shape, np.int32)
    unseeded = mask & (labels == 0)  # components that are boundary throughout
    if unseeded.any():
        extra, _ = ndimage.label(unseeded, structure=_CROSS)
        labels = np.where(extra > 0, extra + max(int(labels.max()), int(markers.max())), labels).astype(np.int32)
    return labels


def _instance_plane(mask: np.ndarray, boundary: np.ndarray, split_level: float, min_size: int) -> np.ndarray:
    """Seeded watershed of one plane; int32 labels 1..K."""
    from skimage.segmentation import relabel_sequential

    markers, _ = seed_markers(mask, boundary, split_level)
    labels = _remove_small(marker_watershed(mask, boundary, markers), min_size)
    return relabel_sequential(labels)[0].astype(np.int32)


def separation_map(maps: dict[str, np.ndarray], *, hover_scale: float = HOVER_GRADIENT_SCALE) -> np.ndarray:
    """The separation map of a model's output maps (module docstring), float32 in [0, 1].

    Args:
        maps: float (H, W) or (N, H, W) maps by name: ``boundary``, and ``distance`` or
            ``hover_x`` and ``hover_y`` for those instance maps (as `segment` computes them).
        hover_scale: the fall per pixel of a HoVer map that counts as a full border
            (calibrated by ``benchmarks/hover_scale.py``).

    Returns:
        float32 array of the maps' shape; the ``boundary`` map itself for boundary models.
    """
    if "distance" in maps:
        return np.clip(1.0 - np.asarray(maps["distance"], np.float32), 0.0, 1.0)
    if "hover_x" in maps:
        from scipy.ndimage import gaussian_filter

        hover_x, hover_y = (np.asarray(maps[name], np.float32) for name in ("hover_x", "hover_y"))
        lead = (0,) * (hover_x.ndim - 2)  # no smoothing across the planes of a stack
        d_dx = gaussian_filter(hover_x, (*lead, HOVER_SMOOTHING, HOVER_SMOOTHING), order=(*lead, 0, 1))
        d_dy = gaussian_filter(hover_y, (*lead, HOVER_SMOOTHING, HOVER_SMOOTHING), order=(*lead, 1, 0))
        return np.clip(np.maximum(-d_dx, -d_dy) / hover_scale, 0.0, 1.0).astype(np.float32)
    return np.asarray(maps["boundary"], np.float32)


def postprocess(probability: np.ndarray, separation: np.ndarray | None, options: PostprocessOptions | None = None,
                *, single_object: bool = False, instances: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Turns probabilities into the mask and, for instance models, the instance labels.

    Args:
        probability: float (H, W) or (N, H, W) foreground probability.
        separation: float array of the same shape, high between touching objects (the
            boundary probability, or `separation_map` of the outputs); needed only when
            `instances`.
        options: thresholds and minimum size (default `PostprocessOptions()`).
        single_object: the model's ``ModelConfig.single_object`` (one lesion per image).
        instances: also compute instance labels (``ModelConfig.is_instance``).

    Returns:
        ``(mask, labels)``: bool mask of the input's shape, and int32 labels (0 =
        background, ids unique across planes) or None when not `instances`.

    Raises:
        ValueError: shapes that are not (H, W) or (N, H, W), or that differ.
    """
    options = options or PostprocessOptions()
    probability = np.asarray(probability)
    _check_map("probability", probability)
    raw_mask = probability > options.threshold  # NaN compares False: background
    planes = raw_mask.reshape((-1,) + raw_mask.shape[-2:])  # (N, H, W)
    mask = np.stack([_semantic_plane(p, options.min_size, single_object) for p in planes]).reshape(raw_mask.shape)
    if not instances:
        return mask, None
    separation = np.asarray(separation) if separation is not None else None
    if separation is not None:
        _check_map("separation", separation)
    if separation is None or separation.shape != probability.shape:
        shape = None if separation is None else separation.shape
        raise ValueError(f"boundary shape {shape} differs from probability shape {probability.shape}")
    boundaries = np.nan_to_num(separation.reshape(planes.shape), nan=1.0)  # (N, H, W)
    labels = np.zeros(planes.shape, np.int32)
    offset = 0
    for index, (plane_mask, plane_boundary) in enumerate(zip(planes, boundaries)):
        plane = _instance_plane(plane_mask, plane_boundary, options.split_level, options.min_size)
        labels[index] = np.where(plane > 0, plane + offset, 0)
        offset += int(plane.max())
    return mask, labels.reshape(raw_mask.shape)


def object_confidence(labels: np.ndarray, uncertainty: np.ndarray) -> np.ndarray:
    """Per-instance confidence: 1 − the mean uncertainty over each instance's pixels.

    Args:
        labels: int (…, H, W) instance ids (0 = background).
        uncertainty: float array of the same shape, in [0, 1].

    Returns:
        float32 (K + 1,) with K = labels.max(); index 0 (background) and absent ids are 0.
    """
    labels = np.asarray(labels)
    size = int(labels.max()) + 1 if labels.size else 1
    counts = np.bincount(labels.ravel(), minlength=size)
    sums = np.bincount(labels.ravel(), weights=np.asarray(uncertainty, np.float64).ravel(), minlength=size)
    confidence = np.where(counts > 0, 1.0 - sums / np.maximum(counts, 1), 0.0)
    confidence[0] = 0.0
    return confidence.astype(np.float32)


def assign_types(labels: np.ndarray, type_probability: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One nucleus type per instance, from the pixels it covers.

    Args:
        labels: int (…, H, W) instance ids (0 = background).
        type_probability: float (…, H, W, T) per-pixel type probabilities (softmax over
            the T types), the same leading shape as `labels`.

    Returns:
        ``(types, confidence)``, each (K + 1,) with K = labels.max(), indexed by instance id
        (a *type table*): ``types`` int16 in 1..T (the type with the highest mean
        probability over the instance; ties go to the lower id), ``confidence`` float32
        that mean probability. Index 0 (background) and absent ids get type 0, confidence 0.

    Raises:
        ValueError: the shapes do not fit.
    """
    labels = np.asarray(labels)
    probability = np.asarray(type_probability)
    if probability.shape[:-1] != labels.shape or probability.ndim != labels.ndim + 1:
        raise ValueError(f"type probabilities of shape {probability.shape} do not fit labels of shape {labels.shape}")
    size = int(labels.max()) + 1 if labels.size else 1
    flat = labels.ravel()
    counts = np.bincount(flat, minlength=size)
    means = np.stack([np.bincount(flat, weights=probability[..., t].ravel().astype(np.float64), minlength=size)
                      for t in range(probability.shape[-1])], axis=1) / np.maximum(counts, 1)[:, None]  # (K+1, T)
    present = counts > 0
    present[0] = False
    types = np.where(present, means.argmax(axis=1) + 1, 0).astype(np.int16)
    confidence = np.where(present, means.max(axis=1), 0.0).astype(np.float32)
    return types, confidence
