"""Segmentation metrics for binary masks and instance label maps (NumPy, no torch).

Semantic metrics take two boolean-compatible (H, W) arrays ``pred`` and ``target``
(anything non-zero is foreground). Instance metrics take two integer (H, W) label
maps with 0 = background; ids need not be contiguous.

Definitions:
    * ``iou`` = |P ∩ T| / |P ∪ T|; ``dice`` = 2|P ∩ T| / (|P| + |T|).
    * ``hd95``: symmetric 95th-percentile Hausdorff distance in pixels, as in MONAI
      (``compute_hausdorff_distance(..., percentile=95)``): the surface of a mask is the
      mask minus its binary erosion (4-connected structuring element, pixels outside the
      image count as background); for each direction take the 95th percentile (linear
      interpolation) of the Euclidean distances from one surface to the other, then the
      larger of the two directions.
    * ``boundary_f1``: the same surfaces; precision is the fraction of predicted surface
      pixels within ``tolerance`` pixels (Euclidean, inclusive) of the true surface, recall
      the converse; F1 is their harmonic mean.
    * ``aji``: Aggregated Jaccard Index of Kumar et al. (IEEE TMI 2017): every true
      instance is paired with the predicted instance of highest IoU (a prediction may be
      reused); C sums the intersections and U the unions of the pairs; true instances
      that overlap no prediction add their area to U, and predictions never used add
      their area to U. AJI = C / U.
    * ``object_f1``: one-to-one matching of instances (Hungarian assignment maximising
      the summed IoU) where a pair counts only if its IoU > ``iou_threshold`` (0.5);
      F1 = 2 TP / (2 TP + FP + FN).

Empty-mask conventions (chosen so that per-image means stay finite):
    * both empty: IoU = Dice = boundary F1 = AJI = object F1 = 1.0 and HD95 = 0.0;
    * exactly one empty: IoU = Dice = boundary F1 = AJI = object F1 = 0.0 and
      HD95 = the image diagonal sqrt(H² + W²), the largest distance possible in the
      image (a finite worst case, not NaN).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

__all__ = [
    "iou",
    "dice",
    "hd95",
    "boundary_f1",
    "aji",
    "object_f1",
    "panoptic_quality",
    "InstanceMatch",
    "match_instances",
    "semantic_scores",
    "instance_scores",
    "surface",
]

_CROSS = ndimage.generate_binary_structure(2, 1)


def _as_bool_pair(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred) != 0
    target = np.asarray(target) != 0
    if pred.shape != target.shape:
        raise ValueError(f"shape mismatch: prediction {pred.shape} vs target {target.shape}")
    if pred.ndim != 2:
        raise ValueError(f"expected 2D (H, W) masks, got shape {pred.shape}")
    return pred, target


def iou(pred: np.ndarray, target: np.ndarray) -> float:
    """Intersection over union of two binary masks (1.0 when both are empty).

    Args:
        pred: (H, W) predicted mask; non-zero is foreground.
        target: (H, W) reference mask.

    Returns:
        IoU in [0, 1].
    """
    pred, target = _as_bool_pair(pred, target)
    union = np.count_nonzero(pred | target)
    if union == 0:
        return 1.0
    return float(np.count_nonzero(pred & target) / union)


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice coefficient (F1 of pixels) of two binary masks (1.0 when both are empty).

    Args:
        pred: (H, W) predicted mask; non-zero is foreground.
        target: (H, W) reference mask.

    Returns:
        Dice in [0, 1].
    """
    pred, target = _as_bool_pair(pred, target)
    total = np.count_nonzero(pred) + np.count_nonzero(target)
    if total == 0:
        return 1.0
    return float(2.0 * np.count_nonzero(pred & target) / total)


def surface(mask: np.ndarray) -> np.ndarray:
    """Surface (inner boundary) pixels of a binary mask: the mask minus its erosion.

    Args:
        mask: (H, W) binary mask.

    Returns:
        (H, W) bool array, True on foreground pixels that touch the background
        (4-connectivity) or the image border.
    """
    mask = np.asarray(mask) != 0
    return mask & ~ndimage.binary_erosion(mask, structure=_CROSS, border_value=0)


def _distances_to(points: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Euclidean distance from every True pixel of `points` to the nearest True pixel of `reference`."""
    distance_map = ndimage.distance_transform_edt(~reference)  # (H, W) float64
    return distance_map[points]


def hd95(pred: np.ndarray, target: np.ndarray) -> float:
    """Symmetric 95th-percentile Hausdorff distance between mask surfaces, in pixels.

    Both empty gives 0.0; exactly one empty gives the image diagonal (see module docs).

    Args:
        pred: (H, W) predicted mask.
        target: (H, W) reference mask.

    Returns:
        HD95 in pixels.
    """
    pred, target = _as_bool_pair(pred, target)
    pred_any, target_any = pred.any(), target.any()
    if not pred_any and not target_any:
        return 0.0
    if not pred_any or not target_any:
        return float(math.hypot(*pred.shape))
    pred_surface, target_surface = surface(pred), surface(target)
    forward = np.percentile(_distances_to(pred_surface, target_surface), 95)
    backward = np.percentile(_distances_to(target_surface, pred_surface), 95)
    return float(max(forward, backward))


def boundary_f1(pred: np.ndarray, target: np.ndarray, tolerance: float = 2.0) -> float:
    """Boundary F1 score: F1 of surface pixels matched within `tolerance` pixels.

    Args:
        pred: (H, W) predicted mask.
        target: (H, W) reference mask.
        tolerance: maximum Euclidean distance in pixels (inclusive) for a surface pixel
            to count as matched.

    Returns:
        Boundary F1 in [0, 1] (1.0 when both masks are empty, 0.0 when only one is).
    """
    pred, target = _as_bool_pair(pred, target)
    pred_any, target_any = pred.any(), target.any()
    if not pred_any and not target_any:
        return 1.0
    if not pred_any or not target_any:
        return 0.0
    pred_surface, target_surface = surface(pred), surface(target)
    precision = float(np.mean(_distances_to(pred_surface, target_surface) <= tolerance))
    recall = float(np.mean(_distances_to(target_surface, pred_surface) <= tolerance))
    if precision + recall == 0:
        return 0.0
    return 2.0 * precision * recall / (precision + recall)


def _as_label_pair(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred)
    target = np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"shape mismatch: prediction {pred.shape} vs target {target.shape}")
    if pred.ndim != 2:
        raise ValueError(f"expected 2D (H, W) label maps, got shape {pred.shape}")
    if pred.dtype == bool or target.dtype == bool:
        raise ValueError("instance metrics need integer label maps, not boolean masks")
    return pred, target


def _overlaps(pred: np.ndarray, target: np.ndarray):
    """Pairwise areas of two label maps.

    Returns:
        (intersection (K_true, K_pred), true_areas (K_true,), pred_areas (K_pred,)) for
        the instances numbered 1..K after sequential relabelling (row/column i is id i+1).
    """
    _, true_index = np.unique(target, return_inverse=True)
    _, pred_index = np.unique(pred, return_inverse=True)
    true_index = true_index.reshape(-1)
    pred_index = pred_index.reshape(-1)
    # Index 0 is background only when the map actually contains 0.
    true_offset = 1 if (target == 0).any() else 0
    pred_offset = 1 if (pred == 0).any() else 0
    n_true = int(true_index.max()) + 1
    n_pred = int(pred_index.max()) + 1
    joint = np.bincount(true_index * n_pred + pred_index, minlength=n_true * n_pred)
    joint = joint.reshape(n_true, n_pred)
    intersection = joint[true_offset:, pred_offset:].astype(np.int64)
    true_areas = joint.sum(axis=1)[true_offset:].astype(np.int64)
    pred_areas = joint.sum(axis=0)[pred_offset:].astype(np.int64)
    return intersection, true_areas, pred_areas


def aji(pred: np.ndarray, target: np.ndarray) -> float:
    """Aggregated Jaccard Index (Kumar et al. 2017) of two instance label maps.

    Args:
        pred: (H, W) integer predicted labels, 0 = background.
        target: (H, W) integer reference labels, 0 = background.

    Returns:
        AJI in [0, 1] (1.0 when both maps are empty, 0.0 when only one is).
    """
    pred, target = _as_label_pair(pred, target)
    intersection, true_areas, pred_areas = _overlaps(pred, target)
    n_true, n_pred = len(true_areas), len(pred_areas)
    if n_true == 0 and n_pred == 0:
        return 1.0
    if n_true == 0 or n_pred == 0:
        return 0.0
    union = true_areas[:, None] + pred_areas[None, :] - intersection  # (K_true, K_pred)
    pair_iou = intersection / union
    best_pred = np.argmax(pair_iou, axis=1)  # (K_true,)
    rows = np.arange(n_true)
    matched = pair_iou[rows, best_pred] > 0
    overall_intersection = int(intersection[rows[matched], best_pred[matched]].sum())
    overall_union = int(union[rows[matched], best_pred[matched]].sum())
    overall_union += int(true_areas[~matched].sum())
    used = np.zeros(n_pred, dtype=bool)
    used[best_pred[matched]] = True
    overall_union += int(pred_areas[~used].sum())
    return float(overall_intersection / overall_union)


@dataclass
class InstanceMatch:
    """Result of one-to-one instance matching.

    Attributes:
        tp: matched pairs.
        fp: predicted instances without a match.
        fn: reference instances without a match.
        pair_ious: IoU of each matched pair.
    """

    tp: int
    fp: int
    fn: int
    pair_ious: list[float] = field(default_factory=list)

    @property
    def f1(self) -> float:
        """Object F1 = 2 TP / (2 TP + FP + FN); 1.0 when there are no objects at all."""
        denominator = 2 * self.tp + self.fp + self.fn
        return 1.0 if denominator == 0 else 2.0 * self.tp / denominator

    @property
    def pq(self) -> float:
        """Panoptic quality (Kirillov et al. 2019; the CoNIC metric) = SQ × DQ
        = Σ matched IoU / (TP + FP / 2 + FN / 2); 1.0 when there are no objects at all."""
        denominator = self.tp + 0.5 * self.fp + 0.5 * self.fn
        return 1.0 if denominator == 0 else float(sum(self.pair_ious)) / denominator


def match_instances(pred: np.ndarray, target: np.ndarray, iou_threshold: float = 0.5) -> InstanceMatch:
    """Matches instances one-to-one (Hungarian on IoU), keeping pairs with IoU > threshold.

    Args:
        pred: (H, W) integer predicted labels, 0 = background.
        target: (H, W) integer reference labels.
        iou_threshold: a pair counts only when its IoU is strictly above this.

    Returns:
        The counts of true positives, false positives and false negatives.
    """
    pred, target = _as_label_pair(pred, target)
    intersection, true_areas, pred_areas = _overlaps(pred, target)
    n_true, n_pred = len(true_areas), len(pred_areas)
    if n_true == 0 or n_pred == 0:
        return InstanceMatch(tp=0, fp=n_pred, fn=n_true)
    union = true_areas[:, None] + pred_areas[None, :] - intersection
    pair_iou = intersection / union  # (K_true, K_pred)
    eligible = np.where(pair_iou > iou_threshold, pair_iou, 0.0)
    rows, cols = linear_sum_assignment(eligible, maximize=True)
    keep = eligible[rows, cols] > 0
    pair_ious = [float(v) for v in pair_iou[rows[keep], cols[keep]]]
    tp = len(pair_ious)
    return InstanceMatch(tp=tp, fp=n_pred - tp, fn=n_true - tp, pair_ious=pair_ious)


def object_f1(pred: np.ndarray, target: np.ndarray, iou_threshold: float = 0.5) -> float:
    """Object-level F1 at an IoU threshold (one-to-one matching, IoU > threshold).

    Args:
        pred: (H, W) integer predicted labels, 0 = background.
        target: (H, W) integer reference labels.
        iou_threshold: matching threshold (0.5 by default).

    Returns:
        F1 in [0, 1] (1.0 when both maps are empty).
    """
    return match_instances(pred, target, iou_threshold).f1


def panoptic_quality(pred: np.ndarray, target: np.ndarray) -> float:
    """Panoptic quality of one image's instances (matches at IoU > 0.5, which are unique).

    Args:
        pred: (H, W) integer predicted labels, 0 = background.
        target: (H, W) integer reference labels.

    Returns:
        PQ in [0, 1]: detection quality (the object F1) times the mean IoU of the matched
        pairs; 1.0 when both maps are empty.
    """
    return match_instances(pred, target, 0.5).pq


def semantic_scores(pred: np.ndarray, target: np.ndarray, tolerance: float = 2.0) -> dict[str, float]:
    """All semantic metrics of one image.

    Args:
        pred: (H, W) predicted mask.
        target: (H, W) reference mask.
        tolerance: boundary F1 tolerance in pixels.

    Returns:
        {"iou", "dice", "hd95", "boundary_f1"}.
    """
    return {
        "iou": iou(pred, target),
        "dice": dice(pred, target),
        "hd95": hd95(pred, target),
        "boundary_f1": boundary_f1(pred, target, tolerance),
    }


def instance_scores(pred_labels: np.ndarray, target_labels: np.ndarray, iou_threshold: float = 0.5) -> dict[str, float]:
    """All instance metrics of one image.

    Args:
        pred_labels: (H, W) integer predicted labels.
        target_labels: (H, W) integer reference labels.
        iou_threshold: object F1 matching threshold (PQ always matches at IoU > 0.5).

    Returns:
        {"aji", "object_f1", "pq"}.
    """
    match = match_instances(pred_labels, target_labels, iou_threshold)
    at_half = match if iou_threshold == 0.5 else match_instances(pred_labels, target_labels, 0.5)
    return {"aji": aji(pred_labels, target_labels), "object_f1": match.f1, "pq": at_half.pq}
