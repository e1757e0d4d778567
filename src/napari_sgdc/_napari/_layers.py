"""Layer helpers: image planes in, aligned result layers out.

Every result layer copies the image layer's scale, translate, rotate, shear and
affine, so it lies exactly on the image. Gate maps are one layer per gate and block
(``<image> gate1 sgdc@s8``), with the image's own axes (no extra gate axis), at their
native stride: their scale is the image scale times the stride, and their translate
moves each gate pixel to the centre of the image pixels it covers.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from napari.layers import Image, Labels, Layer, Shapes

from napari_sgdc.grid import mpp_in_range
from napari_sgdc.session import PlaneInput

KIND_PROBABILITY = "probability"
KIND_MASK = "mask"
KIND_BOUNDARY = "SGE boundary"
KIND_UNCERTAINTY = "uncertainty"
KIND_REGION = "next region"
GATE_KINDS = ("gate1", "gate2")
UNCERTAINTY_COLORMAP = "sgdc unsure"
"""Transparent where the model is sure, then red, orange and yellow (most unsure): only
the unsure pixels are painted over the image, bright or dark."""
REGION_COLOR = "#ff4dff"


def result_name(image_name: str, kind: str, block: str | None = None) -> str:
    """Name of a result layer: ``"<image> mask"``, ``"<image> gate1 <block>"``..."""
    name = f"{image_name} {kind}"
    return f"{name} {block}" if block else name


def is_source_image(layer: Layer) -> bool:
    """Whether `layer` is an image the user opened (not one of SGDC's result layers)."""
    return isinstance(layer, Image) and "sgdc" not in layer.metadata


def source_images(viewer: Any) -> list[Image]:
    """The viewer's image layers that can be segmented, in layer order."""
    return [layer for layer in viewer.layers if is_source_image(layer)]


def layer_pixels(layer: Image) -> np.ndarray:
    """The layer's full-resolution data as an array (level 0 of a multiscale image)."""
    data = layer.data[0] if layer.multiscale else layer.data
    return np.asarray(data)


def spatial_shape_of(layer: Layer) -> tuple[int, ...]:
    """The layer's data shape without the RGB(A) channel axis."""
    shape = tuple((layer.data[0] if getattr(layer, "multiscale", False) else layer.data).shape)
    if isinstance(layer, Image) and layer.rgb:
        return shape[:-1]
    return shape


def layer_mpp(layer: Layer) -> float | None:
    """The layer's pixel size in µm, from its scale and units, when its last two axes are in a
    length unit with the same pixel size (within 1 %) in `napari_sgdc.grid.MPP_RANGE`; else None (e.g. pixels)."""
    try:
        sizes = [float((float(scale) * unit).to("micrometer").magnitude)
                 for scale, unit in zip(layer.scale[-2:], layer.units[-2:])]
    except Exception:  # noqa: BLE001 - a unit that is not a length (pixel), or no units at all
        return None
    if len(sizes) != 2 or not mpp_in_range(sizes[0]) or abs(sizes[0] - sizes[1]) > 0.01 * sizes[0]:
        return None
    return sizes[0]


def image_planes(layer: Image, planes: str = "all", world_point: Sequence[float] | None = None) -> PlaneInput:
    """Flattens an RGB or grayscale image layer (2-D or a stack) into planes.

    Args:
        layer: the image layer.
        planes: ``"all"`` planes, or ``"current"`` (the plane shown at `world_point`).
        world_point: the viewer's ``dims.point``; needed for ``"current"``.

    Raises:
        ValueError: the layer has fewer than two spatial axes.
    """
    data = layer_pixels(layer)
    shape = spatial_shape_of(layer)
    if len(shape) < 2:
        raise ValueError(f"Image '{layer.name}' has shape {data.shape}: it needs at least 2 spatial axes.")
    lead_shape, spatial = tuple(shape[:-2]), (int(shape[-2]), int(shape[-1]))
    channel = data.shape[len(shape):]
    flat = data.reshape((-1, *spatial, *channel))  # (N, H, W[, C])
    if not lead_shape or planes == "all":
        return PlaneInput(flat, list(range(flat.shape[0])), lead_shape, spatial)
    flat_index = current_plane(layer, world_point)
    return PlaneInput(flat[flat_index : flat_index + 1], [flat_index], lead_shape, spatial)


def current_plane(layer: Layer, world_point: Sequence[float] | None) -> int:
    """The flat index of the plane of `layer` shown at the viewer's ``dims.point`` (0 for a 2-D layer)."""
    lead_shape = tuple(spatial_shape_of(layer)[:-2])
    if not lead_shape:
        return 0
    point = np.asarray(world_point if world_point is not None else np.zeros(layer.ndim), dtype=float)
    data_point = np.asarray(layer.world_to_data(point[-layer.ndim:]), dtype=float)
    index = tuple(
        int(np.clip(np.round(p), 0, n - 1)) for p, n in zip(data_point[: len(lead_shape)], lead_shape)
    )
    return int(np.ravel_multi_index(index, lead_shape))


def _find(viewer: Any, name: str, layer_type: type) -> Layer | None:
    """The layer called `name` if it has type `layer_type`, else None."""
    if name in viewer.layers and isinstance(viewer.layers[name], layer_type):
        return viewer.layers[name]
    return None


def transform_kwargs(image: Image) -> dict[str, Any]:
    """The image layer's data-to-world transform, to copy onto a result layer."""
    return {
        "scale": np.asarray(image.scale, dtype=float),
        "translate": np.asarray(image.translate, dtype=float),
        "rotate": np.asarray(image.rotate, dtype=float),
        "shear": np.asarray(image.shear, dtype=float),
        "affine": image.affine.affine_matrix,
    }


def gate_transform_kwargs(image: Image, stride: int) -> dict[str, Any]:
    """Transform of a gate layer with data (*planes, h, w) at `stride`.

    A gate pixel i covers image pixels [i * stride, (i + 1) * stride), whose centre
    is at image pixel ``i * stride + (stride - 1) / 2``.
    """
    scale = np.asarray(image.scale, dtype=float)
    translate = np.asarray(image.translate, dtype=float)
    linear = _rotate_shear_matrix(image)
    offset = np.zeros_like(scale)
    offset[-2:] = (stride - 1) / 2.0
    gate_scale = scale.copy()
    gate_scale[-2:] *= stride
    return {
        "scale": gate_scale,
        "translate": translate + linear @ (scale * offset),
        "affine": image.affine.affine_matrix,
    }


def _rotate_shear_matrix(image: Image) -> np.ndarray:
    """The rotate-and-shear part of the image's data-to-physical transform."""
    from napari.utils.transforms import Affine

    ndim = image.ndim
    return Affine(rotate=image.rotate, shear=image.shear, ndim=ndim).linear_matrix


def _set_or_add(viewer: Any, name: str, layer_type: type, data: np.ndarray, new_kwargs: dict, transform: dict) -> Layer:
    """Replaces the data of layer `name` (same type and ndim), or adds a new layer."""
    existing = _find(viewer, name, layer_type)
    if existing is not None and existing.ndim == data.ndim:
        existing.data = data
        for key, value in transform.items():
            setattr(existing, key, value)
        if "contrast_limits" in new_kwargs:
            existing.contrast_limits = new_kwargs["contrast_limits"]
        existing.metadata.update(new_kwargs.get("metadata", {}))
        return existing
    if name in viewer.layers:
        viewer.layers.remove(name)
    if layer_type is Labels:
        return viewer.add_labels(data, name=name, **transform, **new_kwargs)
    return viewer.add_image(data, name=name, **transform, **new_kwargs)


def unflatten(planes: np.ndarray, lead_shape: tuple[int, ...]) -> np.ndarray:
    """(N, H, W) -> (*lead_shape, H, W)."""
    return planes.reshape((*lead_shape, *planes.shape[-2:]))


def show_result_layers(
    viewer: Any,
    image: Image,
    probability: np.ndarray,
    boundary: np.ndarray,
    mask: np.ndarray,
    lead_shape: tuple[int, ...],
    gates: list[dict[str, Any]] | None,
    uncertainty: np.ndarray | None = None,
) -> dict[str, Layer]:
    """Writes (or replaces) the probability, mask, boundary, uncertainty and gate layers of `image`.

    Args:
        viewer: the napari viewer.
        image: the segmented image layer.
        probability: (N, H, W) float32 in 0..1.
        boundary: (N, H, W) float32 in 0..1.
        mask: (N, H, W) labels (uint8 0/1 for semantic, int32 instances).
        lead_shape: the image's plane axes.
        gates: one dict per guided block: {"name", "stride", "data": (2, N, h, w) float16},
            gate1 then gate2; each gate becomes its own layer with the image's axes.
        uncertainty: (N, H, W) float32 in 0..1, or None: then a stale ``<image> uncertainty``
            layer of an earlier run is removed.

    When layers were added (napari then selects them), the mask layer is left selected.

    Returns:
        The layers by kind (gate layers by ``"gate1 <block>"`` and ``"gate2 <block>"``).
    """
    transform = transform_kwargs(image)
    meta = {"sgdc": {"image": image.name}}
    layers: dict[str, Layer] = {}
    n_layers = len(viewer.layers)
    layers[KIND_PROBABILITY] = _set_or_add(
        viewer, result_name(image.name, KIND_PROBABILITY), Image, unflatten(probability, lead_shape),
        {"colormap": "magma", "contrast_limits": (0.0, 1.0), "blending": "additive", "opacity": 0.7,
         "visible": False, "metadata": meta},
        transform,
    )
    layers[KIND_BOUNDARY] = _set_or_add(
        viewer, result_name(image.name, KIND_BOUNDARY), Image, unflatten(boundary, lead_shape),
        {"colormap": "cyan", "contrast_limits": (0.0, 1.0), "blending": "additive", "opacity": 0.9,
         "visible": True, "metadata": meta},
        transform,
    )
    layers[KIND_MASK] = _set_or_add(
        viewer, result_name(image.name, KIND_MASK), Labels, unflatten(mask, lead_shape),
        {"opacity": 0.5, "metadata": meta},
        transform,
    )
    if uncertainty is not None:
        layers[KIND_UNCERTAINTY] = _set_or_add(
            viewer, result_name(image.name, KIND_UNCERTAINTY), Image, unflatten(uncertainty, lead_shape),
            {"colormap": uncertainty_colormap(), "contrast_limits": (0.0, 1.0), "blending": "translucent",
             "opacity": 0.9, "visible": False, "metadata": meta},
            transform,
        )
    elif _find(viewer, result_name(image.name, KIND_UNCERTAINTY), Image) is not None:
        viewer.layers.remove(result_name(image.name, KIND_UNCERTAINTY))
    for gate in gates or []:
        stride = int(gate["stride"])
        for index, kind in enumerate(GATE_KINDS):
            data = gate["data"][index].reshape((*lead_shape, *gate["data"].shape[-2:]))  # (*planes, h, w)
            layers[f"{kind} {gate['name']}"] = _set_or_add(
                viewer, result_name(image.name, kind, gate["name"]), Image, data,
                {"colormap": "viridis", "contrast_limits": gate_contrast(data), "visible": False,
                 "opacity": 0.8,
                 "metadata": {"sgdc": {"image": image.name, "stride": stride, "block": gate["name"],
                                       "gate": f"{kind} (channel mean)"}}},
                gate_transform_kwargs(image, stride),
            )
    if len(viewer.layers) != n_layers:  # napari selected each new layer: select the one to correct
        viewer.layers.selection.active = layers[KIND_MASK]
    return layers


def gate_contrast(data: np.ndarray) -> tuple[float, float]:
    """Contrast limits of a gate map: its 1st-99th percentile (gates are sigmoids in 0..1,
    but a block's channel means often span a narrow range)."""
    values = np.asarray(data, dtype=np.float32)
    low, high = (float(v) for v in np.percentile(values, [1, 99])) if values.size else (0.0, 1.0)
    return (low, high) if high > low else (0.0, 1.0)


def mask_layer_of(viewer: Any, image: Image) -> Labels | None:
    """The ``"<image> mask"`` Labels layer if it exists."""
    return _find(viewer, result_name(image.name, KIND_MASK), Labels)


def gate_layer_of(viewer: Any, image: Image, index: int, block: str) -> Image | None:
    """The ``"<image> gate1 <block>"`` (index 0) or ``gate2`` (index 1) layer if it exists."""
    return _find(viewer, result_name(image.name, GATE_KINDS[index], block), Image)


def image_of_result(viewer: Any, layer: Layer) -> Image | None:
    """The image a result layer (``"<image> mask"``, a gate map...) was made from, if still open.

    A Labels layer named ``"<image> mask"`` without SGDC metadata (e.g. reopened from
    disk) also counts.
    """
    image_name = (layer.metadata.get("sgdc") or {}).get("image")
    if image_name is None and isinstance(layer, Labels) and layer.name.endswith(f" {KIND_MASK}"):
        image_name = layer.name[: -len(KIND_MASK) - 1]
    if image_name is None:
        return None
    image = _find(viewer, image_name, Image)
    return image if image is not None and is_source_image(image) else None


def uncertainty_colormap() -> Any:
    """The `UNCERTAINTY_COLORMAP`: transparent (0, sure) → red → orange → yellow (1, unsure)."""
    from napari.utils.colormaps import Colormap

    colors = [[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.55], [1.0, 0.55, 0.0, 0.8], [1.0, 1.0, 0.0, 0.95]]
    return Colormap(colors, controls=[0.0, 0.25, 0.6, 1.0], name=UNCERTAINTY_COLORMAP)


def uncertainty_layer_of(viewer: Any, image: Image) -> Image | None:
    """The ``"<image> uncertainty"`` Image layer if it exists."""
    return _find(viewer, result_name(image.name, KIND_UNCERTAINTY), Image)


def set_confidence_features(layer: Labels, confidence: np.ndarray | None) -> None:
    """Puts per-object confidence into the mask layer's features (napari shows it on hover).

    Args:
        layer: the ``"<image> mask"`` Labels layer.
        confidence: float (K + 1,), confidence[i] of label i; None clears the table.
    """
    if confidence is None:
        if "confidence" in layer.features:
            layer.features = {}
        return
    values = np.asarray(confidence, dtype=np.float64).copy()
    values[0] = np.nan  # the background: napari then shows no confidence there
    layer.features = {"index": np.arange(len(values)), "confidence": values}


def show_region(viewer: Any, image: Image, plane: tuple[int, ...], bounds: tuple[int, int, int, int]) -> Shapes:
    """Outlines the region `bounds` (top, left, bottom, right; end-exclusive pixels) of one plane
    in the ``"<image> next region"`` Shapes layer (created on first use, aligned like the
    other result layers). The active layer stays the one the user had.

    Args:
        viewer: the napari viewer.
        image: the image layer.
        plane: the plane's index on the image's plane axes (``()`` for a 2-D image).
        bounds: the region in pixels.
    """
    top, left, bottom, right = bounds
    corners = [(top, left), (top, right), (bottom, right), (bottom, left)]
    rectangle = np.array([[*plane, row - 0.5, col - 0.5] for row, col in corners], dtype=float)
    width = max(0.5, max(bottom - top, right - left) / 128)  # about 5 screen pixels once Next region zooms
    name = result_name(image.name, KIND_REGION)
    layer = _find(viewer, name, Shapes)
    if layer is not None and layer.ndim == rectangle.shape[1]:
        layer.data = [rectangle]
        layer.shape_type = ["rectangle"]
        layer.edge_width = [width]
        layer.edge_color = [REGION_COLOR]
        for key, value in transform_kwargs(image).items():
            setattr(layer, key, value)
        return layer
    if name in viewer.layers:
        viewer.layers.remove(name)
    active = viewer.layers.selection.active
    layer = viewer.add_shapes(
        [rectangle], shape_type="rectangle", name=name, edge_color=REGION_COLOR, face_color="transparent",
        edge_width=width, opacity=1.0, metadata={"sgdc": {"image": image.name}}, **transform_kwargs(image),
    )
    if active is not None and active in viewer.layers:
        viewer.layers.selection.active = active
    return layer
