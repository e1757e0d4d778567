"""Nucleus types (issue 23): config, type head, type targets, type loss, type assignment, warm start."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_sgdc.checkpoints import CheckpointError, init_from_checkpoint, load_checkpoint, save_checkpoint
from napari_sgdc.config import ModelConfig
from napari_sgdc.data.datasets import Sample, SegmentationDataset, type_pixel_counts, type_table
from napari_sgdc.inference import segment
from napari_sgdc.model import build_model, tiny_config
from napari_sgdc.postprocess import assign_types
from napari_sgdc.train.losses import total_loss, type_class_weights, type_loss

TYPES = dict(task="instance", instance_map="hover", type_names=("round", "long"), type_colors=("#ff0000", "#0000ff"))


def test_config_checks_types():
    cfg = tiny_config(**TYPES)
    assert cfg.has_types and cfg.type_names == ("round", "long")
    assert not tiny_config(task="instance").has_types
    assert ModelConfig.from_dict(cfg.to_dict()).type_colors == ("#ff0000", "#0000ff")
    with pytest.raises(ValueError, match="type_colors"):
        tiny_config(**{**TYPES, "type_colors": ("#ff0000",)})
    with pytest.raises(ValueError, match="type_colors"):
        tiny_config(**{**TYPES, "type_colors": ("red", "blue")})
    with pytest.raises(ValueError, match="distinct"):
        tiny_config(**{**TYPES, "type_names": ("a", "a")})
    with pytest.raises(ValueError, match="task 'instance'"):
        tiny_config(type_names=("a",), type_colors=("#000000",))


def test_type_head_output_and_untyped_model_unchanged():
    torch.manual_seed(0)
    model = build_model(tiny_config(**TYPES)).eval()
    out = model(torch.rand(2, 3, 64, 96))
    assert out["type"].shape == (2, 2, 64, 96)
    untyped = build_model(tiny_config(task="instance", instance_map="hover")).eval()
    assert "type" not in untyped(torch.rand(1, 3, 64, 64))
    assert not any(name.startswith("type_head") for name in untyped.state_dict())


def test_type_table_takes_the_majority_type_per_object():
    labels = np.array([[0, 5, 5, 5], [0, 5, 2, 2], [0, 0, 2, 0]])
    types = np.array([[0, 3, 3, 1], [0, 3, 4, 4], [0, 0, 0, 0]])  # object 5: 3,3,1,3 -> 3; object 2: 4,4,(0) -> 4
    table = type_table(labels, types)
    assert table.tolist() == [0, 0, 4, 0, 0, 3]
    with pytest.raises(ValueError, match="shape"):
        type_table(labels, types[:2])


def test_dataset_type_target_follows_augmented_objects():
    rng = np.random.default_rng(0)
    labels = np.zeros((96, 96), np.int32)
    labels[10:30, 10:30], labels[50:80, 40:70] = 7, 9
    table = np.zeros(10, np.int16)
    table[7], table[9] = 2, 1
    sample = Sample("a", (rng.random((96, 96, 3)) * 255).astype(np.uint8), labels, types=table)
    untyped = Sample("b", sample.image, labels)  # e.g. MoNuSeg: no types
    data = SegmentationDataset([sample, untyped], crop_size=64, types=True, instance_map="hover")
    for epoch in range(3):
        data.set_epoch(epoch)
        item = data[0]
        ids, typed = item["instances"][0].numpy(), item["type"][0].numpy()
        assert np.array_equal(typed, table[ids])  # every pixel carries its object's type
        assert not data[1]["type"].any()  # no types known: all 0 (ignored by the loss)
    assert type_pixel_counts(data, 2).tolist() == [96 * 96 - 1300, 900, 400]  # index 0: background of typed samples


def test_type_loss_by_hand():
    # one pixel of type 1 with logits (0, 0): CE = ln 2; p = (0.5, 0.5); Dice of type 1 = 1 - (2*0.5)/(0.5+1)
    logits = torch.zeros(1, 2, 1, 2)
    target = torch.tensor([[[[1, 0]]]])  # the second pixel has no type: ignored
    expected = np.log(2) + (1 - 1.0 / 1.5)
    assert float(type_loss(logits, target)) == pytest.approx(expected, abs=1e-4)
    # class weights scale CE terms of each pixel and normalise by their sum: one pixel -> unchanged
    assert float(type_loss(logits, target, torch.tensor([5.0, 1.0]))) == pytest.approx(expected, abs=1e-4)
    # nothing known: zero, with a gradient
    empty = type_loss(logits.requires_grad_(), torch.zeros(1, 1, 1, 2, dtype=torch.long))
    assert float(empty.detach()) == 0.0
    empty.backward()
    with pytest.raises(ValueError, match="shape"):
        type_loss(logits, torch.zeros(1, 1, 2, 2, dtype=torch.long))


def test_class_weights_favour_rare_types():
    weights = type_class_weights([999, 100, 900, 0], balance=0.5)
    assert weights[0] > weights[1]  # the rare type weighs more
    assert float(weights[2]) == 1.0  # absent type
    counts = torch.tensor([100.0, 900.0])
    assert float((weights[:2] * counts).sum() / counts.sum()) == pytest.approx(1.0)
    assert type_class_weights([0, 5, 50], balance=0.0).tolist() == [1.0, 1.0]


def test_total_loss_needs_a_type_target_for_a_type_head():
    model = build_model(tiny_config(**TYPES)).eval()
    out = model(torch.rand(1, 3, 32, 32))
    batch = {"mask": torch.zeros(1, 1, 32, 32), "edge": torch.zeros(1, 1, 32, 32), "hover": torch.zeros(1, 2, 32, 32)}
    with pytest.raises(ValueError, match="type target"):
        total_loss(out, batch)
    batch["type"] = torch.ones(1, 1, 32, 32, dtype=torch.long)
    loss, parts = total_loss(out, batch)
    assert "type" in parts and parts["type"] > 0


def test_assign_types_by_mean_probability():
    labels = np.array([[1, 1, 0], [2, 2, 2]])
    probability = np.zeros((2, 3, 2), np.float32)
    probability[0, :2] = [[0.9, 0.1], [0.3, 0.7]]  # object 1: means (0.6, 0.4) -> type 1, 0.6
    probability[1] = [[0.2, 0.8]] * 3  # object 2: type 2, 0.8
    types, confidence = assign_types(labels, probability)
    assert types.tolist() == [0, 1, 2]
    assert confidence == pytest.approx([0.0, 0.6, 0.8])
    stack_types, _ = assign_types(np.stack([labels, np.where(labels, labels + 2, 0)]), np.stack([probability] * 2))
    assert stack_types.tolist() == [0, 1, 2, 1, 2]
    with pytest.raises(ValueError, match="do not fit"):
        assign_types(labels, probability[..., 0])


def test_segment_gives_a_type_per_object():
    torch.manual_seed(0)
    model = build_model(tiny_config(**TYPES)).eval()
    with torch.no_grad():  # a model that finds every pixel foreground, type "long" on the left half
        model.mask_head.bias.fill_(20.0)
        model.type_head[1].weight.zero_()
        model.type_head[1].bias.copy_(torch.tensor([0.0, 5.0]))
    result = segment(model, np.zeros((64, 64, 3), np.uint8), tile=None)
    assert result.labels.max() >= 1
    assert result.type_probability.shape == (64, 64, 2)
    assert set(result.object_types[1:].tolist()) == {2}
    assert result.type_map.dtype == np.uint8 and set(np.unique(result.type_map)) <= {0, 2}
    assert np.all(result.type_confidence[1:] > 0.9)
    untyped = segment(build_model(tiny_config(task="instance")).eval(), np.zeros((64, 64, 3), np.uint8), tile=None)
    assert untyped.object_types is None and untyped.type_map is None


def test_warm_start_copies_matching_weights(tmp_path):
    base = build_model(tiny_config(task="instance", instance_map="hover"))
    path = tmp_path / "base.safetensors"
    save_checkpoint(path, base)
    typed = build_model(tiny_config(**TYPES))
    fresh = init_from_checkpoint(typed, path)
    assert fresh and all(name.startswith("type_head") for name in fresh)
    assert torch.equal(typed.state_dict()["mask_head.weight"], base.state_dict()["mask_head.weight"])
    other = build_model(ModelConfig(encoder="efficientnet_lite0", pretrained=False))  # another architecture
    with pytest.raises(CheckpointError, match="match"):
        init_from_checkpoint(other, path)
    save_checkpoint(tmp_path / "typed.safetensors", typed)
    loaded, _ = load_checkpoint(tmp_path / "typed.safetensors")
    assert loaded.config.type_names == ("round", "long")
