"""Segmentation results cached per image, in flattened plane form (headless).

A `CachedResult` holds an image's latest probability, boundary (and separation,
uncertainty) maps, so moving a threshold re-post-processes without a forward pass, and the
mask last written, so the user's edits can be told from the model's. `merge_result` puts a
`napari_sgdc.inference.SegmentationResult` into the cache *using the mask and labels that
`segment` already post-processed*: post-processing runs once per segmentation (again only
when the options changed while the network ran).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from napari_sgdc.postprocess import PostprocessOptions
from napari_sgdc.session.types import TypeOverrides, type_table_of

__all__ = ["CachedResult", "PlaneInput", "as_planes", "merge_result", "renumber_planes"]


@dataclass
class PlaneInput:
    """An image's pixels, flattened to planes.

    Attributes:
        planes: (n, H, W) or (n, H, W, C) pixels of the planes to segment.
        indices: flat plane index of each entry of `planes`.
        lead_shape: the image's plane axes (``()`` for one 2-D image).
        spatial_shape: (H, W).
    """

    planes: np.ndarray
    indices: list[int]
    lead_shape: tuple[int, ...]
    spatial_shape: tuple[int, int]

    @property
    def n_planes(self) -> int:
        """Total number of planes of the image."""
        return int(np.prod(self.lead_shape)) if self.lead_shape else 1


@dataclass
class CachedResult:
    """One image's latest segmentation, in flattened plane form.

    Attributes:
        probability: (N, H, W) float32 mask probability, N = number of planes.
        boundary: (N, H, W) float32 boundary probability.
        segmented: (N,) bool, which planes hold a real result.
        lead_shape: the image's plane axes (``()`` for a 2-D image).
        instances: whether the mask is an instance labelling.
        written_mask: (N, H, W) what was last written into the mask (uint8 0/1, or int32
            instance ids), used to tell whether the user painted corrections.
        model_source: the model that produced the result.
        single_object: semantic masks keep one filled region (the model config's ``single_object``).
        uncertainty: (N, H, W) float32 per-pixel uncertainty in [0, 1], or None when not computed.
        separation: (N, H, W) float32 map the instance split thresholds, for models whose
            ``instance_map`` is ``distance`` or ``hover``; None when it is the boundary.
        mpp: the image's µm per pixel the model was run with (`segment(mpp=...)`), so
            fine-tuning on corrections of this image resamples it alike; None: as given.
        type_probability: (N, H, W, T) float32 per-pixel type probabilities of a typed model
            (``ModelConfig.type_names``), else None.
        type_names, type_colors: the model's types (empty: an untyped model).
        object_types, type_confidence: the type table of `written_mask` (`retype`), or None.
        overrides: the types the user set, by label id (undoable; cleared when the mask is
            written anew).
    """

    probability: np.ndarray
    boundary: np.ndarray
    segmented: np.ndarray
    lead_shape: tuple[int, ...]
    instances: bool
    written_mask: np.ndarray
    model_source: str
    single_object: bool = False
    uncertainty: np.ndarray | None = None
    separation: np.ndarray | None = None
    mpp: float | None = None
    type_probability: np.ndarray | None = None
    type_names: tuple[str, ...] = ()
    type_colors: tuple[str, ...] = ()
    object_types: np.ndarray | None = None
    type_confidence: np.ndarray | None = None
    overrides: TypeOverrides = field(default_factory=TypeOverrides)

    @classmethod
    def empty(cls, planes: PlaneInput, instances: bool, model_source: str) -> "CachedResult":
        """A cache of `planes.n_planes` planes of which none is segmented yet."""
        shape = (planes.n_planes, *planes.spatial_shape)
        return cls(probability=np.zeros(shape, np.float32), boundary=np.zeros(shape, np.float32),
                   segmented=np.zeros(shape[0], bool), lead_shape=planes.lead_shape, instances=instances,
                   written_mask=np.zeros(shape, np.int32 if instances else np.uint8), model_source=model_source)

    def has_uncertainty(self, plane: int) -> bool:
        """Whether plane `plane` was segmented with its uncertainty computed."""
        return self.uncertainty is not None and bool(self.segmented[plane])

    def confidence(self, mask: np.ndarray | None = None) -> np.ndarray | None:
        """Per-object confidence of an instance mask (`napari_sgdc.postprocess.object_confidence`).

        Args:
            mask: (N, H, W) instance labels; default the written mask.

        Returns:
            float32 (K + 1,), confidence[i] of label i (0 for the background and absent ids),
            or None for semantic masks or without uncertainty.
        """
        if not self.instances or self.uncertainty is None:
            return None
        from napari_sgdc.postprocess import object_confidence

        labels = self.written_mask if mask is None else mask
        indices = np.flatnonzero(self.segmented)
        return object_confidence(labels[indices], self.uncertainty[indices])

    @property
    def has_types(self) -> bool:
        """Whether the result has nucleus types (a typed instance model made it)."""
        return self.instances and self.type_probability is not None and bool(self.type_names)

    def retype(self) -> None:
        """The type table of the written mask from the type probabilities; the user's
        overrides are dropped (the mask was written anew: its ids changed)."""
        self.overrides.clear()
        self.object_types = self.type_confidence = None
        if self.has_types:
            self.object_types, self.type_confidence = type_table_of(self.written_mask, self.type_probability)

    def types_of(self, labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray] | None:
        """The type table of `labels` (default: the written mask), of the shape of the written
        mask: each object's type from its pixels' probabilities, unless the user set it.

        Returns:
            ``(types, confidence)`` (K + 1,) indexed by label id (confidence 1 where the user set
            the type), or None for a result without types.
        """
        if not self.has_types:
            return None
        if labels is None and self.object_types is not None:
            labels, types, confidence = self.written_mask, self.object_types, self.type_confidence
        else:
            labels = self.written_mask if labels is None else np.asarray(labels).reshape(self.written_mask.shape)
            types, confidence = type_table_of(labels, self.type_probability)
        return self.overrides.apply(labels, types, confidence)

    def postprocessed(self, options: PostprocessOptions) -> np.ndarray:
        """The mask of every segmented plane from the cached probabilities (no network call).

        All segmented planes go through `napari_sgdc.postprocess.postprocess` together,
        so instance ids stay unique across the planes of a stack, exactly as `segment` gives.

        Returns:
            (N, H, W) mask (uint8 0/1) or instance labels (int32); planes never segmented are 0.
        """
        post = importlib.import_module("napari_sgdc.postprocess")  # the package exports a function of that name
        out = np.zeros(self.probability.shape, np.int32 if self.instances else np.uint8)
        indices = np.flatnonzero(self.segmented)
        if len(indices):
            split = self.boundary if self.separation is None else self.separation
            mask, labels = post.postprocess(self.probability[indices], split[indices], options,
                                            single_object=self.single_object, instances=self.instances)
            out[indices] = labels if self.instances else mask
        return out


def as_planes(array: np.ndarray, n: int) -> np.ndarray:
    """(H, W) or (n, H, W) -> (n, H, W)."""
    array = np.asarray(array)
    return array[None] if array.ndim == 2 and n == 1 else array


def renumber_planes(labels: np.ndarray, segmented: np.ndarray) -> np.ndarray:
    """Instance ids 1..K per segmented plane, shifted past the ids of the planes before it
    (what `napari_sgdc.postprocess.postprocess` gives a stack), in place.

    Args:
        labels: (N, H, W) int32 instance ids.
        segmented: (N,) bool, the planes to number (the others are left as they are).
    """
    offset = 0
    for index in np.flatnonzero(segmented):
        plane = labels[index]
        values, inverse = np.unique(plane, return_inverse=True)
        local = inverse.reshape(plane.shape) + (values[0] != 0)  # background 0 -> 0, objects 1..K
        labels[index] = np.where(plane > 0, local + offset, 0)
        offset += int(len(values) - (values[0] == 0))
    return labels


def _merge_maps(cache: CachedResult, planes: PlaneInput, result: Any, reuse: bool) -> None:
    """The result's maps into the cache planes `planes.indices`."""
    n_new = len(planes.indices)
    cache.probability[planes.indices] = as_planes(result.probability, n_new)
    cache.boundary[planes.indices] = as_planes(result.boundary, n_new)
    if result.separation is not None and result.separation is not result.boundary:  # distance and HoVer models
        if cache.separation is None:
            cache.separation = cache.boundary.copy()  # planes segmented before split on their boundary
        cache.separation[planes.indices] = as_planes(result.separation, n_new)
    elif cache.separation is not None:
        cache.separation[planes.indices] = cache.boundary[planes.indices]
    cache.segmented[planes.indices] = True
    _merge_types(cache, planes, result, reuse)
    if result.uncertainty is None:
        cache.uncertainty = None  # stale for the planes segmented now
    else:
        if cache.uncertainty is None or not reuse:
            cache.uncertainty = np.zeros(cache.probability.shape, np.float32)
        cache.uncertainty[planes.indices] = as_planes(result.uncertainty, n_new)


def _merge_types(cache: CachedResult, planes: PlaneInput, result: Any, reuse: bool) -> None:
    """The result's type probabilities (H, W, T) into the cache planes `planes.indices`."""
    probability = getattr(result, "type_probability", None)
    if probability is None:
        cache.type_probability = None
        return
    probability = np.asarray(probability, np.float32)
    probability = probability[None] if probability.ndim == 3 else probability  # (n, H, W, T)
    shape = (*cache.probability.shape, probability.shape[-1])
    if cache.type_probability is None or not reuse or cache.type_probability.shape != shape:
        cache.type_probability = np.zeros(shape, np.float32)
    cache.type_probability[planes.indices] = probability


def merge_result(old: CachedResult | None, planes: PlaneInput, result: Any, *, model_source: str,
                 instances: bool, single_object: bool, used: PostprocessOptions,
                 options: PostprocessOptions) -> CachedResult:
    """Puts a `SegmentationResult` of `planes` into the image's cache (a new one unless only
    some planes of a stack were segmented again) and sets its written mask.

    The written mask of the new planes is the mask (or labels) that `segment` post-processed
    with `used`; instance ids of the other segmented planes stay unique (`renumber_planes`).
    Only when `options` differ from `used` (the sliders moved, or a model's defaults came,
    while the network ran) is everything post-processed again with `options`.

    Args:
        old: the image's cache, or None.
        planes: the planes that were segmented.
        result: their `napari_sgdc.inference.SegmentationResult`.
        model_source, instances, single_object: the model that produced `result`.
        used: the options `segment` post-processed with.
        options: the options the mask must show now.
    """
    n_total, height, width = planes.n_planes, *planes.spatial_shape
    reuse = (old is not None and old.probability.shape == (n_total, height, width)
             and old.instances == instances and len(planes.indices) < n_total)
    cache = old if reuse else CachedResult.empty(planes, instances, model_source)
    cache.model_source, cache.single_object = model_source, single_object
    _merge_maps(cache, planes, result, reuse)
    if used != options:
        cache.written_mask = cache.postprocessed(options)
        return cache
    fresh = result.labels if instances else result.mask
    written = cache.written_mask
    written[planes.indices] = as_planes(fresh, len(planes.indices)).astype(written.dtype)
    if instances and cache.segmented.sum() > len(planes.indices):  # earlier planes of the stack
        renumber_planes(written, cache.segmented)
    return cache
