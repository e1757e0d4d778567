"""SGE: reference compatibility and the fixed defects."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from napari_sgdc.model.sge import SGE, SOBEL_X, SOBEL_Y

REFERENCE_PREFIXES = {"s4_proj", "s1_proj", "refine4", "refine1", "fuse", "out_edge_map", "out_guidance"}


def _full_sobel_magnitude(x):
    """The reference's ch×ch Sobel (every output channel sees every input channel), no eps."""
    channels = x.shape[1]
    kx = torch.tensor(SOBEL_X, dtype=x.dtype).expand(channels, channels, 3, 3)
    ky = torch.tensor(SOBEL_Y, dtype=x.dtype).expand(channels, channels, 3, 3)
    return torch.sqrt(F.conv2d(x, kx, padding=1) ** 2 + F.conv2d(x, ky, padding=1) ** 2)


def test_sobel_kernels_are_buffers_not_parameters():
    sge = SGE(s4_in=32, s1_in=16, mid=16, guide_ch=8, bottleneck=16)
    assert not any("sobel" in name for name, _ in sge.named_parameters())
    assert "sobel_kernels" in dict(sge.named_buffers())
    assert not any("sobel" in key for key in sge.state_dict())


def test_state_dict_keys_match_reference_layout():
    sge = SGE(s4_in=32, s1_in=16, mid=16, guide_ch=8, bottleneck=16)
    assert {key.split(".")[0] for key in sge.state_dict()} == REFERENCE_PREFIXES
    assert "refine4.refine.7.running_var" in sge.state_dict()
    assert "fuse.conv.weight" in sge.state_dict()


def test_reference_state_dict_with_sobel_weights_loads():
    sge = SGE(s4_in=32, s1_in=16, mid=16, guide_ch=8, bottleneck=16)
    reference_state = dict(sge.state_dict())
    reference_state["sobel_x.weight"] = torch.zeros(16, 16, 3, 3)
    reference_state["sobel_y.weight"] = torch.zeros(16, 16, 3, 3)
    result = sge.load_reference_state_dict(reference_state)
    assert not result.missing_keys and not result.unexpected_keys


def test_shared_sobel_equals_full_channel_by_channel_sobel():
    sge = SGE(s4_in=8, s1_in=8, mid=8, guide_ch=4, bottleneck=8, eps=0.0).double()
    x = torch.randn(2, 8, 7, 9, dtype=torch.float64)
    shared = sge.gradient_magnitude(x).expand(-1, 8, -1, -1)
    assert (shared - _full_sobel_magnitude(x)).abs().max() < 1e-10


def test_depthwise_sobel_is_per_channel():
    sge = SGE(s4_in=8, s1_in=8, mid=8, guide_ch=4, bottleneck=8, sobel="depthwise", eps=0.0).double()
    x = torch.zeros(1, 2, 5, 5, dtype=torch.float64)
    x[0, 0, :, 3:] = 1.0  # vertical edge in channel 0 only
    magnitude = sge.gradient_magnitude(x)
    assert magnitude.shape == (1, 2, 5, 5)
    assert magnitude[0, 0].max() > 0 and magnitude[0, 1].abs().max() == 0


def test_gradients_are_finite_on_constant_input():
    sge = SGE(s4_in=8, s1_in=8, mid=8, guide_ch=4, bottleneck=8)
    x4 = torch.ones(1, 8, 2, 2, requires_grad=True)
    x1 = torch.ones(1, 8, 16, 16, requires_grad=True)
    edge, guidance = sge(x4, x1)
    (edge.sum() + guidance.sum()).backward()
    assert torch.isfinite(x4.grad).all() and torch.isfinite(x1.grad).all()


def test_reference_sqrt_without_eps_gives_nan_gradient_on_constant_input():
    # documents why eps is needed: d sqrt(u)/du at u = 0 is infinite → NaN through 0 * inf
    x = torch.ones(1, 2, 4, 4, requires_grad=True)
    _full_sobel_magnitude(x).sum().backward()
    assert torch.isnan(x.grad).any()


def test_output_shapes():
    sge = SGE(s4_in=32, s1_in=16, mid=16, guide_ch=8, bottleneck=16)
    edge, guidance = sge(torch.randn(2, 32, 2, 3), torch.randn(2, 16, 16, 24))
    assert edge.shape == (2, 1, 16, 24) and guidance.shape == (2, 8, 16, 24)
