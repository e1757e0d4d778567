"""Headless tests of `napari_sgdc.training_pairs` (corrected image/labels pairs for fine-tuning)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from napari_sgdc.training_pairs import InputError, TrainingPair, collect_pair, split_by_model

SOURCE = "built-in: dermoscopy"


def _pair(planes, labels, **kwargs):
    defaults = dict(image_shape=labels.shape, image_name="img", labels_name="img mask", model_source=SOURCE)
    return collect_pair(planes, labels, **{**defaults, **kwargs})


def test_collect_pair_copies_the_planes_and_names_the_model():
    image = np.zeros((1, 8, 10, 3), np.uint8)
    labels = np.zeros((8, 10), np.uint8)
    labels[2:4, 3:6] = 1
    pair = _pair(image, labels)
    assert isinstance(pair, TrainingPair) and pair.model_source == SOURCE
    assert pair.title == "img ← mask (built-in: dermoscopy)"
    assert _pair(image, labels, labels_name="painted").title == "img ← painted (built-in: dermoscopy)"
    assert _pair(image, labels, mpp=0.5).title == "img ← mask (built-in: dermoscopy, 0.5 µm/px)"
    np.testing.assert_array_equal(pair.labels[0], labels)
    labels[:] = 0  # later edits do not leak into the pair
    assert pair.labels[0].any() and pair.images[0].shape == (8, 10, 3)
    assert _pair(image, np.ones((8, 10), np.uint8), model_source="/models/my.safetensors").title.endswith(
        "(my.safetensors)")


def test_collect_pair_keeps_only_edited_non_empty_planes_of_a_stack():
    planes = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    predicted = np.zeros((3, 4, 5), np.int32)
    predicted[:, 0, 0] = 1
    labels = predicted.copy()
    labels[1, 2, 2] = 2  # plane 1 edited; plane 0 and 2 as predicted
    pair = _pair(planes, labels, predicted=predicted)
    assert len(pair.images) == 1
    np.testing.assert_array_equal(pair.images[0], planes[1])
    assert "3 planes" not in pair.title
    everything = _pair(planes, labels)  # not the model's own mask: every non-empty plane
    assert len(everything.images) == 3 and ", 3 planes" in everything.title


def test_collect_pair_keeps_the_prediction_of_each_kept_plane_and_fully_erased_planes():
    planes = np.zeros((3, 4, 5), np.uint8)
    predicted = np.zeros((3, 4, 5), np.int32)
    predicted[:, 1:3, 1:3] = 1
    labels = predicted.copy()
    labels[0] = 0  # plane 0: a false object erased, nothing left (a correction too)
    labels[2, 0, 0] = 2  # plane 2: an object added
    pair = _pair(planes, labels, predicted=predicted)
    assert len(pair.labels) == 2 and not pair.labels[0].any()
    np.testing.assert_array_equal(pair.predictions[0], predicted[0])
    np.testing.assert_array_equal(pair.predictions[1], predicted[2])
    predicted[:] = 0  # copies
    assert pair.predictions[1].any()
    assert _pair(planes, labels).predictions is None  # not the model's own mask
    assert pair.key == ("img", SOURCE)


@pytest.mark.parametrize("labels, predicted, message", [
    (np.ones((4, 6), np.uint8), None, "must match pixel for pixel"),
    (np.zeros((4, 5), np.uint8), None, "all background"),
    (np.ones((4, 5), np.uint8), np.ones((1, 4, 5), np.uint8), "still equals the model's prediction"),
])
def test_collect_pair_rejects_bad_inputs(labels, predicted, message):
    with pytest.raises(InputError, match=message):
        collect_pair(np.zeros((1, 4, 5), np.uint8), labels, image_shape=(4, 5), image_name="img",
                     labels_name="lab", model_source=SOURCE, predicted=predicted)


def test_split_by_model_keeps_the_current_models_pairs():
    labels = np.ones((4, 5), np.uint8)
    a = _pair(np.zeros((1, 4, 5)), labels, image_name="a")
    b = _pair(np.zeros((1, 4, 5)), labels, image_name="b", model_source="built-in: nuclei")
    assert split_by_model([a, b], SOURCE) == ([a], [b])
    assert split_by_model([a, b], "built-in: nuclei") == ([b], [a])


def test_training_pairs_imports_neither_napari_nor_qt():
    code = ("import sys, napari_sgdc.training_pairs; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('napari', 'qtpy', 'PyQt5', 'PyQt6', "
            "'PySide2', 'PySide6', 'magicgui')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_instance_ids_of_any_size_stay_distinct_and_positive():
    """Finding 16: ids of 2**31 and more were cast to int32 (2**32 + 7 merged with 7, 2**31 + 5 turned
    negative); they are renumbered by rank now, on every path into fine-tuning."""
    from types import SimpleNamespace

    from napari_sgdc.data.targets import instance_ids
    from napari_sgdc.train.corrections import edited_pixels
    from napari_sgdc.train.finetune import _prepare_pairs
    from napari_sgdc.training_pairs import pair_arrays

    labels = np.zeros((6, 6), np.uint64)
    labels[0:2, 0:2] = 7
    labels[3:5, 0:2] = 2**32 + 7
    labels[0:2, 3:5] = 2**31 + 5
    labels[3:5, 3:5] = 2**64 - 1
    for ids in (instance_ids(labels), instance_ids(labels.astype(np.float64))):  # float labels too
        assert ids.dtype == np.int32 and ids.min() == 0
        assert len(np.unique(ids[labels > 0])) == 4 and ((ids > 0) == (labels > 0)).all()
        for value in (7, 2**32 + 7, 2**31 + 5, 2**64 - 1):  # each object one id, its own
            assert len(np.unique(ids[labels == value])) == 1
    signed = labels.astype(np.int64)
    signed[signed < 0] = -3  # 2**64 - 1 as int64 is -1: a negative id counts as background
    assert instance_ids(signed)[4, 4] == 0 and len(np.unique(instance_ids(signed))) == 4
    small = np.array([[0, 3], [9, 9]], np.uint32)
    np.testing.assert_array_equal(instance_ids(small), small)  # ids below 2**31 are kept
    pair = TrainingPair("img", "img mask", [np.zeros((6, 6, 3), np.uint8)], [labels], SOURCE)
    target = pair_arrays([pair], SimpleNamespace(is_instance=True, mpp=None)).labels[0]
    assert target.min() == 0 and len(np.unique(target)) == 5
    sample = _prepare_pairs([np.zeros((6, 6, 3), np.uint8)], [labels], True, [None])[0]
    assert sample.mask.min() == 0 and len(np.unique(sample.mask)) == 5
    assert not edited_pixels(labels, labels, instance=True).any()
