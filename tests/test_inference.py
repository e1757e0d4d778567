"""segment() on tiny models: inputs, tiling, progress, cancel, stacks, gates, instances."""

from __future__ import annotations

import math
import threading
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from napari_sgdc.config import ModelConfig
from napari_sgdc.inference import (Cancelled, GateMap, OutOfMemoryFallback, SegmentationResult, predict_maps,
                                   segment)
from napari_sgdc.postprocess import PostprocessOptions, postprocess
from napari_sgdc.model import build_model

torch.set_num_threads(1)

MINI = dict(encoder="mini", pretrained=False, decoder_channels=(32, 16, 16, 8, 8), sge_channels=16,
            guide_channels=8, heads=4)


@pytest.fixture(scope="module")
def mini_model():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**MINI)).eval()
    with torch.no_grad():  # make the random network's output vary visibly across the image
        model.mask_head.weight.mul_(200.0)
        model.edge_head.weight.mul_(200.0)
    return model


class PixelwiseModel(nn.Module):
    """A model without spatial context: tiled and untiled outputs must agree exactly.

    Its gate at stride 4 is a 4x4 average pool, so aligned tiles also give identical gates.
    """

    size_multiple = 32

    def __init__(self, task: str = "semantic", resize_long_side: int = 0):
        super().__init__()
        self.config = ModelConfig(**MINI, task=task, resize_long_side=resize_long_side)
        self.head = nn.Conv2d(3, 2, 1)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[8.0, -8.0, 4.0], [-4.0, 6.0, 2.0]])[:, :, None, None])
            self.head.bias.copy_(torch.tensor([-2.0, -1.0]))

    def forward(self, x, return_gates=False):
        assert x.shape[-1] % 32 == 0 and x.shape[-2] % 32 == 0
        logits = self.head(x)  # (B, 2, H, W)
        out = {"mask": logits[:, :1], "edge": logits[:, 1:]}
        if return_gates:
            pooled = F.avg_pool2d(x, 4)  # (B, 3, H/4, W/4)
            out["gates"] = [{"name": "pix@s4", "stride": 4, "gate1": torch.sigmoid(pooled),
                             "gate2": torch.sigmoid(-pooled)}]
        return out


def _image(height, width, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random((height, width, 3)) * 255).astype(np.uint8)


def test_result_types_and_non_multiple_of_32_size(mini_model):
    image = _image(45, 77)
    result = segment(mini_model, image)
    assert isinstance(result, SegmentationResult)
    assert result.probability.shape == result.mask.shape == result.boundary.shape == (45, 77)
    assert result.probability.dtype == np.float32 and result.boundary.dtype == np.float32
    assert result.mask.dtype == bool
    assert result.labels is None and result.gates is None
    expected, no_labels = postprocess(result.probability, result.boundary, PostprocessOptions(0.5, 0.5, 20))
    np.testing.assert_array_equal(result.mask, expected)
    assert no_labels is None
    assert not (result.mask & ~(result.probability > 0.5)).any()
    assert 0.0 <= result.probability.min() and result.probability.max() <= 1.0
    assert result.probability.std() > 0.01  # the amplified head really varies


def test_input_dtypes_and_channels_agree(mini_model):
    rgb8 = _image(40, 50)
    reference = segment(mini_model, rgb8).probability
    variants = {
        "uint16": rgb8.astype(np.uint16) * 257,
        "float": rgb8.astype(np.float32) / 255.0,
        "rgba": np.concatenate([rgb8, np.full((40, 50, 1), 7, np.uint8)], axis=2),
    }
    for name, image in variants.items():
        np.testing.assert_allclose(segment(mini_model, image).probability, reference, atol=1e-4, err_msg=name)
    gray8 = rgb8[..., 0]
    gray_ref = segment(mini_model, np.repeat(gray8[..., None], 3, axis=2)).probability
    for image in (gray8, gray8[..., None], gray8.astype(np.uint16) * 257):
        result = segment(mini_model, image)
        assert result.probability.shape == (40, 50)
        np.testing.assert_allclose(result.probability, gray_ref, atol=1e-4)


def test_bad_inputs_raise_value_error(mini_model):
    with pytest.raises(ValueError, match=r"channels last; got shape \(40, 50, 2\)$"):  # the real shape
        segment(mini_model, np.zeros((40, 50, 2), np.uint8))
    with pytest.raises(ValueError, match=r"got shape \(3, 40, 50\).*moveaxis"):  # channels-first hint
        segment(mini_model, np.zeros((3, 40, 50), np.uint8), stack=False)
    with pytest.raises(ValueError):
        segment(mini_model, np.zeros((2, 3, 40, 50, 3), np.uint8))
    with pytest.raises(ValueError, match="overlap"):
        segment(mini_model, _image(40, 50), overlap=1.0)


def test_tiled_equals_untiled_for_pixelwise_model():
    model = PixelwiseModel()
    image = _image(150, 230, seed=1)
    whole = segment(model, image, tile=None, return_gates=True)
    tiled = segment(model, image, tile=64, overlap=0.5, return_gates=True)
    np.testing.assert_allclose(tiled.probability, whole.probability, atol=1e-5)
    np.testing.assert_allclose(tiled.boundary, whole.boundary, atol=1e-5)
    assert whole.probability.std() > 0.1
    assert [g.stride for g in tiled.gates] == [4]
    assert tiled.gates[0].data.shape == (2, math.ceil(150 / 4), math.ceil(230 / 4))
    np.testing.assert_allclose(tiled.gates[0].data.astype(np.float32), whole.gates[0].data.astype(np.float32),
                               atol=2e-3)


def test_tiled_close_to_untiled_in_interior(mini_model):
    image = _image(160, 224, seed=2)
    whole = segment(mini_model, image, tile=None)
    tiled = segment(mini_model, image, tile=96, overlap=0.5)
    interior = (slice(32, -32), slice(32, -32))
    difference = np.abs(tiled.probability - whole.probability)[interior]
    spread = whole.probability[interior].std()
    assert spread > 0.01
    assert difference.mean() < 0.02 * spread
    assert difference.max() < 0.05
    # and they are not trivially identical code paths: the tiles really differ somewhere
    assert difference.max() > 0


def test_progress_counts_every_tile(mini_model):
    calls = []
    # padded 128 x 160, tile 64, step 32 -> 3 x 4 = 12 tiles
    segment(mini_model, _image(100, 150), tile=64, overlap=0.5, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 12) for i in range(1, 13)]
    calls.clear()
    segment(mini_model, _image(100, 150), tile=None, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 1)]


def test_cancel_raises_and_restores_training_flag():
    model = build_model(ModelConfig(**MINI)).train()
    running_mean = [m.running_mean.clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    cancel = threading.Event()
    calls = []

    def progress(done, total):
        calls.append(done)
        if done == 2:
            cancel.set()

    with pytest.raises(Cancelled):
        segment(model, _image(100, 150), tile=64, overlap=0.5, progress=progress, cancel=cancel)
    assert calls == [1, 2]
    assert model.training
    after = [m.running_mean for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(running_mean, after))  # ran in eval mode
    already = threading.Event()
    already.set()
    with pytest.raises(Cancelled):
        segment(model, _image(40, 40), cancel=already)


def test_stacks_plane_by_plane(mini_model):
    planes = np.stack([_image(48, 70, seed=s) for s in range(3)])  # (3, 48, 70, 3)
    calls = []
    result = segment(mini_model, planes, return_gates=True, progress=lambda d, t: calls.append((d, t)))
    assert result.probability.shape == result.mask.shape == result.boundary.shape == (3, 48, 70)
    assert calls == [(1, 3), (2, 3), (3, 3)]
    single = segment(mini_model, planes[1], return_gates=True)
    np.testing.assert_allclose(result.probability[1], single.probability, atol=1e-6)
    for stacked, plane in zip(result.gates, single.gates):
        assert stacked.data.shape == (3, *plane.data.shape)
        np.testing.assert_array_equal(stacked.data[1], plane.data)
    gray_stack = planes[..., 0]  # (3, 48, 70): channels-first RGB or 3 gray planes?
    with pytest.raises(ValueError, match=r"\(3, 48, 70\) looks channels-first"):
        segment(mini_model, gray_stack)
    assert segment(mini_model, gray_stack, stack=True).probability.shape == (3, 48, 70)
    five_planes = np.concatenate([gray_stack, gray_stack[:2]])  # (5, 48, 70) cannot be channels
    assert segment(mini_model, five_planes).probability.shape == (5, 48, 70)
    assert segment(mini_model, planes[0]).probability.shape == (48, 70)  # RGB is not a stack
    assert segment(mini_model, planes[:, :, :, 0][:, :, :3], stack=True).probability.shape == (3, 48, 3)


def test_gates_shapes_and_strides(mini_model):
    result = segment(mini_model, _image(100, 130), return_gates=True, tile=64, overlap=0.25)
    assert [g.stride for g in result.gates] == [16, 8, 4]
    for gate in result.gates:
        assert isinstance(gate, GateMap)
        assert gate.name.endswith(f"s{gate.stride}")
        assert gate.data.dtype == np.float16
        assert gate.data.shape == (2, math.ceil(100 / gate.stride), math.ceil(130 / gate.stride))
        assert 0.0 <= gate.data.min() and gate.data.max() <= 1.0
    static = build_model(ModelConfig(**MINI, block="static")).eval()
    assert segment(static, _image(64, 64), return_gates=True).gates == []


def test_device_argument_and_instance_models():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**MINI, task="instance")).eval()
    result = segment(model, _image(64, 64), PostprocessOptions(min_size=1), device="cpu")
    assert result.labels is not None and result.labels.dtype == np.int32
    assert result.labels.shape == (64, 64)
    np.testing.assert_array_equal(result.labels > 0, result.mask)
    labelled = segment(PixelwiseModel(task="instance"), _image(64, 64))
    assert labelled.labels is not None and labelled.labels.dtype == np.int32
    assert segment(PixelwiseModel(task="semantic"), _image(64, 64)).labels is None


def test_bad_tile_sizes_are_refused(mini_model):
    for tile in (-5, 17, 63, 2.5):
        with pytest.raises(ValueError, match="tile must be"):
            segment(mini_model, _image(40, 50), tile=tile)
    assert segment(mini_model, _image(40, 50), tile=0).mask.shape == (40, 50)


def test_working_resolution_resizes_and_restores():
    image = np.zeros((100, 150, 3), np.uint8)
    image[:, :75] = (200, 30, 10)
    image[:, 75:] = (10, 60, 220)
    native = segment(PixelwiseModel(), image, return_gates=True)
    calls = []
    resized = segment(PixelwiseModel(resize_long_side=64), image, return_gates=True,
                      progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 1)]  # 43 x 64 at the working resolution: one tile
    assert resized.probability.shape == resized.boundary.shape == resized.mask.shape == (100, 150)
    assert resized.gates[0].stride == 4 and resized.gates[0].data.shape == (2, 25, 38)
    away_from_edge = (slice(None), np.r_[0:60, 90:150])
    np.testing.assert_allclose(resized.probability[away_from_edge], native.probability[away_from_edge], atol=1e-4)
    assert abs(native.probability[0, 0] - native.probability[0, -1]) > 0.1  # the halves differ


class OutOfMemoryAbove(nn.Module):
    """No weights; runs out of memory for inputs of more than `limit` pixels, or on any
    device but the CPU (the meta device stands in for a GPU here)."""

    size_multiple = 32

    def __init__(self, limit: int):
        super().__init__()
        self.config = ModelConfig(**MINI)
        self.limit = limit
        self.devices: list[str] = []

    def forward(self, x, return_gates=False):
        self.devices.append(x.device.type)
        if x.device.type != "cpu" or x.shape[-1] * x.shape[-2] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        logits = x.mean(dim=1, keepdim=True) * 8 - 4  # (B, 1, H, W)
        return {"mask": logits, "edge": -logits}


def test_out_of_memory_retries_with_smaller_tiles():
    image = _image(300, 300)
    model = OutOfMemoryAbove(limit=128 * 128)
    with pytest.warns(OutOfMemoryFallback) as caught:
        result = segment(model, image, tile=512)
    assert [str(w.message).split("; ")[1] for w in caught] == ["retrying on cpu with 256-px tiles",
                                                               "retrying on cpu with 128-px tiles"]
    reference = segment(OutOfMemoryAbove(limit=10**9), image, tile=128)
    np.testing.assert_array_equal(result.probability, reference.probability)


def test_out_of_memory_on_the_accelerator_falls_back_to_the_cpu():
    model = OutOfMemoryAbove(limit=10**9)
    with pytest.warns(OutOfMemoryFallback) as caught:
        result = segment(model, _image(100, 100), tile=256, device=torch.device("meta"))
    assert "retrying on cpu with 256-px tiles" in str(caught[-1].message)
    assert model.devices[0] == "meta" and model.devices[-1] == "cpu"
    assert result.mask.shape == (100, 100)
    with pytest.raises(torch.OutOfMemoryError):  # nothing left to try: the error surfaces
        segment(OutOfMemoryAbove(limit=10), _image(100, 100), tile=128)


def test_tta_is_exact_for_a_transform_equivariant_model():
    image = _image(70, 90)
    plain = segment(PixelwiseModel(), image)
    averaged = segment(PixelwiseModel(), image, tta=True, uncertainty="tta")
    np.testing.assert_allclose(averaged.probability, plain.probability, atol=1e-5)
    assert averaged.uncertainty.max() < 1e-2  # all 8 transforms agree


def test_tta_and_uncertainty_on_a_real_network(mini_model):
    image = _image(70, 90)
    plain = segment(mini_model, image)
    averaged = segment(mini_model, image, tta=True)
    assert np.abs(averaged.probability - plain.probability).max() > 1e-3  # the network is not equivariant
    for method in ("entropy", "tta", True):
        result = segment(mini_model, image, uncertainty=method)
        assert result.uncertainty.shape == (70, 90) and result.uncertainty.dtype == np.float32
        assert 0.0 <= result.uncertainty.min() and result.uncertainty.max() <= 1.0
        assert result.confidence is None  # semantic model
    entropy = segment(mini_model, image, uncertainty="entropy")
    near_half = np.abs(entropy.probability - 0.5) < 0.05
    sure = np.abs(entropy.probability - 0.5) > 0.45
    assert near_half.any() and sure.any()
    assert entropy.uncertainty[near_half].min() > entropy.uncertainty[sure].max()
    with pytest.raises(ValueError, match="uncertainty"):
        segment(mini_model, image, uncertainty="dropout")


def test_uncertainty_for_stacks_working_resolution_and_instances():
    stack = np.stack([_image(40, 60, seed=s) for s in range(2)])  # (2, 40, 60, 3)
    result = segment(PixelwiseModel(resize_long_side=32), stack, uncertainty="tta")
    assert result.uncertainty.shape == (2, 40, 60)
    torch.manual_seed(0)
    model = build_model(ModelConfig(**MINI, task="instance")).eval()
    with torch.no_grad():
        model.mask_head.weight.mul_(200.0)
    labelled = segment(model, _image(64, 64), PostprocessOptions(min_size=1), uncertainty=True)
    assert labelled.confidence.shape == (labelled.labels.max() + 1,)
    for index in range(1, labelled.labels.max() + 1):
        expected = 1.0 - labelled.uncertainty[labelled.labels == index].mean()
        assert abs(labelled.confidence[index] - expected) < 1e-5


def test_mpp_resamples_to_the_models_scale_and_back():
    from napari_sgdc.inference import working_shape
    from napari_sgdc.model import tiny_config

    torch.manual_seed(0)
    model = build_model(tiny_config(task="instance", mpp=0.25)).eval()
    assert working_shape(60, 80, model.config, 0.5) == (120, 160)  # 20x → 40x: twice the pixels
    assert working_shape(60, 80, model.config, None) == (60, 80)
    image = _image(60, 80)
    seen = []
    result = segment(model, image, tile=64, mpp=0.5, progress=lambda done, total: seen.append(total))
    assert result.probability.shape == (60, 80) and result.labels.shape == (60, 80)
    native = []
    segment(model, image, tile=64, progress=lambda done, total: native.append(total))
    assert seen[-1] > native[-1]  # the network saw the enlarged image
    with pytest.raises(ValueError, match="mpp must be"):
        segment(model, image, mpp=-1.0)
    unscaled = build_model(tiny_config()).eval()
    with pytest.raises(ValueError, match="does not record"):
        segment(unscaled, image, mpp=0.5)


def test_amp_runs_bf16_where_native_and_is_a_no_op_elsewhere(mini_model, monkeypatch):
    from napari_sgdc import device as devices

    dtypes = []
    hook = mini_model.mask_head.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    image = _image(70, 90)
    try:
        plain = segment(mini_model, image)
        fast = segment(mini_model, image, amp=True)
        fast_maps = predict_maps(mini_model, image, amp=True)  # the whole-slide path
        monkeypatch.setattr(devices, "bf16_supported", lambda device: False)  # a CPU without native bf16
        fallback = segment(mini_model, image, amp=True)
    finally:
        hook.remove()
    native = torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    assert dtypes == [torch.float32, native, native, torch.float32]
    np.testing.assert_allclose(fast_maps[0], fast.probability, atol=0.02)
    assert fast.probability.dtype == np.float32 and fast.mask.shape == (70, 90)
    assert np.abs(fast.probability - plain.probability).mean() < 0.02
    np.testing.assert_array_equal(fallback.probability, plain.probability)
