"""Validation during training: whole images through the model, mean scores over the set."""

from __future__ import annotations

import threading

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch.utils.data import Dataset

from .. import metrics as seg_metrics
from ..device import eval_mode, forward, resolve_device
from ..model import SGDCSegmenter
from ..head_maps import head_maps
from ..postprocess import PostprocessOptions, postprocess, separation_map
from .losses import total_loss

__all__ = ["MARKER_THRESHOLDS", "MASK_THRESHOLDS", "MIN_SIZES", "MIN_SIZE_FLOOR", "tune_postprocess", "validate"]

MARKER_THRESHOLDS = tuple(round(0.1 * step, 1) for step in range(1, 10))
"""Separation levels (`PostprocessOptions.split_level`) tried when scoring AJI."""
MASK_THRESHOLDS = (0.4, 0.5, 0.6, 0.7)
"""Mask probability thresholds tried by `tune_postprocess`."""
MIN_SIZE_FLOOR = 30
"""The smallest ``min_size`` the tuning may pick, in pixels at the model's scale (1.9 µm² at 40×):
0.57 % of the whole (not border-cut) nuclei of CoNSeP train are smaller. Below it, the search
chased AJI by keeping fragments, and F1 and PQ fell (issue 23)."""
MIN_SIZES = (30, 40, 60, 80)
"""Smallest-object sizes (pixels) tried by `tune_postprocess` (none below `MIN_SIZE_FLOOR`)."""


def _pad_to_multiple(image: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pads (B, C, H, W) at the bottom/right to multiples of `multiple` (reflect where possible)."""
    height, width = image.shape[-2:]
    pad_h = (-height) % multiple
    pad_w = (-width) % multiple
    if pad_h == 0 and pad_w == 0:
        return image
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(image, (0, pad_w, 0, pad_h), mode=mode)  # (B, C, H', W')


def _instance_target(item: dict) -> np.ndarray:
    """(H, W) reference instance ids of a validation item.

    The item's ``instances`` (`SegmentationDataset` gives them for instance data), else
    the 4-connected components of the mask.
    """
    if "instances" in item:
        return item["instances"][0].numpy()  # (H, W)
    return ndimage.label(item["mask"][0].numpy() > 0.5)[0]  # (H, W)


def _forward(model: SGDCSegmenter, item: dict, device: torch.device, amp: bool) -> dict[str, torch.Tensor]:
    """The model's float32 outputs for one whole item, padded and cropped back: (1, 1 or 2, H, W) each."""
    image = item["image"][None].to(device)  # (1, 3, H, W)
    height, width = image.shape[-2:]
    outputs = forward(model, _pad_to_multiple(image, model.size_multiple), device, amp)
    heads = [key for key in ("mask", "edge", "distance", "hover") if key in outputs]
    return {key: outputs[key][..., :height, :width].float() for key in heads}


@torch.no_grad()
def validate(
    model: SGDCSegmenter,
    dataset: Dataset,
    *,
    device: torch.device | str = "cpu",
    amp: bool = False,
    edge_weight: float = 0.5,
    threshold: float = 0.5,
    marker_thresholds: tuple[float, ...] = MARKER_THRESHOLDS,
    cancel: threading.Event | None = None,
) -> dict[str, float] | None:
    """Mean IoU, Dice and loss of `model` over `dataset` (plus AJI for instance models).

    Each item is padded to a multiple of ``model.size_multiple``, run whole, and cropped
    back. IoU and Dice use ``probability > threshold``; AJI uses the instance labels of
    `napari_sgdc.postprocess.postprocess`, as `segment` would produce them, at each of
    `marker_thresholds` (``split_level``): the best mean AJI is reported, with the
    level that gave it. Every module's train/eval mode is restored afterwards.

    Args:
        model: the segmenter.
        dataset: items with ``image`` (3, H, W), ``mask`` and ``edge`` (1, H, W) and, for
            AJI, optionally ``instances`` (1, H, W); sizes may vary.
        device: where to run.
        amp: bf16 autocast where the device runs bf16 natively (`napari_sgdc.device.autocast`).
        edge_weight: λ_edge of the reported loss.
        threshold: mask probability threshold.
        marker_thresholds: separation levels tried for AJI (instance models).
        cancel: when set, validation stops and returns None.

    Returns:
        ``{"iou", "dice", "val_loss"}`` plus ``"aji"`` and ``"split_level"`` (its
        level; the first of ties) when ``model.config.is_instance``, ``"type_accuracy"``
        (of the nucleus pixels whose type is known) for a model with types; None when cancelled.
    """
    device = resolve_device(device)
    config = model.config
    if config.is_instance and not marker_thresholds:
        raise ValueError("marker_thresholds must hold at least one level")
    scores: dict[str, list[float]] = {"iou": [], "dice": [], "val_loss": []}
    aji = np.zeros((len(dataset), len(marker_thresholds)))  # (images, levels)
    type_pixels = [0, 0]  # pixels of a known type: typed right, all
    with eval_mode(model):
        for index in range(len(dataset)):
            if cancel is not None and cancel.is_set():
                return None
            item = dataset[index]
            outputs = _forward(model, item, device, amp)
            heads = list(outputs)
            targets = {key: item[key][None].to(device) for key in heads if key in item}  # (1, 1 or 2, H, W)
            scored = {key: outputs[key] for key in targets}  # heads without a target stay out of the loss
            loss, _ = total_loss(scored, targets, edge_weight, config.edge_supervision)
            scores["val_loss"].append(float(loss))
            probability = torch.sigmoid(outputs["mask"][0, 0]).cpu().numpy()  # (H, W)
            target = item["mask"][0].numpy() > 0.5  # (H, W)
            prediction = probability > threshold
            scores["iou"].append(seg_metrics.iou(prediction, target))
            scores["dice"].append(seg_metrics.dice(prediction, target))
            if "type" in outputs and "type" in item:
                typed = item["type"][0].numpy()  # (H, W) type ids, 0 = none
                predicted = outputs["type"][0].argmax(dim=0).cpu().numpy() + 1  # (H, W)
                type_pixels[0] += int((predicted == typed)[typed > 0].sum())
                type_pixels[1] += int((typed > 0).sum())
            if config.is_instance:
                maps = {name: value.cpu().numpy() for name, value in head_maps(outputs).items()}  # (H, W) each
                separation = separation_map(maps)  # (H, W)
                reference = _instance_target(item)
                for level, marker in enumerate(marker_thresholds):
                    options = PostprocessOptions(threshold=threshold, split_level=marker)
                    _, labels = postprocess(probability, separation, options, single_object=config.single_object,
                                            instances=True)
                    aji[index, level] = seg_metrics.aji(labels, reference)
    means = {key: float(np.mean(values)) for key, values in scores.items()}
    if type_pixels[1]:
        means["type_accuracy"] = type_pixels[0] / type_pixels[1]
    if config.is_instance:
        per_level = aji.mean(axis=0)  # (levels,)
        best = int(np.argmax(per_level))
        means["aji"] = float(per_level[best])
        means["split_level"] = float(marker_thresholds[best])
    return means


@torch.no_grad()
def tune_postprocess(
    model: SGDCSegmenter,
    dataset: Dataset,
    *,
    device: torch.device | str = "cpu",
    amp: bool = False,
    thresholds: tuple[float, ...] = MASK_THRESHOLDS,
    levels: tuple[float, ...] = MARKER_THRESHOLDS,
    min_sizes: tuple[int, ...] = MIN_SIZES,
    cancel: threading.Event | None = None,
) -> dict[str, float] | None:
    """The post-processing defaults of an instance model with the best validation AJI and PQ
    together: the highest ``(mean AJI + mean PQ) / 2``, sizes at or above `MIN_SIZE_FLOOR`.

    Runs each item through the model once, then `postprocess` at every combination of
    mask threshold, separation level and smallest-object size (exactly as `segment` would
    with those `PostprocessOptions`). Per-epoch validation tunes the level alone (cheap);
    this wider search is for a finished model (`napari-sgdc tune`, and the end of
    ``napari-sgdc train``). The caller stores the result in the model's config.

    Args:
        model: an instance segmenter (``model.config.is_instance``).
        dataset: validation items with ``image`` (3, H, W) and reference ``instances``
            (or a mask, split into 4-connected components).
        device, amp: where and how to run the network.
        thresholds, levels, min_sizes: the values tried.
        cancel: when set, the search stops and returns None.

    Returns:
        ``{"aji", "threshold", "split_level", "min_size", "object_f1", "pq", "objective",
        "aji_default"}``: the settings with the best objective (the first of ties, in grid
        order), their mean AJI, object F1, PQ and objective, and the AJI at the model's
        current defaults; None when cancelled.

    Raises:
        ValueError: a semantic model, an empty dataset, an empty grid or a size below
            `MIN_SIZE_FLOOR`.
    """
    if not model.config.is_instance:
        raise ValueError("tune_postprocess needs an instance model (task 'instance')")
    if len(dataset) == 0 or not (thresholds and levels and min_sizes):
        raise ValueError("tune_postprocess needs validation items and at least one value of each setting")
    if min(min_sizes) < MIN_SIZE_FLOOR:
        raise ValueError(f"min_sizes must be at least {MIN_SIZE_FLOOR} px (MIN_SIZE_FLOOR), got {min(min_sizes)}")
    device = resolve_device(device)
    combos = [(t, level, size) for t in thresholds for level in levels for size in min_sizes]
    current = PostprocessOptions.for_model(model.config)
    scores = np.zeros((len(dataset), len(combos), 3))  # (images, combinations, [aji, object_f1, pq])
    default_aji = []
    with eval_mode(model):
        for index in range(len(dataset)):
            if cancel is not None and cancel.is_set():
                return None
            item = dataset[index]
            maps = {name: value.cpu().numpy() for name, value in head_maps(_forward(model, item, device, amp)).items()}
            separation = separation_map(maps)  # (H, W)
            reference = _instance_target(item)
            for combo, (threshold, level, size) in enumerate(combos):
                options = PostprocessOptions(threshold=threshold, split_level=level, min_size=size)
                _, labels = postprocess(maps["probability"], separation, options,
                                        single_object=model.config.single_object, instances=True)
                found = seg_metrics.instance_scores(labels, reference)  # one matching for F1 and PQ
                scores[index, combo] = (found["aji"], found["object_f1"], found["pq"])
            _, labels = postprocess(maps["probability"], separation, current,
                                    single_object=model.config.single_object, instances=True)
            default_aji.append(seg_metrics.aji(labels, reference))
    means = scores.mean(axis=0)  # (combinations, 3)
    objective = (means[:, 0] + means[:, 2]) / 2.0  # (combinations,) AJI and PQ together
    best = int(np.argmax(objective))
    threshold, level, size = combos[best]
    return {"aji": float(means[best, 0]), "threshold": float(threshold), "split_level": float(level),
            "min_size": int(size), "object_f1": float(means[best, 1]), "pq": float(means[best, 2]),
            "objective": float(objective[best]), "aji_default": float(np.mean(default_aji))}
