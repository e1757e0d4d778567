"""Checkpoints: round trip, metadata, safety, atomicity, clear errors."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from napari_sgdc.config import TrainConfig
from napari_sgdc.checkpoints import (
    CheckpointError, atomic_write, load_checkpoint, load_model, read_metadata, save_checkpoint,
)
from napari_sgdc.model import build_model, tiny_config


def test_round_trip_restores_weights_and_metadata(tiny_model, tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", tiny_model, train_config=TrainConfig(epochs=3),
                           metrics={"iou": 0.5}, provenance={"base": "none"})
    model, metadata = load_checkpoint(path)
    for name, tensor in tiny_model.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert metadata["model_config"]["encoder"] == "mini"
    assert metadata["train_config"]["epochs"] == 3
    assert metadata["metrics"] == {"iou": 0.5} and metadata["provenance"] == {"base": "none"}
    assert metadata["normalisation"]["mean"] == [127.0, 127.0, 127.0]
    assert metadata["package_version"]
    assert model.config == tiny_model.config and not model.training


def test_fp16_storage_loads_back_as_float32(tiny_model, tmp_path):
    path = save_checkpoint(tmp_path / "m16.safetensors", tiny_model, dtype=torch.float16)
    model = load_model(str(path), device="cpu")
    weight = model.mask_head.weight
    assert weight.dtype == torch.float32
    assert torch.allclose(weight, tiny_model.mask_head.weight, atol=1e-3)


class _RunsCode:
    def __reduce__(self):
        return (exec, ("open(%r, 'w').write('pwned')" % self.marker,))


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned.txt"
    payload = _RunsCode()
    payload.marker = str(marker)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as stream:
        pickle.dump({"model_config": {}, "state_dict": payload}, stream)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not marker.exists()


def test_plain_tensor_pth_checkpoint_loads(tiny_model, tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"model_config": tiny_model.config.to_dict(), "state_dict": tiny_model.state_dict()}, path)
    model, _ = load_checkpoint(path)
    assert torch.equal(model.mask_head.weight, tiny_model.mask_head.weight)


def test_mismatched_config_names_the_keys(tiny_model, tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", tiny_model)
    other = build_model(tiny_config(decoder_channels=(32, 16, 16, 8, 4)))
    from napari_sgdc.checkpoints import _read_tensors, load_state_checked

    tensors, _ = _read_tensors(path)
    with pytest.raises(CheckpointError, match=r"shape mismatch: .*decoder\.4\.fuse"):
        load_state_checked(other, tensors)
    with pytest.raises(CheckpointError, match=r"unexpected: .*proj_guidance"):
        load_state_checked(build_model(tiny_config(block="static")), tensors)


def test_failed_write_keeps_the_existing_file(tmp_path):
    target = tmp_path / "keep.safetensors"
    target.write_bytes(b"original")

    def failing_write(tmp):
        tmp.write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, failing_write)
    assert target.read_bytes() == b"original"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.safetensors"]


def test_unknown_model_name_lists_builtins():
    with pytest.raises(FileNotFoundError, match="built-in models"):
        load_model("no-such-model")


def test_non_checkpoint_files_give_one_clear_error(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        load_checkpoint(junk)
    with pytest.raises(CheckpointError, match="unsupported"):
        (tmp_path / "m.onnx").write_bytes(b"x")
        load_checkpoint(tmp_path / "m.onnx")


def test_metadata_is_plain_json(tiny_model, tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", tiny_model)
    metadata = read_metadata(path)
    assert json.loads(json.dumps(metadata)) == metadata


@pytest.mark.parametrize("field, value", [
    ("heads", 0), ("decoder_channels", [10**7] * 5), ("decoder_channels", [0, 8, 8, 8, 8]), ("sge_channels", 0),
    ("kernel_size", 4), ("norm_std", [1.0, 0.0, 1.0]), ("resize_long_side", -3), ("n_classes", "two"),
])
def test_forged_model_config_is_refused_before_building(tiny_model, tmp_path, monkeypatch, field, value):
    import napari_sgdc.model as model_module
    from safetensors.torch import save_file

    path = save_checkpoint(tmp_path / "real.safetensors", tiny_model)
    metadata = read_metadata(path)
    metadata["model_config"][field] = value
    forged = tmp_path / "forged.safetensors"
    save_file({"x": torch.zeros(1)}, str(forged), metadata={"napari_sgdc": json.dumps(metadata)})
    monkeypatch.setattr(model_module, "build_model", lambda cfg: pytest.fail("built a model from a forged config"))
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(forged)
    message = str(error.value)
    assert "forged.safetensors" in message and field in message and "\n" not in message


def test_non_json_metadata_names_the_file(tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file({"x": torch.zeros(1)}, str(bad), metadata={"napari_sgdc": "{not json"})
    with pytest.raises(CheckpointError, match="bad.safetensors.*JSON"):
        load_checkpoint(bad)


def test_read_model_config_without_loading_weights(tmp_path):
    from napari_sgdc.checkpoints import load_model, model_path, read_model_config

    for name in ("nuclei", "dermoscopy"):
        assert read_model_config(name) == load_model(name, device="cpu").config
        assert read_model_config(model_path(name)) == read_model_config(name)
    with pytest.raises(FileNotFoundError, match="built-in models"):
        read_model_config(tmp_path / "missing.safetensors")
