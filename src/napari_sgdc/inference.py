"""Inference: `segment()` any 2D image or stack with a trained SGDC model.

Pipeline for one plane:
    1. Input conversion with `napari_sgdc.data.transforms.to_float_rgb` (uint8, uint16,
       float; gray, RGB, RGBA; channels last) to float32 RGB in [0, 1].
    2. The image is cut into square tiles of ``tile`` pixels (rounded up to a multiple of
       32) whose origins are multiples of 32 and overlap by about ``overlap``; an image
       that fits in one tile is run in a single pass. Tiles and the single pass are
       reflect-padded at the bottom/right image border to multiples of 32.
    3. Each tile's probabilities (sigmoid of mask channel 0 and of the edge logits) are
       blended into image-sized float32 accumulators with a Gaussian weight
       (sigma = tile / 8, as MONAI's ``sliding_window_inference``), so memory is bounded
       by one tile plus a few float32 arrays of the image size.
    4. Optional gates: for each guided block, the channel means of gate1 and gate2 at the
       block's native stride are blended the same way at that stride, then stored as
       float16 ``GateMap``s with the stride recorded.
    5. `napari_sgdc.postprocess.postprocess` thresholds the probability into the mask
       and, for instance models, splits it into labelled instances with a seeded watershed.

Working grid (`napari_sgdc.grid`): when the image's µm/px is given (``mpp``) each plane
is resampled to the model's, or, when the model's ``config.resize_long_side`` is > 0,
resized so that its longer side has that many pixels (`napari_sgdc.grid.resample_image`);
the probability, boundary and gate maps are resampled back (`napari_sgdc.grid.resample_maps`)
before thresholding, so every output has the input's pixel size.

Stacks (Z or T, H, W [, C]) are processed plane by plane and every output gains a
leading plane axis.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .data.transforms import check_image, to_float_rgb
from .device import eval_mode, model_device, resolve_device
from .engines import Engine, get_engine
from .grid import check_image_mpp as check_mpp
from .grid import resample_image, resample_maps, working_shape
from .locks import model_lock
from .model import SGDCSegmenter
from .head_maps import dihedral, head_maps  # noqa: F401  (head_maps: public here too)
from .postprocess import PostprocessOptions, assign_types, object_confidence, postprocess, separation_map

__all__ = ["SegmentationResult", "GateMap", "Cancelled", "OutOfMemoryFallback", "check_mpp", "working_shape", "head_maps",
           "predict_maps", "segment", "tile_origins"]

SIZE_MULTIPLE = 32
MIN_TILE = 64
FALLBACK_MIN_TILE = 128
GAUSSIAN_SIGMA_SCALE = 0.125


class Cancelled(RuntimeError):
    """Raised by `segment` when its ``cancel`` event is set."""


UNCERTAINTY_METHODS = {
    "entropy": "binary entropy (bits) of the probability: free, from the one forward pass (or the TTA mean)",
    "tta": "2 × the standard deviation of the probability over the 8 test-time flips and rotations (8× the time)",
}
DEFAULT_UNCERTAINTY = "entropy"
"""Chosen by `benchmarks/uncertainty.py` (docs/results.md): it ranks wrong pixels as well as
the TTA spread at 1/8 of the cost."""


class OutOfMemoryFallback(UserWarning):
    """Warned by `segment` when it ran out of memory and retries with smaller tiles or on the CPU."""


def _is_out_of_memory(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def _fallback_plan(device: torch.device, tile: int) -> list[tuple[torch.device, int]]:
    """(device, tile) attempts after an out-of-memory error: halve the tile down to
    `FALLBACK_MIN_TILE`, then run on the CPU with the original tile."""
    plan = [(device, tile)]
    while plan[-1][1] // 2 >= FALLBACK_MIN_TILE:
        plan.append((device, _round_up(plan[-1][1] // 2, SIZE_MULTIPLE)))
    if device.type != "cpu":
        plan.append((torch.device("cpu"), tile))
    return plan


@dataclass
class GateMap:
    """Mean gate activations of one guided decoder block.

    Attributes:
        name: block name, e.g. ``sgdc@s16``.
        stride: the block's stride relative to the input image.
        data: float16 (2, h, w) with h = ceil(H / stride), w = ceil(W / stride): channel
            means of gate1 and gate2 (a leading plane axis is added for stacks).
    """

    name: str
    stride: int
    data: np.ndarray


@dataclass
class SegmentationResult:
    """Everything `segment` computes for one image (leading plane axis for stacks).

    Attributes:
        probability: float32 (H, W) foreground probability.
        mask: bool (H, W), probability > threshold.
        boundary: float32 (H, W) boundary probability.
        labels: int32 (H, W) instance labels (0 = background) for instance models, else None.
        gates: one `GateMap` per guided block (deepest first) when requested, else None.
        uncertainty: float32 (H, W) in [0, 1] when requested (see `UNCERTAINTY_METHODS`), else None.
        confidence: for instance models with uncertainty, float32 (K + 1,): confidence[i] is
            1 − the mean uncertainty of instance i (confidence[0], background, is 0).
        separation: float32 (H, W) in [0, 1], the map the instance split thresholds
            (`napari_sgdc.postprocess.separation_map`); `boundary` itself for boundary and
            semantic models.
        mpp: the image µm/px the network was run at (`segment`'s ``mpp``), None when the
            image was taken as it is; fine-tuning on corrections of this result uses the same.
        type_probability: for models with nucleus types, float32 (H, W, T) per-pixel type
            probabilities (type id ``t`` in channel ``t - 1``), else None.
        object_types, type_confidence: the type table of the instances (`assign_types`):
            (K + 1,) int16 type id and float32 confidence per label id, else None.
    """

    probability: np.ndarray
    mask: np.ndarray
    boundary: np.ndarray
    labels: np.ndarray | None = None
    gates: list[GateMap] | None = None
    uncertainty: np.ndarray | None = None
    confidence: np.ndarray | None = None
    separation: np.ndarray | None = None
    mpp: float | None = None
    type_probability: np.ndarray | None = None
    object_types: np.ndarray | None = None
    type_confidence: np.ndarray | None = None

    @property
    def type_map(self) -> np.ndarray | None:
        """uint8 (H, W) type id of each pixel's instance (0 = background), or None."""
        if self.object_types is None or self.labels is None:
            return None
        return self.object_types.astype(np.uint8)[self.labels]


def _round_up(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


def tile_origins(length: int, tile: int, step: int) -> list[int]:
    """Tile start positions along one axis of padded length `length`.

    Args:
        length: padded axis length (a multiple of 32).
        tile: tile length along the axis (<= length).
        step: distance between consecutive origins.

    Returns:
        Sorted origins; the last tile ends exactly at `length`.
    """
    last = length - tile
    origins = list(range(0, last + 1, step))
    if origins[-1] != last:
        origins.append(last)
    return origins


def _gaussian_weight(height: int, width: int) -> np.ndarray:
    """Separable Gaussian importance map (float32, max 1, strictly positive)."""

    def axis_weight(size: int) -> np.ndarray:
        sigma = max(size * GAUSSIAN_SIGMA_SCALE, 1e-3)
        position = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
        return np.exp(-0.5 * (position / sigma) ** 2)

    weight = np.outer(axis_weight(height), axis_weight(width))
    weight /= weight.max()
    return np.maximum(weight, 1e-6).astype(np.float32)


def _plane_input(plane: np.ndarray, y0: int, x0: int, height: int, width: int) -> np.ndarray:
    """Crops a tile from `plane`, converts it to float RGB and reflect-pads it to (height, width)."""

    crop = plane[y0:y0 + height, x0:x0 + width]
    rgb = to_float_rgb(crop)  # (h, w, 3) float32 in [0, 1]
    pad_rows, pad_cols = height - rgb.shape[0], width - rgb.shape[1]
    if pad_rows or pad_cols:
        rgb = np.pad(rgb, ((0, pad_rows), (0, pad_cols), (0, 0)), mode="reflect")
    return rgb


def _needs_global_conversion(dtype: np.dtype) -> bool:
    """Whether `to_float_rgb` depends on the whole image (not pixel-wise) for this dtype."""
    return not (dtype == np.uint8 or dtype == np.uint16 or dtype == bool)


def _check_tile(tile: object) -> None:
    """Raises a one-line ValueError unless `tile` is None, 0 or a whole number >= `MIN_TILE`."""
    whole = isinstance(tile, (int, np.integer)) or (isinstance(tile, (float, np.floating)) and float(tile).is_integer())
    if tile is None or (not isinstance(tile, bool) and whole and (tile == 0 or tile >= MIN_TILE)):
        return
    raise ValueError(f"tile must be 0 or None (whole image) or a whole number of at least {MIN_TILE} pixels, "
                     f"got {tile!r}")


def _is_stack(image: np.ndarray, stack: bool | None) -> bool:
    """Whether the first axis holds planes; None guesses, refusing the ambiguous channels-first case."""
    if stack is not None:
        return bool(stack)
    # A last axis of at most 4 is read as channels (so a 2-channel image gets a clear error
    # instead of becoming a stack of 2-pixel-wide planes).
    if image.ndim == 3 and image.shape[0] in (3, 4) and image.shape[-1] > 4:
        raise ValueError(f"image of shape {image.shape} looks channels-first: pass numpy.moveaxis(image, 0, -1) "
                         f"for an RGB image, or stack=True for {image.shape[0]} gray planes")
    return image.ndim == 4 or (image.ndim == 3 and image.shape[-1] > 4)


class _PlaneSegmenter:
    """Runs the tiled forward pass of one model over planes, sharing progress state.

    Each plane gives a dict of float32 maps: those of `head_maps` (``probability``,
    ``boundary`` and the instance-map heads), plus ``probability_sq`` (the mean squared
    probability over the test-time transforms) when the TTA spread is wanted, all blended
    over tiles with the same Gaussian weights.
    """

    def __init__(self, model, device, tile, overlap, return_gates, progress, cancel, n_planes, working_shape,
                 tta=False, spread=False, amp=False, engine: Engine | None = None):
        self.model = model
        self.amp = amp
        self.engine = engine or get_engine("torch")  # runs the network (napari_sgdc.engines)
        self.working_shape = tuple(working_shape)  # (h, w) the network sees, the same for every plane
        self.device = device
        self.tile = tile
        self.overlap = overlap
        self.return_gates = return_gates
        self.progress = progress
        self.cancel = cancel
        self.transforms = range(8) if tta else range(1)
        self.spread = spread
        self.total = len(_tile_layout(*working_shape, tile, overlap)[2]) * n_planes
        self.done = 0
        self._weights: dict[tuple[int, int], np.ndarray] = {}
        self.gaussian = True  # False: uniform weights (one pass: the maps are then exactly the model's)

    def weight(self, height: int, width: int) -> np.ndarray:
        key = (height, width)
        if key not in self._weights:
            self._weights[key] = _gaussian_weight(height, width) if self.gaussian else np.ones(key, np.float32)
        return self._weights[key]

    def run(self, plane: np.ndarray) -> tuple[dict[str, np.ndarray], list[GateMap] | None]:
        """Returns ({name: (H, W) float32 map}, gates list or None) for one plane.

        When the working shape differs from (H, W) (a working resolution, or a
        magnification other than the model's) the plane is resized to it, segmented, and
        the maps are resized back to (H, W) (gates to (ceil(H / stride), ceil(W / stride)),
        so their strides stay relative to the input).
        """
        height, width = plane.shape[:2]
        working = self.working_shape
        if working == (height, width):
            return self._run_native(plane)
        rgb = resample_image(to_float_rgb(plane), working)  # (h, w, 3)
        maps, gates = self._run_native(rgb.astype(np.float32))  # (h, w) maps at working size
        names = list(maps)
        resized = resample_maps(np.stack([maps[name] for name in names]), (height, width))  # (M, H, W)
        maps = dict(zip(names, resized))
        if gates is not None:
            gates = [GateMap(g.name, g.stride, resample_maps(g.data.astype(np.float32),
                                                            (math.ceil(height / g.stride), math.ceil(width / g.stride)))
                             .astype(np.float16)) for g in gates]
        return maps, gates

    def _forward_tile(self, batch: torch.Tensor) -> tuple[dict[str, np.ndarray], list]:
        """Maps (tile_h, tile_w) of one tile, averaged over the test-time transforms, and gate means."""
        sums: dict[str, torch.Tensor] = {}
        gate_means = []
        with torch.inference_mode():
            for index in self.transforms:
                with_gates = self.return_gates and index == 0
                out = self.engine(self.model, dihedral(batch, index), self.device, self.amp, return_gates=with_gates)
                parts = head_maps(out, index)  # (tile_h, tile_w) each
                if self.spread:
                    parts["probability_sq"] = parts["probability"] ** 2
                for name, value in parts.items():
                    sums[name] = sums[name] + value if name in sums else value
                for block in out.get("gates", []) if with_gates else []:
                    if "gate1" in block and "gate2" in block:
                        means = torch.stack([block["gate1"][0].float().mean(dim=0),
                                             block["gate2"][0].float().mean(dim=0)])  # (2, h, w)
                        gate_means.append((block["name"], int(block["stride"]), means.cpu().numpy()))
        count = len(self.transforms)
        return {name: (value / count).cpu().numpy() for name, value in sums.items()}, gate_means

    def _run_native(self, plane: np.ndarray) -> tuple[dict[str, np.ndarray], list[GateMap] | None]:
        """Tiled forward pass at the plane's own pixel size."""
        if _needs_global_conversion(plane.dtype):
            plane = to_float_rgb(plane)  # (H, W, 3): value scaling depends on the whole plane
        height, width = plane.shape[:2]
        tile_h, tile_w, origins = _tile_layout(height, width, self.tile, self.overlap)
        accumulators: dict[str, np.ndarray] = {}
        weight_acc = np.zeros((height, width), np.float32)
        gate_acc: list[dict] | None = [] if self.return_gates else None
        for y0, x0 in origins:
            if self.cancel is not None and self.cancel.is_set():
                raise Cancelled("segmentation cancelled")
            rgb = _plane_input(plane, y0, x0, tile_h, tile_w)  # (tile_h, tile_w, 3)
            batch = torch.from_numpy(rgb).permute(2, 0, 1)[None].to(self.device)  # (1, 3, tile_h, tile_w)
            maps, gate_means = self._forward_tile(batch)
            valid_h, valid_w = min(tile_h, height - y0), min(tile_w, width - x0)
            weight = self.weight(tile_h, tile_w)[:valid_h, :valid_w]
            window = (slice(y0, y0 + valid_h), slice(x0, x0 + valid_w))
            for name, value in maps.items():
                accumulator = accumulators.setdefault(name, np.zeros((height, width), np.float32))
                accumulator[window] += value[:valid_h, :valid_w] * weight
            weight_acc[window] += weight
            if gate_acc is not None:
                self._blend_gates(gate_acc, gate_means, y0, x0, height, width)
            del batch
            self.done += 1
            if self.progress is not None:
                self.progress(self.done, self.total)
        for accumulator in accumulators.values():
            np.divide(accumulator, weight_acc, out=accumulator)  # in place: sums become weighted means
        del weight_acc
        gates = None
        if gate_acc is not None:
            gates = []
            for entry in gate_acc:
                data = entry["sum"] / entry["weight"][None]  # (2, h, w)
                gates.append(GateMap(entry["name"], entry["stride"], data.astype(np.float16)))
        return accumulators, gates

    def _blend_gates(self, gate_acc, gate_means, y0, x0, height, width):
        if not gate_acc:
            for name, stride, means in gate_means:
                shape = (math.ceil(height / stride), math.ceil(width / stride))
                gate_acc.append({"name": name, "stride": stride,
                                 "sum": np.zeros((2, *shape), np.float32),
                                 "weight": np.zeros(shape, np.float32)})
        for entry, (_, stride, means) in zip(gate_acc, gate_means):
            gy, gx = y0 // stride, x0 // stride
            rows = min(means.shape[1], entry["weight"].shape[0] - gy)
            cols = min(means.shape[2], entry["weight"].shape[1] - gx)
            weight = self.weight(means.shape[1], means.shape[2])[:rows, :cols]
            entry["sum"][:, gy:gy + rows, gx:gx + cols] += means[:, :rows, :cols] * weight[None]
            entry["weight"][gy:gy + rows, gx:gx + cols] += weight


def _tile_layout(height: int, width: int, tile: int | None, overlap: float):
    """Tile size and origins for an image of (height, width).

    Returns:
        (tile_h, tile_w, [(y0, x0), ...]) in padded coordinates.
    """
    padded_h = _round_up(height, SIZE_MULTIPLE)
    padded_w = _round_up(width, SIZE_MULTIPLE)
    if not tile:
        return padded_h, padded_w, [(0, 0)]
    tile = _round_up(max(int(tile), SIZE_MULTIPLE), SIZE_MULTIPLE)
    tile_h, tile_w = min(tile, padded_h), min(tile, padded_w)
    step = max(SIZE_MULTIPLE, int(tile * (1.0 - overlap)) // SIZE_MULTIPLE * SIZE_MULTIPLE)
    origins = [(y0, x0) for y0 in tile_origins(padded_h, tile_h, step) for x0 in tile_origins(padded_w, tile_w, step)]
    return tile_h, tile_w, origins


def predict_maps(model: SGDCSegmenter, image: np.ndarray, *, tile: int | None = None, overlap: float = 0.25,
                 device: str | torch.device | None = None, tta: bool = False, amp: bool = False,
                 cancel: threading.Event | None = None, types: bool = False,
                 engine: str | Engine = "torch") -> tuple[np.ndarray, ...]:
    """The model's blended probability and separation maps of one 2-D image, without post-processing.

    The same forward pass as `segment` (tiles, Gaussian blending, working resolution, TTA),
    for callers that post-process regions themselves (whole-slide inference). No
    out-of-memory fallback.

    Args:
        model: an `SGDCSegmenter` (run in eval mode under its `model_lock`).
        image: (H, W[, C]) uint8, uint16 or float image.
        tile, overlap, device, tta, amp, cancel, engine: as in `segment`; ``tile=None`` runs one pass, whose
            maps are not blended (so a pixel-wise model gives the same value whatever the crop).
        types: also return the nucleus type probabilities.

    Returns:
        ``(probability, separation)``, float32 (H, W) each; the separation map
        (`napari_sgdc.postprocess.separation_map`) is the boundary for boundary models. With
        `types`, a third item: float32 (H, W, T) type probabilities (type id ``t`` in channel
        ``t - 1``, as `SegmentationResult.type_probability`), or None for a model without types.
    """
    array = np.asarray(image)
    check_image(array.shape, array.dtype)
    working = working_shape(*array.shape[:2], model.config, None)
    with model_lock(model), eval_mode(model):
        target = model_device(model) if device is None else resolve_device(device)
        runner = _PlaneSegmenter(model.to(target), target, tile, overlap, False, None, cancel, 1, working, tta=tta,
                                 amp=amp, engine=get_engine(engine, model, target, amp))
        runner.gaussian = bool(tile)  # one pass: no blending, so every pixel is exactly the model's output
        maps, _ = runner.run(array)
    if not types:
        return maps["probability"], separation_map(maps)
    names = [f"type_{t}" for t in range(1, len(getattr(model.config, "type_names", ()) or ()) + 1)]
    typed = np.stack([maps[name] for name in names], axis=-1) if names and names[0] in maps else None
    return maps["probability"], separation_map(maps), typed


def segment(model: SGDCSegmenter, image: np.ndarray, options: PostprocessOptions | None = None, *,
            tile: int | None = 512, overlap: float = 0.25, device: str | torch.device | None = None,
            return_gates: bool = False, tta: bool = False, uncertainty: bool | str = False,
            progress: Callable[[int, int], None] | None = None, cancel: threading.Event | None = None,
            stack: bool | None = None, mpp: float | None = None, amp: bool = False,
            engine: str | Engine = "torch") -> SegmentationResult:
    """Segments a 2D image or a stack of 2D planes of any size.

    Args:
        model: an `SGDCSegmenter`. It runs in eval mode for the call; the mode of every
            submodule is restored afterwards, and no weight or buffer changes. The call
            holds `napari_sgdc.locks.model_lock(model)`, so it never overlaps a fine-tune.
        image: (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array of uint8, uint16 or float, or
            a stack (N, H, W) / (N, H, W, C) of such planes.
        options: thresholds and minimum object size for `napari_sgdc.postprocess.postprocess`
            (default: the model's, `PostprocessOptions.for_model(model.config)`).
        tile: tile size in pixels (>= 64, rounded up to a multiple of 32) at the model's working
            resolution (``config.resize_long_side``, see the module docstring); None or 0
            runs the whole image in one pass.
        overlap: fraction of a tile shared with its neighbour, in [0, 1).
        device: where to run; None uses the model's device. The model is moved there.
        return_gates: also return the mean gate maps of the guided blocks (of the
            untransformed pass when `tta`).
        tta: test-time augmentation: average probability and boundary over the 8 flips and
            90° rotations (8 forward passes per tile, so about 8× the time).
        uncertainty: also return a per-pixel uncertainty map (and per-object confidence
            for instance models): True for the default method `DEFAULT_UNCERTAINTY`, or a
            name from `UNCERTAINTY_METHODS` (``"tta"`` implies `tta`).
        progress: called as ``progress(done, total)`` after every tile (all planes counted).
        cancel: when set, the call stops before the next tile and raises `Cancelled`.
        stack: treat the first axis as planes; None auto-detects (4D, or 3D whose last axis
            is longer than 4, i.e. cannot be channels).
        mpp: the image's µm per pixel. For models that record theirs (``config.mpp``, the
            nuclei model: 0.25, i.e. 40×) the image is resampled to the model's scale and the
            outputs back to the image's pixels, so a 20× image (0.5) gives correctly sized
            nuclei. None: the image is taken to be at the model's scale.
        amp: run the network under bf16 autocast where the device runs bf16 natively (a
            CUDA GPU, or a CPU with AVX512-BF16/AMX; `napari_sgdc.device.bf16_supported`),
            else in float32. On this project's CPU it is about 1.5× faster, with
            probabilities within about 0.005 of float32 (docs/performance.md).
        engine: what runs the network: a name of `napari_sgdc.engines.ENGINES` (``auto`` picks by the
            measured table) or an `napari_sgdc.engines.Engine`; all give the torch reference's maps
            within 1e-3 (an engine that fails warns and runs torch).

    Returns:
        A `SegmentationResult`; instance labels when ``model.config.is_instance``. Stacks
        get a leading plane axis on every array (and on each `GateMap.data`); instance ids
        are unique across the whole stack.

    Raises:
        Cancelled: when `cancel` is set during the run.
        ValueError: for unsupported image shapes or dtypes, a bad `overlap` or `tile`, or an engine that
            cannot run here.

    Out of memory: the run is retried with tiles halved down to 128 px, then on the CPU,
    each retry announced by an `OutOfMemoryFallback` warning (the GUI shows it).
    """
    array = np.asarray(image)
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    _check_tile(tile)
    is_stack = _is_stack(array, stack)
    planes = array if is_stack else array[None]
    if planes.ndim not in (3, 4) or planes.shape[0] == 0:
        raise ValueError(f"cannot segment an array of shape {array.shape}")
    try:
        check_image(planes.shape[1:], planes.dtype)
    except ValueError as error:
        where = f" (a plane of the stack of shape {array.shape})" if is_stack else ""
        raise ValueError(f"{error}{where}") from None
    method = DEFAULT_UNCERTAINTY if uncertainty is True else uncertainty or None
    if method is not None and method not in UNCERTAINTY_METHODS:
        raise ValueError(f"uncertainty must be True, False or one of {', '.join(UNCERTAINTY_METHODS)}, "
                         f"got {uncertainty!r}")
    tta = bool(tta) or method == "tta"
    config = model.config
    check_mpp(mpp, config)
    working = working_shape(*planes.shape[1:3], config, mpp)
    with model_lock(model), eval_mode(model):  # waits for a fine-tune of this model to end
        home = model_device(model)
        target_device = home if device is None else resolve_device(device)
        engine = get_engine(engine, model, target_device, amp)
        attempts = _fallback_plan(target_device, tile or max(_round_up(side, SIZE_MULTIPLE) for side in working))
        for number, (attempt_device, attempt_tile) in enumerate(attempts):
            runner = _PlaneSegmenter(model.to(attempt_device), attempt_device, attempt_tile if number else tile,
                                     overlap, return_gates, progress, cancel, len(planes), working,
                                     tta=tta, spread=method == "tta", amp=amp, engine=engine)
            try:
                outputs = [runner.run(plane) for plane in planes]
                break
            except RuntimeError as error:
                if not _is_out_of_memory(error) or number == len(attempts) - 1:
                    raise
                if attempt_device.type == "cuda":
                    torch.cuda.empty_cache()
                retry_device, retry_tile = attempts[number + 1]
                warnings.warn(f"segment: out of memory on {attempt_device.type} with {attempt_tile}-px tiles; "
                              f"retrying on {retry_device.type} with {retry_tile}-px tiles", OutOfMemoryFallback,
                              stacklevel=2)
        if model_device(model) != target_device:
            model.to(target_device)  # after a CPU fallback the model goes back where the caller put it

    maps = {name: np.stack([o[0][name] for o in outputs]) for name in outputs[0][0]}  # (N, H, W) each
    if not is_stack:
        maps = {name: value[0] for name, value in maps.items()}  # (H, W)
    probability, boundary = maps["probability"], maps["boundary"]
    separation = separation_map(maps) if config.is_instance else boundary
    options = options or PostprocessOptions.for_model(config)
    mask, labels = postprocess(probability, separation, options, single_object=config.single_object,
                               instances=config.is_instance)
    uncertainty_map = confidence = None
    if method is not None:
        uncertainty_map = _uncertainty(method, probability, maps.get("probability_sq"))
        if labels is not None:
            confidence = object_confidence(labels, uncertainty_map)
    type_probability = type_table = type_confidence = None
    if labels is not None and "type_1" in maps:
        type_probability = np.stack([maps[f"type_{t}"] for t in range(1, len(config.type_names) + 1)], axis=-1)
        type_table, type_confidence = assign_types(labels, type_probability)
    gates = None
    if return_gates:
        gates = outputs[0][1]
        if is_stack:
            gates = [GateMap(g.name, g.stride, np.stack([o[1][i].data for o in outputs]))
                     for i, g in enumerate(outputs[0][1])]
    return SegmentationResult(probability=probability, mask=mask, boundary=boundary, labels=labels, gates=gates,
                              uncertainty=uncertainty_map, confidence=confidence, separation=separation,
                              mpp=float(mpp) if mpp else None, type_probability=type_probability,
                              object_types=type_table, type_confidence=type_confidence)


def _uncertainty(method: str, probability: np.ndarray, probability_sq: np.ndarray | None) -> np.ndarray:
    """Per-pixel uncertainty in [0, 1] (see `UNCERTAINTY_METHODS`)."""
    if method == "tta":
        variance = np.clip(probability_sq - probability * probability, 0.0, 0.25)
        return (2.0 * np.sqrt(variance)).astype(np.float32)  # a std of values in [0, 1] is at most 0.5
    p = np.clip(probability, 1e-6, 1 - 1e-6)
    return (-(p * np.log2(p) + (1 - p) * np.log2(1 - p))).astype(np.float32)



