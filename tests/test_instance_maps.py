"""Instance maps (ModelConfig.instance_map): targets, heads, losses, TTA and decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_sgdc.config import ModelConfig
from napari_sgdc.data import SegmentationDataset
from napari_sgdc.data.datasets import Sample
from napari_sgdc.data.targets import distance_target, hover_target, instance_map_target
from napari_sgdc.head_maps import dihedral as _dihedral, dihedral_vectors as _dihedral_vectors
from napari_sgdc.inference import head_maps, segment
from napari_sgdc.model import build_model, tiny_config
from napari_sgdc.postprocess import PostprocessOptions, postprocess, separation_map
from napari_sgdc.train.losses import instance_map_loss, total_loss


def touching_pair() -> np.ndarray:
    """Two touching 12 × 14 boxes and a separate disc-like blob, ids 3, 7 and 9."""
    labels = np.zeros((40, 48), np.int32)
    labels[8:20, 6:20] = 3
    labels[8:20, 20:34] = 7  # shares the column border with id 3
    rows, cols = np.ogrid[:40, :48]
    labels[(rows - 30) ** 2 + (cols - 38) ** 2 <= 20] = 9
    return labels


def test_distance_target_peaks_at_one_inside_each_object():
    labels = touching_pair()
    target = distance_target(labels)
    assert target.dtype == np.float32 and target.shape == labels.shape
    assert np.all(target[labels == 0] == 0)
    for index in (3, 7, 9):
        inside = target[labels == index]
        assert inside.max() == pytest.approx(1.0) and inside.min() > 0
    # the column where the boxes touch is a border for both
    assert target[14, 19] < 0.5 and target[14, 20] < 0.5


def test_hover_target_runs_from_minus_one_to_one_across_each_object():
    labels = touching_pair()
    target = hover_target(labels)
    assert target.shape == (2, *labels.shape) and target.dtype == np.float32
    assert np.all(target[:, labels == 0] == 0)
    for index in (3, 7, 9):
        for channel in (0, 1):
            values = target[channel][labels == index]
            assert values.min() == pytest.approx(-1.0) and values.max() == pytest.approx(1.0)
    # x map jumps from +1 to -1 where the boxes touch; y map rises downwards
    assert target[0, 14, 19] == pytest.approx(1.0) and target[0, 14, 20] == pytest.approx(-1.0)
    assert target[1, 8, 10] < 0 < target[1, 19, 10]
    assert instance_map_target(labels, "boundary") is None
    assert instance_map_target(labels, "distance").shape == (1, *labels.shape)
    with pytest.raises(ValueError, match="instance_map"):
        instance_map_target(labels, "stardist")


@pytest.mark.parametrize("index", range(8))
def test_tta_undoes_the_vector_field_of_every_flip_and_rotation(index):
    labels = touching_pair()
    reference = torch.from_numpy(hover_target(labels))  # (2, H, W)
    seen = _dihedral(torch.from_numpy(labels), index).numpy()  # the labels as the model sees them
    predicted = torch.from_numpy(hover_target(seen))  # a perfect model's output on the transformed input
    back = _dihedral(predicted, index, inverse=True)  # (2, H, W) in the original frame
    vx, vy = _dihedral_vectors(back[0], back[1], index)
    assert torch.allclose(vx, reference[0], atol=1e-6) and torch.allclose(vy, reference[1], atol=1e-6)


@pytest.mark.parametrize("instance_map", ["distance", "hover"])
def test_separation_maps_split_touching_objects_that_the_mask_joins(instance_map):
    labels = touching_pair()
    probability = (labels > 0).astype(np.float32)
    maps = {"boundary": np.zeros_like(probability)}  # a boundary head that misses the contact
    if instance_map == "distance":
        maps["distance"] = distance_target(labels)
    else:
        maps["hover_x"], maps["hover_y"] = hover_target(labels)
    _, merged = postprocess(probability, maps["boundary"], instances=True)
    assert merged.max() == 2  # the boxes come out as one object
    separation = separation_map(maps)
    assert separation.shape == labels.shape and 0.0 <= separation.min() and separation.max() <= 1.0
    _, split = postprocess(probability, separation, PostprocessOptions(min_size=5), instances=True)
    assert split.max() == 3
    for index in (3, 7, 9):  # each object is one label covering most of it
        ids, counts = np.unique(split[labels == index], return_counts=True)
        assert ids[counts.argmax()] > 0 and counts.max() >= 0.85 * (labels == index).sum()
    # stacks: planes are decoded separately and keep unique ids
    stacked = {name: np.stack([value, value]) for name, value in maps.items()}
    _, both = postprocess(np.stack([probability] * 2), separation_map(stacked), PostprocessOptions(min_size=5),
                          instances=True)
    assert both[0].max() == 3 and both[1].max() == 6


def test_config_checks_and_heads():
    with pytest.raises(ValueError, match="instance_map"):
        ModelConfig(instance_map="stardist")
    with pytest.raises(ValueError, match="needs task 'instance'"):
        ModelConfig(instance_map="hover")
    assert ModelConfig().instance_channels == 0
    for instance_map, channels in (("boundary", 0), ("distance", 1), ("hover", 2)):
        model = build_model(tiny_config(task="instance", instance_map=instance_map)).eval()
        assert model.config.instance_channels == channels
        with torch.no_grad():
            out = model(torch.rand(2, 3, 64, 64))
        assert out["mask"].shape == (2, 1, 64, 64) and out["edge"].shape == (2, 1, 64, 64)
        if channels:
            assert out[instance_map].shape == (2, channels, 64, 64)
        else:
            assert "distance" not in out and "hover" not in out


def test_losses_are_zero_for_perfect_maps_and_need_their_targets():
    labels = touching_pair()
    hover = torch.from_numpy(hover_target(labels))[None]  # (1, 2, H, W)
    assert float(instance_map_loss("hover", hover, hover)) == pytest.approx(0.0, abs=1e-7)
    wrong = hover.clone().requires_grad_(True)
    loss = instance_map_loss("hover", wrong * 0.5, hover)
    loss.backward()
    assert float(loss.detach()) > 0 and wrong.grad.abs().sum() > 0
    distance = torch.from_numpy(distance_target(labels))[None, None]
    logits = torch.logit(distance.clamp(1e-4, 1 - 1e-4))
    assert float(instance_map_loss("distance", logits, distance)) < 1e-6
    outputs = {"mask": torch.zeros(1, 1, 40, 48), "edge": torch.zeros(1, 1, 40, 48), "hover": hover}
    batch = {"mask": torch.zeros(1, 1, 40, 48), "edge": torch.zeros(1, 1, 40, 48)}
    with pytest.raises(ValueError, match="no hover target"):
        total_loss(outputs, batch)
    _, parts = total_loss(outputs, {**batch, "hover": hover})
    assert parts["hover"] == pytest.approx(0.0, abs=1e-7)


def test_dataset_items_carry_the_instance_map_target():
    rng = np.random.default_rng(0)
    sample = Sample("pair", rng.integers(0, 255, (40, 48, 3), dtype=np.uint8), touching_pair())
    for instance_map, channels in (("distance", 1), ("hover", 2)):
        item = SegmentationDataset([sample], crop_size=32, augment=True, task="instance",
                                   instance_map=instance_map)[0]
        assert item[instance_map].shape == (channels, 32, 32) and item[instance_map].dtype == torch.float32
        ids = item["instances"][0].numpy()
        expected = instance_map_target(ids, instance_map)  # the target follows the augmented crop
        assert np.allclose(item[instance_map].numpy(), expected)
    plain = SegmentationDataset([sample], crop_size=32, augment=False, task="instance")[0]
    assert "distance" not in plain and "hover" not in plain


@pytest.mark.parametrize("instance_map", ["distance", "hover"])
def test_segment_decodes_the_instance_map_with_and_without_tta(instance_map):
    torch.manual_seed(0)
    model = build_model(tiny_config(task="instance", instance_map=instance_map)).eval()
    image = np.random.default_rng(1).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    for tta in (False, True):
        result = segment(model, image, tile=64, tta=tta)
        assert result.separation.shape == (70, 90) and result.separation.dtype == np.float32
        assert result.separation is not result.boundary
        assert result.labels.shape == (70, 90) and result.labels.dtype == np.int32
        expected = postprocess(result.probability, result.separation, instances=True)[1]
        assert np.array_equal(result.labels, expected)  # the sliders' path gives the same labels
    boundary_model = build_model(tiny_config(task="instance")).eval()
    result = segment(boundary_model, image, tile=64)
    assert result.separation is result.boundary


def test_head_maps_name_every_head():
    outputs = {"mask": torch.zeros(1, 1, 8, 8), "edge": torch.zeros(1, 1, 8, 8), "hover": torch.ones(1, 2, 8, 8) * 3}
    maps = head_maps(outputs)
    assert set(maps) == {"probability", "boundary", "hover_x", "hover_y"}
    assert float(maps["hover_x"].max()) == 1.0  # clamped to [-1, 1]


def test_segment_defaults_to_the_models_tuned_marker_threshold():
    torch.manual_seed(0)
    model = build_model(tiny_config(task="instance", instance_map="distance")).eval()
    with torch.no_grad():
        [*model.mask_head.modules()][-1].bias.fill_(3.0)  # foreground everywhere: the split is all that varies
    image = np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    result = segment(model, image, tile=None)
    outcomes = []
    for level in np.round(np.quantile(result.separation, [0.3, 0.7]), 4):
        model.config.split_level = level
        expected = postprocess(result.probability, result.separation, PostprocessOptions(split_level=level),
                               instances=True)[1]
        assert np.array_equal(segment(model, image, tile=None).labels, expected)
        outcomes.append(expected)
    assert not np.array_equal(*outcomes)  # the two levels split differently, so the default is seen
    # explicit options still win over the model's default
    chosen = PostprocessOptions(split_level=0.5)
    expected = postprocess(result.probability, result.separation, chosen, instances=True)[1]
    assert np.array_equal(segment(model, image, chosen, tile=None).labels, expected)
