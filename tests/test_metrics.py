"""Metrics against small cases computed by hand (and one MONAI cross-check)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from napari_sgdc import metrics


def _box(shape, rows, cols, value=True, dtype=bool):
    out = np.zeros(shape, dtype=dtype)
    out[rows[0]:rows[1], cols[0]:cols[1]] = value
    return out


def test_iou_and_dice_overlapping_squares():
    # 2x2 squares shifted by one column: intersection 2, union 6, sizes 4 + 4.
    pred = _box((4, 4), (0, 2), (0, 2))
    target = _box((4, 4), (0, 2), (1, 3))
    assert metrics.iou(pred, target) == pytest.approx(2 / 6)
    assert metrics.dice(pred, target) == pytest.approx(4 / 8)
    assert metrics.iou(pred, pred) == 1.0
    assert metrics.dice(pred, pred) == 1.0


def test_accepts_uint8_0_255_masks():
    pred = _box((4, 4), (0, 2), (0, 2), value=255, dtype=np.uint8)
    target = _box((4, 4), (0, 2), (1, 3))
    assert metrics.iou(pred, target) == pytest.approx(1 / 3)


def test_empty_mask_conventions():
    empty = np.zeros((6, 8), bool)
    full = _box((6, 8), (1, 3), (1, 3))
    assert metrics.iou(empty, empty) == 1.0
    assert metrics.dice(empty, empty) == 1.0
    assert metrics.hd95(empty, empty) == 0.0
    assert metrics.boundary_f1(empty, empty) == 1.0
    for a, b in ((empty, full), (full, empty)):
        assert metrics.iou(a, b) == 0.0
        assert metrics.dice(a, b) == 0.0
        assert metrics.hd95(a, b) == pytest.approx(math.hypot(6, 8)) == pytest.approx(10.0)
        assert metrics.boundary_f1(a, b) == 0.0


def test_hd95_single_pixels_is_their_distance():
    pred = np.zeros((10, 10), bool)
    target = np.zeros((10, 10), bool)
    pred[0, 0] = True
    target[3, 4] = True
    assert metrics.hd95(pred, target) == pytest.approx(5.0)


def test_hd95_uses_95th_percentile_and_max_of_directions():
    # pred surface = {(1,0), (1,10)}; target = {(1,0)}.
    # pred->target distances [0, 10] -> 95th percentile (linear) = 9.5; target->pred [0] -> 0.
    pred = np.zeros((3, 11), bool)
    target = np.zeros((3, 11), bool)
    pred[1, 0] = pred[1, 10] = True
    target[1, 0] = True
    assert metrics.hd95(pred, target) == pytest.approx(9.5)
    assert metrics.hd95(target, pred) == pytest.approx(9.5)


def test_hd95_uses_surfaces_not_interiors():
    # Two 5x5 squares, one shifted right by 2: every surface pixel of one lies within 2 of the other's.
    pred = _box((12, 12), (3, 8), (2, 7))
    target = _box((12, 12), (3, 8), (4, 9))
    assert metrics.hd95(pred, target) == pytest.approx(2.0)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI's own deprecated internal argument
def test_hd95_matches_monai():
    from monai.metrics import compute_hausdorff_distance
    from skimage.draw import disk, ellipse

    pred = np.zeros((64, 80), bool)
    target = np.zeros((64, 80), bool)
    pred[disk((30, 40), 14, shape=pred.shape)] = True
    pred[disk((10, 10), 4, shape=pred.shape)] = True
    target[ellipse(33, 38, 12, 18, shape=target.shape)] = True
    ours = metrics.hd95(pred, target)
    theirs = float(compute_hausdorff_distance(pred[None, None], target[None, None], percentile=95,
                                              include_background=True).item())
    assert ours == pytest.approx(theirs, abs=1e-5)
    assert ours > 1.0


def test_boundary_f1_with_tolerance():
    # pred surface {(0,0), (0,5)}, target surface {(0,1)}.
    pred = np.zeros((3, 8), bool)
    target = np.zeros((3, 8), bool)
    pred[0, 0] = pred[0, 5] = True
    target[0, 1] = True
    # tol 1: precision 1/2, recall 1 -> F1 = 2/3.
    assert metrics.boundary_f1(pred, target, tolerance=1) == pytest.approx(2 / 3)
    # tol 0: nothing matches.
    assert metrics.boundary_f1(pred, target, tolerance=0) == 0.0
    # tol 4: everything matches (distance (0,5)->(0,1) is 4, inclusive).
    assert metrics.boundary_f1(pred, target, tolerance=4) == 1.0


def test_boundary_f1_identical_and_shifted_squares():
    square = _box((20, 20), (5, 15), (5, 15))
    shifted = _box((20, 20), (5, 15), (8, 18))
    assert metrics.boundary_f1(square, square, tolerance=0) == 1.0
    assert metrics.boundary_f1(square, shifted, tolerance=3) == 1.0
    assert metrics.boundary_f1(square, shifted, tolerance=1) < 1.0


def test_aji_kumar_hand_case():
    shape = (4, 5)
    target = np.zeros(shape, np.uint16)
    target[0:2, 0:2] = 1  # A: 4 px
    target[0:2, 3:5] = 7  # B: 4 px (ids need not be contiguous)
    target[3, 3:5] = 9    # C: 2 px, overlapped by no prediction
    pred = np.zeros(shape, np.int32)
    pred[0:2, 0:5] = 4    # P: 10 px, best match of both A and B (reused, as in Kumar)
    pred[3, 0:2] = 2      # Q: 2 px, never used
    # C = |A∩P| + |B∩P| = 8; U = |A∪P| + |B∪P| + |C| + |Q| = 10 + 10 + 2 + 2 = 24.
    assert metrics.aji(pred, target) == pytest.approx(8 / 24)


def test_aji_perfect_permuted_and_empty():
    target = np.zeros((6, 6), np.int32)
    target[0:2, 0:2] = 1
    target[3:6, 3:6] = 2
    permuted = np.where(target == 1, 50, np.where(target == 2, 3, 0))
    assert metrics.aji(permuted, target) == 1.0
    empty = np.zeros_like(target)
    assert metrics.aji(empty, empty) == 1.0
    assert metrics.aji(empty, target) == 0.0
    assert metrics.aji(target, empty) == 0.0


def test_object_f1_one_to_one_at_iou_half():
    shape = (6, 8)
    target = np.zeros(shape, np.int32)
    target[0:2, 0:2] = 1   # A
    target[0:2, 4:6] = 2   # B
    target[4:6, 0:2] = 3   # C: prediction covers half of it -> IoU exactly 0.5, not a match
    pred = np.zeros(shape, np.int32)
    pred[0:2, 0:2] = 10    # A exactly
    pred[0:2, 4:6] = 11
    pred[1, 5] = 0         # B minus one pixel -> IoU 0.75
    pred[4, 0:2] = 12      # half of C
    pred[4:6, 6:8] = 13    # false positive
    match = metrics.match_instances(pred, target)
    assert (match.tp, match.fp, match.fn) == (2, 2, 1)
    assert sorted(match.pair_ious) == pytest.approx([0.75, 1.0])
    # F1 = 2*2 / (2*2 + 2 + 1) = 4/7.
    assert metrics.object_f1(pred, target) == pytest.approx(4 / 7)
    # Lower threshold: the half-covered nucleus now matches: TP 3, FP 1, FN 0 -> 6/7.
    assert metrics.object_f1(pred, target, iou_threshold=0.4) == pytest.approx(6 / 7)
    # PQ = (1.0 + 0.75) / (TP 2 + FP 2 / 2 + FN 1 / 2) = 1.75 / 3.5 = SQ 0.875 × DQ 4/7.
    assert metrics.panoptic_quality(pred, target) == pytest.approx(0.5)
    assert metrics.instance_scores(pred, target, iou_threshold=0.4)["pq"] == pytest.approx(0.5)  # PQ stays at 0.5
    assert metrics.panoptic_quality(target, target) == 1.0
    assert metrics.panoptic_quality(np.zeros_like(target), np.zeros_like(target)) == 1.0
    assert metrics.panoptic_quality(np.zeros_like(target), target) == 0.0


def test_object_f1_is_one_to_one():
    # One prediction covering two nuclei can match at most one of them.
    target = np.zeros((2, 6), np.int32)
    target[:, 0:3] = 1
    target[:, 3:6] = 2
    pred = np.ones((2, 6), np.int32)
    match = metrics.match_instances(pred, target, iou_threshold=0.3)
    assert (match.tp, match.fp, match.fn) == (1, 0, 1)
    assert metrics.object_f1(np.zeros_like(target), np.zeros_like(target)) == 1.0


def test_shape_mismatch_and_boolean_instances_rejected():
    with pytest.raises(ValueError, match="shape"):
        metrics.iou(np.zeros((3, 3)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="integer"):
        metrics.aji(np.zeros((3, 3), bool), np.zeros((3, 3), np.int32))


def test_score_dicts():
    target = _box((10, 10), (2, 6), (2, 6))
    scores = metrics.semantic_scores(target, target)
    assert scores == {"iou": 1.0, "dice": 1.0, "hd95": 0.0, "boundary_f1": 1.0}
    labels = target.astype(np.int32)
    assert metrics.instance_scores(labels, labels) == {"aji": 1.0, "object_f1": 1.0, "pq": 1.0}
