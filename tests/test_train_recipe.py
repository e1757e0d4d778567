"""`napari_sgdc.train.train_from_config` and `tune_checkpoint`: training and tuning called from Python."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import io as skio

from napari_sgdc.checkpoints import read_metadata, save_checkpoint
from napari_sgdc.model import build_model, tiny_config
from napari_sgdc.train import train_from_config, tune_checkpoint, tuning_summary
from napari_sgdc.train.recipe import load_config_sections, model_config_for

torch.set_num_threads(1)
FAST = {"crop_size": 64, "batch_size": 2, "steps_per_epoch": 2, "epochs": 1, "device": "cpu"}
MINI = {"encoder": "mini", "pretrained": False}


@pytest.fixture(scope="module")
def instance_data(tmp_path_factory) -> Path:
    """``folders`` layout with ``train/`` and ``val/``: touching squares as instance maps."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("val", 2)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "instances").mkdir()
        for index in range(count):
            labels = np.zeros((64, 64), np.uint16)
            labels[8:28, 8:28], labels[8:28, 28:48], labels[36:56, 20:40] = 1, 2, 3
            image = np.clip(np.where(labels[..., None] > 0, 190.0, 50.0) + rng.normal(0, 12, (64, 64, 3)), 0, 255)
            skio.imsave(str(root / split / "images" / f"im{index}.png"), image.astype(np.uint8), check_contrast=False)
            skio.imsave(str(root / split / "instances" / f"im{index}.png"), labels, check_contrast=False)
    return root


def test_config_sections_from_a_mapping_or_yaml(tmp_path):
    assert load_config_sections(None) == ({}, {})
    assert load_config_sections({"model": {"kernel_size": 5}}) == ({"kernel_size": 5}, {})
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("train:\n  epochs: 3\n")
    assert load_config_sections(yaml_file) == ({}, {"epochs": 3})
    with pytest.raises(ValueError, match="only 'model:' and 'train:'"):
        load_config_sections({"model": {}, "data": {}})
    assert model_config_for(MINI, "instance", "consep").class_names == ("nucleus",)
    assert model_config_for(MINI, "semantic", "ph2").class_names == ("lesion",)


def test_train_from_config_emits_events_saves_and_tunes(instance_data, tmp_path):
    out = tmp_path / "run" / "model.safetensors"
    events = []
    result = train_from_config({"model": {"kernel_size": 5}, "train": {"warmup_steps": 1}}, instance_data, "folders",
                               out, model_overrides=MINI, train_overrides=FAST, events=events.append,
                               provenance={"command": "test"})
    kinds = [event["kind"] for event in events]
    assert kinds == ["start", "step", "step", "epoch", "trained", "tuned"]
    assert events[0] == {"kind": "start", "encoder": "mini", "block": "sgdc", "task": "instance", "n_train": 3,
                         "n_val": 2}
    assert not result.cancelled and result.task == "instance" and (result.n_train, result.n_val) == (3, 2)
    assert result.history.steps == 2 and out.is_file()
    metadata = read_metadata(out)
    assert metadata["provenance"]["command"] == "test" and metadata["provenance"]["layout"] == "folders"
    assert metadata["model_config"]["kernel_size"] == 5 and metadata["train_config"]["warmup_steps"] == 1
    assert metadata["metrics"]["postprocess_tuning"]["n_images"] == 2
    for name in ("threshold", "split_level", "min_size"):
        assert metadata["model_config"][name] == result.tuning[name] == getattr(result.model_config, name)
    assert "validation AJI" in tuning_summary(result.tuning)


def test_bad_settings_fail_before_any_data_is_read(tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        train_from_config(None, tmp_path / "missing", "folders", tmp_path / "m.safetensors",
                          train_overrides={**FAST, "batch_size": 0})
    with pytest.raises(ValueError, match="does not exist"):
        train_from_config(None, tmp_path / "missing", "folders", tmp_path / "m.safetensors", train_overrides=FAST)


def test_a_cancelled_run_returns_without_training(instance_data, tmp_path):
    cancel = threading.Event()
    cancel.set()
    events = []
    out = tmp_path / "m.safetensors"
    result = train_from_config(None, instance_data, "folders", out, model_overrides=MINI, train_overrides=FAST,
                               val_split="none", events=events.append, cancel=cancel)
    assert result.cancelled and result.history.steps == 0 and result.n_val == 0
    assert events == [] and not out.exists() and result.tuning is None


def test_tune_checkpoint_writes_a_tuned_copy_and_checks_first(instance_data, tmp_path):
    torch.manual_seed(0)
    source = save_checkpoint(tmp_path / "in.safetensors", build_model(tiny_config(task="instance")))
    before = source.read_bytes()
    out = tmp_path / "tuned.safetensors"
    found = tune_checkpoint(source, out, instance_data, "folders", split="val", max_images=1, device="cpu")
    assert source.read_bytes() == before
    metadata = read_metadata(out)
    assert metadata["metrics"]["postprocess_tuning"]["n_images"] == 1
    assert metadata["model_config"]["min_size"] == found["min_size"]
    with pytest.raises(ValueError, match="exists"):
        tune_checkpoint(source, out, instance_data, "folders", split="val")
    with pytest.raises(ValueError, match="never changed"):
        tune_checkpoint(source, source, instance_data, "folders", split="val", overwrite=True)
    with pytest.raises(ValueError, match="no images in split 'test'"):
        tune_checkpoint(source, out, instance_data, "folders", split="test", overwrite=True)
    semantic = save_checkpoint(tmp_path / "semantic.safetensors", build_model(tiny_config()))
    with pytest.raises(ValueError, match="instance model"):
        tune_checkpoint(semantic, tmp_path / "x.safetensors", instance_data, "folders")
