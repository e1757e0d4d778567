"""Encoders and the composed segmenter."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from napari_sgdc.config import ModelConfig
from napari_sgdc.model import build_model, tiny_config
from napari_sgdc.model.encoders import EfficientNetLite0, MiniEncoder, ResNet50


def test_lite0_port_classifies_chelsea_as_a_cat():
    from skimage.data import chelsea
    from skimage.transform import resize

    model = EfficientNetLite0(pretrained=True, with_head=True).eval()
    image = resize(chelsea(), (224, 224), preserve_range=True, anti_aliasing=True)
    x = (torch.tensor(image, dtype=torch.float32).permute(2, 0, 1)[None] - 127.0) / 128.0
    with torch.no_grad():
        probabilities = model.classify(x).softmax(1)[0]
    assert 281 <= int(probabilities.argmax()) <= 285
    assert float(probabilities.max()) > 0.5


@pytest.mark.parametrize("encoder_type", [EfficientNetLite0, ResNet50, MiniEncoder])
def test_encoders_expose_strides_and_channels(encoder_type):
    encoder = encoder_type(pretrained=False) if encoder_type is EfficientNetLite0 else encoder_type()
    with torch.no_grad():
        features = encoder.eval()(torch.rand(1, 3, 64, 96))
    assert [f.shape[1] for f in features] == list(encoder.out_channels)
    assert [64 // f.shape[2] for f in features] == [2, 4, 8, 16, 32]
    assert encoder.output_stride == 32


def test_resnet50_feeds_sge_with_256_and_2048_channels():
    encoder = ResNet50()
    assert encoder.out_channels[1] == 256 and encoder.out_channels[4] == 2048
    keys = set(encoder.state_dict())  # torchvision's names, without fc
    assert {"conv1.weight", "bn1.running_mean", "layer1.0.downsample.0.weight", "layer4.2.conv3.weight"} <= keys
    assert len([key for key in keys if key.endswith(".weight")]) == 106


def test_lite0_segmenter_segments_512_rgb_on_cpu():
    model = build_model(ModelConfig()).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 512, 512), return_gates=True)
    assert out["mask"].shape == (1, 1, 512, 512) and out["edge"].shape == (1, 1, 512, 512)
    assert [g["stride"] for g in out["gates"]] == [16, 8, 4]
    assert out["gates"][2]["gate1"].shape == (1, 48, 128, 128)
    assert out["gates"][2]["kernel"].shape == (1, 4, 49, 128, 128)
    assert torch.isfinite(out["mask"]).all()


@pytest.mark.parametrize("block", ["sgdc", "pooling", "static"])
def test_block_switch_builds_and_trains(block):
    torch.manual_seed(0)
    model = build_model(tiny_config(block=block))
    out = model(torch.rand(2, 3, 64, 64))
    (out["mask"].mean() + out["edge"].mean()).backward()
    block_names = {type(stage.block).__name__ for stage in model.decoder if stage.block is not None}
    assert block_names == {{"sgdc": "SGDC", "pooling": "PoolingDynamicConv", "static": "StaticBlock"}[block]}


def test_gates_not_returned_unless_asked(tiny_model):
    with torch.no_grad():
        assert "gates" not in tiny_model(torch.rand(1, 3, 64, 64))


def test_input_size_must_be_multiple_of_32(tiny_model):
    with pytest.raises(ValueError, match="multiples of 32"):
        tiny_model(torch.rand(1, 3, 50, 64))


def test_normalisation_comes_from_config():
    model = build_model(tiny_config(norm_mean=(10.0, 20.0, 30.0), norm_std=(2.0, 2.0, 2.0)))
    assert torch.allclose(model.norm_mean.flatten() * 255, torch.tensor([10.0, 20.0, 30.0]))


def test_config_rejects_unknown_values():
    with pytest.raises(ValueError, match="block"):
        ModelConfig(block="attention")
    with pytest.raises(ValueError, match="unknown keys"):
        ModelConfig.from_dict({"encoder": "mini", "colour": 1})


def test_core_imports_no_gui_toolkit():
    """Every module outside ``_napari`` (found by walking the package) imports no GUI toolkit."""
    code = (
        "import importlib, pkgutil, sys, napari_sgdc\n"
        "names = [m.name for m in pkgutil.walk_packages(napari_sgdc.__path__, 'napari_sgdc.')\n"
        "         if '._napari' not in m.name]\n"
        "for name in names: importlib.import_module(name)\n"
        "bad = [m for m in ('napari', 'qtpy', 'PyQt6', 'PyQt5', 'PySide6', 'magicgui') if m in sys.modules]\n"
        "print(len(names), sorted(names), bad); sys.exit(1 if bad or len(names) < 20 else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    for module in ("napari_sgdc.inference", "napari_sgdc.train.fit", "napari_sgdc.data.datasets",
                   "napari_sgdc.metrics", "napari_sgdc.cli", "napari_sgdc.postprocess", "napari_sgdc.files",
                   "napari_sgdc.samples", "napari_sgdc.demo"):
        assert f"'{module}'" in result.stdout
