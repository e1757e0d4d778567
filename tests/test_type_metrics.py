"""Nucleus-type metrics (`napari_sgdc.type_metrics`) against cases computed by hand, plus a MONAI cross-check."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest

from napari_sgdc.type_metrics import (
    TypeScores, check_types, detection_radius, object_centroids, pair_centroids, type_pq_counts,
)

DATA = Path(os.environ.get("NAPARI_SGDC_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def _maps(shape, objects):
    """A label map and its type lookup from {id: (row, col, height, width, type)}."""
    labels = np.zeros(shape, np.int32)
    types = np.zeros(max(objects, default=0) + 1, np.int64)
    for object_id, (row, col, height, width, kind) in objects.items():
        labels[row:row + height, col:col + width] = object_id
        types[object_id] = kind
    return labels, types


# True objects (4x4 boxes, centroid = corner + 1.5) and predictions (id: row, col, h, w, type):
#   T1 (0,0) t1   <- P1 same box, t1             pair, correct type 1, IoU 1
#   T2 (0,20) t2  <- P2 same box, t1             pair, true 2 predicted 1, IoU 1 (but types differ)
#   T3 (30,0) t1  <- P3 5 rows lower, t1         pair (distance 5), IoU 0
#   T4 (30,40) t2                                unpaired true (FN_d), type 2
#   T6 (50,0) t2  <- P6 one column right, t2     pair (distance 1), IoU 12/20 = 0.6
#                    P5 (50,50) t2               unpaired prediction (FP_d), type 2
# Ids are not contiguous (no T5, no P4).
TRUE = {1: (0, 0, 4, 4, 1), 2: (0, 20, 4, 4, 2), 3: (30, 0, 4, 4, 1), 4: (30, 40, 4, 4, 2), 6: (50, 0, 4, 4, 2)}
PRED = {1: (0, 0, 4, 4, 1), 2: (0, 20, 4, 4, 1), 3: (35, 0, 4, 4, 1), 5: (50, 50, 4, 4, 2), 6: (50, 1, 4, 4, 2)}


def test_hand_computed_scores():
    true_labels, true_types = _maps((64, 64), TRUE)
    pred_labels, pred_types = _maps((64, 64), PRED)
    scores = TypeScores()
    f_d_image = scores.add(pred_labels, pred_types, true_labels, true_types)
    summary = scores.summary(3)
    # F_d: TP 4 (P1, P2, P3, P6), FP 1 (P5), FN 1 (T4): 8 / (8 + 1 + 1) = 0.8.
    assert f_d_image == pytest.approx(0.8)
    assert summary["f_d"] == pytest.approx(0.8)
    # F_c type 1: pairs (true, pred) = (1,1) (2,1) (1,1) (2,2): TP 2, FP 1, FN 0, no unpaired
    # of type 1: 2*2 / (2*2 + 2*1) = 4/6. (Counting the (2,2) pair as TN would give 6/8.)
    assert summary["f_c_1"] == pytest.approx(4 / 6)
    # F_c type 2: TP 1 (T6-P6), FP 0, FN 1 (T2 predicted 1), unpaired P5 and T4:
    # 2*1 / (2*1 + 2*1 + 1 + 1) = 2/6.
    assert summary["f_c_2"] == pytest.approx(2 / 6)
    # PQ type 1: true {T1, T3}, predicted {P1, P2, P3}; only T1-P1 has IoU > 0.5 (IoU 1):
    # TP 1, FP 2, FN 1: 1 / (1 + 1 + 0.5) = 0.4.
    assert summary["pq_1"] == pytest.approx(0.4)
    # PQ type 2: true {T2, T4, T6}, predicted {P5, P6}; T6-P6 IoU 0.6: TP 1, FP 1, FN 2:
    # 0.6 / (1 + 0.5 + 1) = 0.24.
    assert summary["pq_2"] == pytest.approx(0.24)
    # Type 3 has no object anywhere: undefined, left out of mPQ = (0.4 + 0.24) / 2.
    assert math.isnan(summary["f_c_3"]) and math.isnan(summary["pq_3"])
    assert summary["mpq"] == pytest.approx(0.32)
    assert sorted(summary) == ["f_c_1", "f_c_2", "f_c_3", "f_d", "mpq", "pq_1", "pq_2", "pq_3"]


def test_type_pq_counts_per_image():
    true_labels, true_types = _maps((64, 64), TRUE)
    pred_labels, pred_types = _maps((64, 64), PRED)
    counts = type_pq_counts(pred_labels, pred_types, true_labels, true_types)
    assert sorted(counts) == [1, 2]
    np.testing.assert_allclose(counts[1], [1, 2, 1, 1.0])
    np.testing.assert_allclose(counts[2], [1, 1, 2, 0.6])


def test_a_misclassified_pair_weighs_twice_an_unpaired_object():
    true_labels, true_types = _maps((40, 40), {1: (0, 0, 4, 4, 1), 2: (20, 20, 4, 4, 1)})
    # One correct pair plus a pair predicted as type 2: F_c1 = 2 / (2 + 2*1) = 0.5.
    pred_labels, pred_types = _maps((40, 40), {1: (0, 0, 4, 4, 1), 2: (20, 20, 4, 4, 2)})
    misclassified = TypeScores()
    misclassified.add(pred_labels, pred_types, true_labels, true_types)
    # One correct pair plus a missed type-1 object: F_c1 = 2 / (2 + 1) = 2/3.
    pred_labels, pred_types = _maps((40, 40), {1: (0, 0, 4, 4, 1)})
    missed = TypeScores()
    missed.add(pred_labels, pred_types, true_labels, true_types)
    assert misclassified.summary(2)["f_c_1"] == pytest.approx(0.5)
    assert missed.summary(2)["f_c_1"] == pytest.approx(2 / 3)
    # Detection ignores types: 2 pairs (F_d 1) against 1 pair + 1 FN (2 / 3).
    assert misclassified.summary(2)["f_d"] == pytest.approx(1.0)
    assert missed.summary(2)["f_d"] == pytest.approx(2 / 3)


def test_pairs_exactly_at_the_radius_count_and_mpp_sets_the_radius():
    true_labels, true_types = _maps((40, 20), {1: (0, 0, 4, 4, 1), 2: (0, 10, 4, 4, 1)})
    # Centroids 12 rows apart (exactly the 12 px radius) and 13 rows apart (outside).
    pred_labels, pred_types = _maps((40, 20), {1: (12, 0, 4, 4, 1), 2: (13, 10, 4, 4, 1)})
    scores = TypeScores()
    # One pair, one FP, one FN: 2 / (2 + 1 + 1).
    assert scores.add(pred_labels, pred_types, true_labels, true_types) == pytest.approx(0.5)
    # At 0.25 µm/px the radius is 3 µm = 12 px again; at 0.2 µm/px it is 15 px (both pair);
    # at 0.5 µm/px it is 6 px (neither pairs).
    assert scores.add(pred_labels, pred_types, true_labels, true_types, mpp=0.25) == pytest.approx(0.5)
    assert scores.add(pred_labels, pred_types, true_labels, true_types, mpp=0.2) == pytest.approx(1.0)
    assert scores.add(pred_labels, pred_types, true_labels, true_types, mpp=0.5) == pytest.approx(0.0)
    assert detection_radius(None) == 12.0 and detection_radius(0.5) == pytest.approx(6.0)
    with pytest.raises(ValueError, match="mpp"):
        detection_radius(-1.0)


def test_pairing_is_hungarian_not_greedy():
    # Greedy nearest-first would pair B-P (distance 1) and leave A-Q (20 > 12) unpaired;
    # the least total distance pairs A-P (9) and B-Q (10), both within 12 px.
    true_points = np.array([[0.0, 0.0], [0.0, 10.0]])
    pred_points = np.array([[0.0, 9.0], [0.0, 20.0]])
    pairs, lone_true, lone_pred = pair_centroids(true_points, pred_points, 12.0)
    assert pairs.tolist() == [[0, 0], [1, 1]]
    assert lone_true.size == 0 and lone_pred.size == 0
    pairs, lone_true, lone_pred = pair_centroids(true_points, np.zeros((0, 2)), 12.0)
    assert pairs.shape == (0, 2) and lone_true.tolist() == [0, 1] and lone_pred.size == 0


def test_object_centroids_are_pixel_means():
    labels = np.zeros((10, 10), np.int32)
    labels[2:4, 2:8] = 3  # rows 2-3, cols 2-7: centroid (2.5, 4.5)
    labels[9, 0] = 7
    ids, points = object_centroids(labels)
    assert ids.tolist() == [3, 7]
    np.testing.assert_allclose(points, [[2.5, 4.5], [9.0, 0.0]])


def test_no_predictions_no_truth_and_nothing_at_all():
    true_labels, true_types = _maps((32, 32), {1: (0, 0, 4, 4, 1), 2: (10, 10, 4, 4, 2)})
    empty, no_types = np.zeros((32, 32), np.int32), np.zeros(1, np.int64)
    missed = TypeScores()
    assert missed.add(empty, no_types, true_labels, true_types) == 0.0
    summary = missed.summary(2)
    # Every true object is FN_d: F_d 0, F_c 0 / (0 + 1) = 0, PQ 0 / (0 + 0.5) = 0.
    assert summary["f_d"] == 0.0 and summary["f_c_1"] == 0.0 and summary["f_c_2"] == 0.0
    assert summary["pq_1"] == 0.0 and summary["pq_2"] == 0.0 and summary["mpq"] == 0.0
    spurious = TypeScores()
    assert spurious.add(true_labels, true_types, empty, no_types) == 0.0
    summary = spurious.summary(2)
    assert summary["f_d"] == 0.0 and summary["f_c_2"] == 0.0 and summary["pq_1"] == 0.0
    nothing = TypeScores()
    assert nothing.add(empty, no_types, empty, no_types) == 1.0
    assert all(math.isnan(value) for value in nothing.summary(2).values())
    assert all(math.isnan(value) for value in TypeScores().summary(1).values())


def test_type_zero_counts_for_detection_only():
    # A predicted object of unknown type (0) pairs for F_d, is "not type 1" for F_c, and is in no PQ class.
    true_labels, true_types = _maps((20, 20), {1: (0, 0, 4, 4, 1)})
    pred_labels, pred_types = _maps((20, 20), {1: (0, 0, 4, 4, 0)})
    scores = TypeScores()
    assert scores.add(pred_labels, pred_types, true_labels, true_types) == 1.0
    summary = scores.summary(1)
    # F_c1: FN 1 (true 1, predicted 0): 0 / (0 + 2); PQ_1: FN 1, no TP: 0.
    assert summary["f_c_1"] == 0.0 and summary["pq_1"] == 0.0


def test_scores_pool_counts_over_images_without_pairing_across_them():
    true_a, types_a = _maps((20, 20), {1: (0, 0, 4, 4, 1)})
    pred_a, ptypes_a = _maps((20, 20), {1: (0, 1, 4, 4, 1)})  # IoU 12/20 = 0.6, distance 1
    empty, no_types = np.zeros((20, 20), np.int32), np.zeros(1, np.int64)
    # Image B: three predictions of type 1 and no truth (the first sits where image A's truth is).
    pred_b, ptypes_b = _maps((20, 20), {1: (0, 0, 4, 4, 1), 2: (10, 0, 4, 4, 1), 3: (0, 10, 4, 4, 1)})
    scores = TypeScores()
    per_image = [scores.add(pred_a, ptypes_a, true_a, types_a), scores.add(pred_b, ptypes_b, empty, no_types)]
    assert per_image == [1.0, 0.0] and scores.images == 2
    summary = scores.summary(1)
    # Pooled F_d: TP 1, FP 3, FN 0: 2 / (2 + 3) = 0.4 (the mean of the per-image F_d would be 0.5).
    assert summary["f_d"] == pytest.approx(0.4)
    # Pooled F_c1: TP 1, FP_d 3: 2 / (2 + 3) = 0.4.
    assert summary["f_c_1"] == pytest.approx(0.4)
    # Pooled PQ_1: TP 1 (IoU 0.6), FP 3: 0.6 / (1 + 1.5) = 0.24 (per-image PQs 0.6 and 0 average 0.3).
    assert summary["pq_1"] == pytest.approx(0.24) and summary["mpq"] == pytest.approx(0.24)


def test_bad_inputs_are_refused_in_one_line():
    labels, types = _maps((20, 20), {1: (0, 0, 4, 4, 1), 3: (10, 10, 4, 4, 2)})
    scores = TypeScores()
    for bad, message in [(types[:3], "entries"), (types.astype(float), "integer"), (types[None], "1-D"),
                         (np.array([0, 1, -1, 2]), "negative")]:
        with pytest.raises(ValueError, match=message):
            scores.add(labels, bad, labels, types)
    with pytest.raises(ValueError, match="shape mismatch"):
        scores.add(labels[:10], types, labels, types)
    with pytest.raises(ValueError, match="integer label maps"):
        scores.add(labels > 0, types, labels, types)
    assert scores.images == 0
    scores.add(labels, types, labels, types)
    with pytest.raises(ValueError, match="type 2"):
        scores.summary(1)
    with pytest.raises(ValueError, match="n_types"):
        scores.summary(0)
    assert check_types([0, 1, 2, 2], labels).dtype == np.int64


def _random_typed_maps(rng, shape, n_objects, n_types):
    """A random instance map of squares (later ones over earlier ones) and a type per id."""
    labels = np.zeros(shape, np.int32)
    for object_id in range(1, n_objects + 1):
        row, col = rng.integers(0, shape[0] - 6), rng.integers(0, shape[1] - 6)
        size = rng.integers(3, 7)
        labels[row:row + size, col:col + size] = object_id
    return labels, rng.integers(1, n_types + 1, n_objects + 1)


def test_per_class_pq_matches_monai_summed_over_images():
    import torch
    from monai.metrics import PanopticQualityMetric

    rng = np.random.default_rng(3)
    n_types = 3
    metric = PanopticQualityMetric(num_classes=n_types, reduction="sum_batch", smooth_numerator=0.0,
                                   return_confusion_matrix=True)
    scores = TypeScores()
    for _ in range(3):
        true_labels, true_types = _random_typed_maps(rng, (48, 48), 25, n_types)
        # A prediction: the truth shifted by one pixel, with some types changed and some objects dropped.
        pred_labels = np.roll(true_labels, 1, axis=1) * (rng.random(26) > 0.2)[np.roll(true_labels, 1, axis=1)]
        pred_types = np.where(rng.random(26) < 0.3, rng.integers(1, n_types + 1, 26), true_types)
        scores.add(pred_labels, pred_types, true_labels, true_types)
        stack = [np.stack([labels, kinds[labels] * (labels > 0)])[None]
                 for labels, kinds in ((pred_labels, pred_types), (true_labels, true_types))]
        metric(torch.as_tensor(stack[0]), torch.as_tensor(stack[1]))
    monai_counts = metric.aggregate().double().numpy()  # (classes, [tp, fp, fn, iou_sum])
    for t in range(1, n_types + 1):
        np.testing.assert_allclose(scores.pq_counts[t], monai_counts[t - 1], rtol=1e-5)
    summary = scores.summary(n_types)
    tp, fp, fn, iou_sum = monai_counts.T
    np.testing.assert_allclose([summary[f"pq_{t}"] for t in range(1, n_types + 1)],
                               iou_sum / (tp + 0.5 * fp + 0.5 * fn), rtol=1e-5)
    assert 0 < summary["mpq"] < 1


def test_summary_lines_report_the_pooled_type_scores_with_the_type_names(tmp_path):
    from napari_sgdc.evaluation import Evaluation, summary_lines, write_csv

    true_labels, true_types = _maps((64, 64), TRUE)
    pred_labels, pred_types = _maps((64, 64), PRED)
    scores = TypeScores()
    f_d = scores.add(pred_labels, pred_types, true_labels, true_types)
    rows = [{"image": "a.png", "iou": 0.5, "dice": 0.6, "hd95": 1.0, "boundary_f1": 0.7, "aji": 0.4,
             "object_f1": 0.5, "pq": 0.3, "f_d": f_d}, {"image": "b.png", "iou": 0.5, "pq": 0.5}]
    evaluation = Evaluation(rows=rows, type_names=("tumour", "immune", "stroma"), types=scores)
    assert evaluation.keys[-1] == "f_d"
    lines = summary_lines(evaluation)
    report = {line[:28].strip(): line[28:].strip() for line in lines if len(line) > 28}
    # The hand-computed scores of test_hand_computed_scores, under the names of types 1..3.
    assert report["F_d (detection)"] == "0.8000" and report["F_c tumour"] == "0.6667"
    assert report["F_c immune"] == "0.3333" and report["F_c stroma"] == "nan"
    assert report["PQ tumour"] == "0.4000" and report["PQ immune"] == "0.2400" and report["PQ stroma"] == "nan"
    assert report["mPQ"].startswith("0.3200") and "2 type(s)" in report["mPQ"]
    assert report["PQ (binary, per image)"] == "0.4000" and report["F_d per image (12 px)"].startswith("0.8000")
    assert any(line.startswith("Nucleus types, pooled over 1 image(s)") for line in lines)
    untyped = summary_lines(Evaluation(rows=rows, type_names=("tumour",)))
    assert untyped[-1].startswith("Nucleus types: not scored")
    assert not any("Nucleus" in line for line in summary_lines(Evaluation(rows=rows[1:])))
    header = write_csv(rows, tmp_path / "scores.csv").read_text().splitlines()[0]
    assert header == "image,iou,dice,hd95,boundary_f1,aji,object_f1,pq,f_d"


def _typed_item(name, seed, with_types=True):
    from napari_sgdc.evaluation import EvaluationItem

    rng = np.random.default_rng(seed)
    image = (rng.random((48, 40, 3)) * 255).astype(np.uint8)
    labels, types = _maps((48, 40), {1: (4, 4, 12, 12, 1), 3: (25, 10, 14, 18, 2), 4: (30, 32, 6, 6, 1)})
    return EvaluationItem(name, lambda: image, lambda: labels > 0, lambda: labels,
                          load_types=(lambda: types) if with_types else None)


def test_evaluate_pools_the_type_scores_of_a_typed_model():
    import torch

    from napari_sgdc.evaluation import evaluate, layout_items, summary_lines
    from napari_sgdc.inference import segment
    from napari_sgdc.model import build_model, tiny_config
    from napari_sgdc.postprocess import PostprocessOptions

    torch.manual_seed(0)
    model = build_model(tiny_config(task="instance", type_names=("a", "b"), type_colors=("#ff0000", "#00ff00")))
    with torch.no_grad():
        model.mask_head.weight.mul_(200.0)  # a random net whose mask is partly on
    model.eval()
    items = [_typed_item("t0.png", 0), _typed_item("untyped.png", 1, with_types=False), _typed_item("t2.png", 2)]
    evaluation = evaluate(model, items, tile=0)
    assert [row["image"] for row in evaluation.rows] == ["t0.png", "untyped.png", "t2.png"]
    assert evaluation.type_names == ("a", "b") and evaluation.types.images == 2
    assert "f_d" not in evaluation.rows[1] and evaluation.keys[-1] == "f_d"
    # The same pooling by hand, from the model's own segmentations of the typed items.
    expected = TypeScores()
    options = PostprocessOptions.for_model(model.config)
    for item, row in zip(items[::2], evaluation.rows[::2]):
        result = segment(model, item.load_image(), options, tile=None, stack=False)
        assert result.object_types is not None
        assert row["f_d"] == expected.add(result.labels, result.object_types, item.load_instances(), item.load_types())
    np.testing.assert_equal(evaluation.type_summary, expected.summary(2))
    lines = summary_lines(evaluation)
    assert any(line.strip().startswith("F_c b") for line in lines) and any("mPQ" in line for line in lines)
    consep = layout_items(DATA / "consep", "consep", "test", max_images=1)[0]
    true_types = consep.load_types()
    assert true_types.ndim == 1 and true_types.size >= consep.load_instances().max() + 1
    assert set(np.unique(true_types[1:])) <= {0, 1, 2, 3, 4}
