"""Learning from what the user changed: edited pixels, weights, crops, weighted losses, L2-SP."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from napari_sgdc.config import TrainConfig
from napari_sgdc.data import Sample, SegmentationDataset
from napari_sgdc.data.transforms import augment_pair
from napari_sgdc.model import build_model, tiny_config
from napari_sgdc.train import edge_loss, finetune, fit, mask_loss, total_loss
from napari_sgdc.train.corrections import (
    EDIT_MARGIN, crop_to_edits, edit_summary, edited_pixels, loss_weight_map,
)

torch.set_num_threads(1)


def predicted_objects() -> np.ndarray:
    prediction = np.zeros((100, 100), np.int32)
    prediction[10:30, 10:30] = 1
    prediction[50:70, 50:70] = 2
    prediction[80:90, 0:10] = 3
    return prediction


# ----------------------------------------------------------------------------- edited pixels


def test_renumbered_objects_are_not_edits():
    prediction = predicted_objects()
    renumbered = np.select([prediction == 1, prediction == 2, prediction == 3], [7, 1, 42], 0)
    assert not edited_pixels(renumbered, prediction).any()
    summary = edit_summary(renumbered, prediction)
    assert summary.pixels == 0 and summary.objects == 0 and summary.bbox is None and str(summary) == "no edits"


def test_split_erase_and_add_are_edits():
    prediction = predicted_objects()
    labels = prediction.copy()
    labels[10:30, 20:30] = 9      # split object 1: its right half becomes object 9 (200 px)
    labels[80:90, 0:10] = 0       # erase object 3 (100 px)
    labels[0:5, 90:100] = 5       # add object 5 (50 px)
    edited = edited_pixels(labels, prediction, instance=True)
    assert edited.sum() == 350
    assert edited[10:30, 20:30].all() and not edited[10:30, 10:20].any()  # the larger part keeps its object
    assert not edited[50:70, 50:70].any()
    summary = edit_summary(labels, prediction, instance=True)
    assert summary.pixels == 350
    assert summary.objects == 3  # the split-off part, the erased object, the added object
    assert summary.bbox == (0, 0, 90, 100)
    assert "350 edited pixels" in str(summary)
    # as foreground (semantic models) the split is no edit
    assert edited_pixels(labels, prediction, instance=False).sum() == 150


def test_merge_marks_the_absorbed_object():
    prediction = np.zeros((40, 40), np.int32)
    prediction[5:15, 5:25] = 1
    prediction[5:15, 25:30] = 2
    labels = (prediction > 0).astype(np.int32) * 4  # both merged into one object
    edited = edited_pixels(labels, prediction)
    assert edited.sum() == 50 and edited[5:15, 25:30].all()
    assert edit_summary(labels, prediction).objects == 1


def test_semantic_edits_compare_foreground_only():
    prediction = np.zeros((50, 60), bool)
    prediction[10:30, 10:30] = True
    labels = np.zeros((50, 60), np.uint8)
    labels[10:30, 10:35] = 255  # grown by 5 columns; the value does not matter
    edited = edited_pixels(labels, prediction)
    assert edited.sum() == 100 and edited[10:30, 30:35].all()
    summary = edit_summary(labels, prediction)
    assert summary.objects == 1 and summary.bbox == (10, 30, 30, 35)
    with pytest.raises(ValueError, match="shape"):
        edit_summary(labels, prediction[:, :10])


# ----------------------------------------------------------------------------- weights and crops


def test_weight_map_band():
    edited = np.zeros((60, 60), bool)
    edited[30, 30] = True
    weights = loss_weight_map(edited, band=3, weight=5.0)
    assert weights.dtype == np.float32 and weights.shape == (60, 60)
    assert weights[30, 30] == 5.0 and weights[30, 33] == 5.0 and weights[32, 32] == 5.0  # distance 2.83
    assert weights[30, 34] == 1.0 and weights[33, 33] == 1.0  # distance 4 and 4.24
    assert set(np.unique(weights)) == {1.0, 5.0}
    assert (weights == 5.0).sum() == 29  # the lattice points of a disc of radius 3
    assert np.array_equal(loss_weight_map(edited, band=0, weight=2.0) == 2.0, edited)
    assert (loss_weight_map(np.zeros((5, 5), bool)) == 1).all()


def test_crop_to_edits_on_a_large_image():
    height, width = 3000, 4000
    image = np.zeros((height, width, 3), np.uint8)
    prediction = np.zeros((height, width), np.int32)
    prediction[1000:1040, 2000:2040] = 1
    labels = prediction.copy()
    labels[1000:1040, 2040:2100] = 2  # a new object to the right: edited box rows 1000-1040, cols 2040-2100
    crop = crop_to_edits(image, labels, prediction, margin=64, min_size=256)
    top, left, bottom, right = crop.box
    assert bottom - top == 256 and top <= 1000 - 64 and bottom >= 1040 + 64  # grown to the patch size
    assert right - left == 256 and left <= 2040 - 64 and right >= 2100 + 64  # 60 + 2 * 64 = 188: grown too
    assert crop.image.shape == (256, 256, 3)
    assert np.array_equal(crop.labels, labels[top:bottom, left:right])
    # at a corner the crop is shifted inside the image
    labels = prediction.copy()
    labels[0:5, 0:5] = 3
    assert crop_to_edits(image, labels, prediction, margin=64, min_size=256).box == (0, 0, 256, 256)
    # nothing edited: the whole image
    assert crop_to_edits(image, prediction, prediction).box == (0, 0, height, width)


# ----------------------------------------------------------------------------- weighted losses


def test_weighted_losses_equal_unweighted_with_unit_weights_and_differ_otherwise():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 32, 32)
    target = (torch.rand(2, 1, 32, 32) > 0.7).float()
    ones = torch.ones_like(target)
    for loss in (mask_loss, edge_loss):
        assert torch.allclose(loss(logits, target, ones), loss(logits, target), atol=1e-6)
        assert torch.allclose(loss(logits, target, 3 * ones), loss(logits, target), atol=1e-6)
        heavier = ones.clone()
        heavier[..., :8] = 5.0
        assert not torch.allclose(loss(logits, target, heavier), loss(logits, target), atol=1e-3)
    outputs = {"mask": logits, "edge": logits}
    plain, _ = total_loss(outputs, {"mask": target, "edge": target})
    weighted, _ = total_loss(outputs, {"mask": target, "edge": target, "weight": ones})
    assert torch.allclose(plain, weighted, atol=1e-6)
    # zero weight where the prediction is wrong: the weighted loss ignores those pixels
    wrong = torch.zeros_like(target)
    wrong[..., 16:] = 1.0
    good_logits = torch.where(target > 0, 8.0, -8.0)
    bad_logits = torch.where(wrong > 0, -8.0, good_logits)
    keep = 1.0 - wrong
    assert mask_loss(bad_logits, target, keep) < 0.01 < mask_loss(bad_logits, target)
    with pytest.raises(ValueError, match="weight"):
        mask_loss(logits, target, ones[:, :, :16])


# ----------------------------------------------------------------------------- augmentation carries weights


def test_augmentation_carries_the_weight_map_and_is_unchanged_without_one():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (120, 90, 3), dtype=np.uint8)
    labels = np.zeros((120, 90), np.int32)
    labels[40:60, 30:50] = 5
    for seed in range(6):
        plain_image, plain_mask = augment_pair(image, labels, 64, np.random.default_rng(seed), stain=True,
                                               foreground_prob=0.0)
        weight = 1.0 + 3.0 * (labels > 0).astype(np.float32)
        image_w, mask_w, weight_w = augment_pair(image, labels, 64, np.random.default_rng(seed), stain=True,
                                                 foreground_prob=0.0, weight=weight)
        assert np.array_equal(plain_image, image_w) and np.array_equal(plain_mask, mask_w)  # same draws
        assert weight_w.shape == (64, 64) and weight_w.dtype == np.float32
        assert np.array_equal(weight_w, 1.0 + 3.0 * (mask_w > 0))  # same geometry as the mask
    # a weight map with edits: crops are centred on them, not on the foreground
    weight = np.ones((120, 90), np.float32)
    weight[100:110, 0:10] = 4.0
    for seed in range(8):
        _, _, crop_weight = augment_pair(image, labels, 32, np.random.default_rng(seed), foreground_prob=1.0,
                                         weight=weight)
        assert (crop_weight > 1).any()


def test_dataset_items_carry_weights_only_when_given():
    image = np.zeros((64, 64, 3), np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[20:40, 20:40] = True
    samples = [Sample("a", image, mask), Sample("b", image, mask)]
    assert "weight" not in SegmentationDataset(samples, crop_size=32)[0]
    weights = [np.full((64, 64), 2.0, np.float32), None]
    dataset = SegmentationDataset(samples, crop_size=32, weights=weights)
    assert torch.equal(dataset[0]["weight"], torch.full((1, 32, 32), 2.0))
    assert torch.equal(dataset[1]["weight"], torch.ones(1, 32, 32))  # None: all 1, so batches collate
    center = SegmentationDataset(samples, crop_size=32, augment=False, weights=weights)
    assert center[0]["weight"].shape == (1, 32, 32)
    with pytest.raises(ValueError, match="weight"):
        SegmentationDataset(samples, crop_size=32, weights=[np.ones((8, 8), np.float32), None])


# ----------------------------------------------------------------------------- finetune with predictions


def _quick(**overrides) -> TrainConfig:
    values = dict(epochs=1, max_steps=4, steps_per_epoch=4, batch_size=2, crop_size=64, lr_encoder=0.0,
                  lr_decoder=1e-3, warmup_steps=1, freeze_encoder=True, freeze_batchnorm=True, val_every=0,
                  device="cpu")
    values.update(overrides)
    return TrainConfig(**values)


def _large_corrected_image():
    """A 600x800 image of many objects; the user added one object near (500, 700)."""
    rng = np.random.default_rng(1)
    image = rng.integers(0, 80, (600, 800, 3), dtype=np.uint8)
    prediction = np.zeros((600, 800), np.int32)
    for index, (row, col) in enumerate([(100, 100), (100, 400), (300, 250), (300, 600), (450, 150)], start=1):
        prediction[row:row + 20, col:col + 20] = index
    labels = prediction.copy()
    labels[500:520, 700:720] = 9
    image[labels > 0] = 220
    return image, labels, prediction


def test_finetune_with_predictions_trains_mostly_where_edited(monkeypatch):
    finetune_module = importlib.import_module("napari_sgdc.train.finetune")
    datasets = []
    real_dataset = finetune_module.SegmentationDataset

    def spy(samples, **kwargs):
        datasets.append(real_dataset(samples, **kwargs))
        return datasets[-1]

    monkeypatch.setattr(finetune_module, "SegmentationDataset", spy)
    image, labels, prediction = _large_corrected_image()
    model = build_model(tiny_config(task="instance"))
    finetune(model, [image], [labels], _quick(), predictions=[prediction])
    dataset = datasets[-1]
    sample = dataset.samples[0]
    # trains on the edited box plus the margin (grown to the crop), not on the 600x800 image
    assert sample.image.shape[:2] == (20 + 2 * EDIT_MARGIN, 20 + 2 * EDIT_MARGIN)
    assert np.array_equal(sample.mask, labels[500 - EDIT_MARGIN:520 + EDIT_MARGIN, 700 - EDIT_MARGIN:720 + EDIT_MARGIN])
    def share_with_the_edit(dataset) -> float:
        """Fraction of served patches (10 epochs) that contain the added object (id 9)."""
        hits = 0
        for epoch in range(10):
            dataset.set_epoch(epoch)
            hits += bool((dataset[0]["instances"] == 9).any())
        return hits / 10

    assert (dataset[0]["weight"] > 1).any()
    focused = share_with_the_edit(dataset)
    # without predictions: the whole image, no weights, patches on any of the six objects
    finetune(model, [image], [labels], _quick())
    assert datasets[-1].samples[0].image.shape[:2] == (600, 800) and datasets[-1].weights is None
    spread = share_with_the_edit(datasets[-1])
    assert focused >= 0.8 and spread <= 0.4, (focused, spread)


def test_finetune_prediction_errors_and_erasing():
    model = build_model(tiny_config())
    image = np.zeros((64, 64, 3), np.uint8)
    labels = np.zeros((64, 64), np.uint8)
    labels[10:30, 10:30] = 1
    with pytest.raises(ValueError, match="nothing was corrected"):
        finetune(model, [image], [labels], _quick(), predictions=[labels.copy()])
    with pytest.raises(ValueError, match="prediction 0 has shape"):
        finetune(model, [image], [labels], _quick(), predictions=[labels[:10]])
    with pytest.raises(ValueError, match="predictions"):
        finetune(model, [image], [labels], _quick(), predictions=[labels, labels])
    # erasing every object is a correction when the prediction is known
    history = finetune(model, [image], [np.zeros_like(labels)], _quick(max_steps=1), predictions=[labels])
    assert history.steps == 1


# ----------------------------------------------------------------------------- L2-SP


def _distance(model, start) -> float:
    return sum(float(((p.detach() - start[name]) ** 2).sum()) for name, p in model.named_parameters())


def test_l2sp_keeps_weights_closer_to_the_base_model():
    rng = np.random.default_rng(0)
    samples = []
    for index in range(4):
        image = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
        mask = np.zeros((64, 64), bool)
        mask[16:48, 16:48] = True
        image[mask] = 230
        samples.append(Sample(f"s{index}", image, mask))
    distances, parts = {}, {}
    for l2sp in (0.0, 30.0):
        torch.manual_seed(0)
        model = build_model(tiny_config())
        start = {name: p.detach().clone() for name, p in model.named_parameters()}
        cfg = TrainConfig(epochs=1, max_steps=12, steps_per_epoch=12, batch_size=2, crop_size=64, lr_encoder=3e-3,
                          lr_decoder=3e-3, warmup_steps=1, val_every=0, device="cpu", l2sp=l2sp)
        history = fit(model, SegmentationDataset(samples, crop_size=64), None, cfg)
        distances[l2sp] = _distance(model, start)
        parts[l2sp] = history.loss_parts[-1]
    assert "l2sp" not in parts[0.0] and parts[30.0]["l2sp"] > 0
    assert distances[30.0] < 0.7 * distances[0.0]
    with pytest.raises(ValueError, match="l2sp"):
        fit(build_model(tiny_config()), SegmentationDataset(samples, crop_size=64), None, TrainConfig(l2sp=-1.0))


def test_presets_keep_the_models_boundary_width(monkeypatch):
    from napari_sgdc.config import PRESETS
    from napari_sgdc.train.finetune import finetune_config

    model = build_model(tiny_config(task="instance"))
    assert finetune_config(model, "quick") == PRESETS["quick"]  # no checkpoint metadata
    model.metadata = {"train_config": {"boundary_width": 2, "edge_weight": 1.0}}
    cfg = finetune_config(model, "quick")
    assert cfg.boundary_width == 2 and PRESETS["quick"].boundary_width == 3
    assert cfg.l2sp == PRESETS["quick"].l2sp > 0 and cfg.edge_weight == PRESETS["quick"].edge_weight
    explicit = _quick(boundary_width=5)
    assert finetune_config(model, explicit) is explicit
    with pytest.raises(ValueError, match="preset"):
        finetune_config(model, "nope")
    finetune_module = importlib.import_module("napari_sgdc.train.finetune")
    seen = {}
    real_dataset = finetune_module.SegmentationDataset

    def spy(samples, **kwargs):
        seen.update(kwargs)
        return real_dataset(samples, **kwargs)

    monkeypatch.setattr(finetune_module, "SegmentationDataset", spy)
    monkeypatch.setitem(PRESETS, "tiny", _quick(max_steps=1, boundary_width=3))
    image = np.zeros((64, 64, 3), np.uint8)
    labels = np.zeros((64, 64), np.int32)
    labels[10:30, 10:30] = 1
    finetune(model, [image], [labels], "tiny")
    assert seen["boundary_width"] == 2


# ----------------------------------------------------------------------------- speed (issue 24)


def test_precomputed_focus_points_give_the_same_crops():
    """`focus_points` computed once gives every crop bit for bit as the per-patch search did,
    with edits, without, and when the window needs padding (then the padded arrays are searched)."""
    from napari_sgdc.data.transforms import focus_points, random_scale_crop

    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)
    labels = np.zeros((90, 120), np.int32)
    labels[10:30, 20:40], labels[60:80, 80:110] = 1, 2
    edited = np.ones((90, 120), np.float32)
    edited[60:70, 90:100] = 4.0
    for weight in (None, np.ones((90, 120), np.float32), edited):
        focus = focus_points(labels, weight)
        for crop, seed in [(32, s) for s in range(6)] + [(128, s) for s in range(3)]:  # 128: padded windows
            plain = random_scale_crop(image, labels, crop, np.random.default_rng(seed), foreground_prob=0.9,
                                      weight=weight, aspect_jitter=1.5)
            cached = random_scale_crop(image, labels, crop, np.random.default_rng(seed), foreground_prob=0.9,
                                       weight=weight, aspect_jitter=1.5, focus=focus)
            assert all(np.array_equal(a, b) for a, b in zip(plain, cached))


def test_dataset_finds_the_focus_of_a_sample_once(monkeypatch):
    datasets = importlib.import_module("napari_sgdc.data.datasets")
    calls = []
    real = datasets.focus_points
    monkeypatch.setattr(datasets, "focus_points", lambda *args: calls.append(1) or real(*args))
    image, labels, prediction = _large_corrected_image()
    weight = 1.0 + 3.0 * (labels != prediction).astype(np.float32)
    dataset = SegmentationDataset([Sample("a", image, labels), Sample("b", image, labels)], crop_size=64,
                                  task="instance", weights=[weight, None], foreground_prob=0.9)
    for epoch in range(3):
        dataset.set_epoch(epoch)
        items = [dataset[index] for index in (0, 1, 0, 1)]
    assert len(calls) == 2  # once per sample, not once per patch
    assert (items[0]["weight"] > 1).any()
    monkeypatch.setattr(datasets, "focus_points", real)
    fresh = SegmentationDataset([Sample("a", image, labels), Sample("b", image, labels)], crop_size=64,
                                task="instance", weights=[weight, None], foreground_prob=0.9)
    fresh.set_epoch(2)
    for index in (0, 1):
        assert all(torch.equal(fresh[index][key], items[index][key]) for key in items[index])


def test_quick_preset_trains_in_bf16_where_native_and_keeps_float32_weights(monkeypatch):
    from napari_sgdc import device as device_module
    from napari_sgdc.config import PRESETS
    from napari_sgdc.train.finetune import override_preset

    assert PRESETS["quick"].amp and not PRESETS["standard"].amp
    assert override_preset(PRESETS["quick"], steps=5, learning_rate=1e-4, freeze_encoder=True).amp
    image, labels, prediction = _large_corrected_image()
    for native in (True, False):  # without native bf16 the preset runs in float32 (autocast is a no-op)
        monkeypatch.setattr(device_module, "bf16_supported", lambda device, native=native: native)
        model = build_model(tiny_config(task="instance"))
        history = finetune(model, [image], [labels], _quick(max_steps=2, amp=True), predictions=[prediction])
        assert history.steps == 2 and all(np.isfinite(history.losses))
        assert all(p.dtype == torch.float32 for p in model.parameters())


def test_a_dataset_without_loss_weights_keeps_no_focus_points():
    """Training sets (no edit weights) search per patch, as before: caching every image's foreground
    coordinates would cost gigabytes on a large training set."""
    image, labels, _ = _large_corrected_image()
    dataset = SegmentationDataset([Sample("a", image, labels)], crop_size=64, task="instance", foreground_prob=0.9)
    dataset.set_epoch(0)
    dataset[0]
    assert dataset.focus(0) is None and dataset._focus == {}
