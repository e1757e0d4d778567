"""SGDC block: exact shift-and-sum aggregation, reference compatibility, gates, ablation blocks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from napari_sgdc.model.sgdc import (
    SGDC, PoolingDynamicConv, StaticBlock, dynamic_aggregate, unfold_aggregate_reference,
)

REFERENCE_KEYS = {"proj_guidance", "attn", "norm1", "norm2", "dwconv", "mlp.0", "mlp.2", "ls1", "ls2"}


def _random_pair(batch=2, channels=8, heads=4, k=5, height=9, width=11, dtype=torch.float64):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, channels, height, width, dtype=dtype, generator=generator)
    kernel = torch.randn(batch, heads, k * k, height, width, dtype=dtype, generator=generator).softmax(2)
    return x.requires_grad_(), kernel.requires_grad_()


def test_shift_and_sum_matches_unfold_forward_and_backward():
    x, kernel = _random_pair()
    ours = dynamic_aggregate(x, kernel, 5)
    reference = unfold_aggregate_reference(x, kernel, 5)
    assert (ours - reference).abs().max() < 1e-10
    grad_out = torch.randn_like(ours)
    grads_ours = torch.autograd.grad(ours, (x, kernel), grad_out)
    grads_ref = torch.autograd.grad(reference, (x, kernel), grad_out)
    for ours_grad, ref_grad in zip(grads_ours, grads_ref):
        assert (ours_grad - ref_grad).abs().max() < 1e-10


def test_shift_and_sum_passes_gradcheck():
    x, kernel = _random_pair(batch=1, channels=4, heads=2, k=3, height=5, width=6)
    assert torch.autograd.gradcheck(lambda a, b: dynamic_aggregate(a, b, 3), (x, kernel))


def test_transposed_taps_are_detected():
    x, kernel = _random_pair(k=3)
    transposed = kernel.reshape(2, 4, 3, 3, 9, 11).transpose(2, 3).reshape(2, 4, 9, 9, 11)
    difference = (dynamic_aggregate(x, transposed, 3) - unfold_aggregate_reference(x, kernel, 3)).abs().max()
    assert difference > 1e-3


def test_single_tap_kernel_shifts_the_image():
    # all weight on tap (0, 0) → out[y, x] = in[y-1, x-1] with zero padding
    x = torch.arange(16.0).view(1, 1, 4, 4)
    kernel = torch.zeros(1, 1, 9, 4, 4)
    kernel[:, :, 0] = 1.0
    out = dynamic_aggregate(x, kernel, 3)
    expected = F.pad(x, (1, 0, 1, 0))[..., :4, :4]
    assert torch.equal(out, expected)


def test_sgdc_has_reference_state_dict_keys():
    block = SGDC(dim=32, guide_ch=16, num_heads=4, kernel_size=7)
    prefixes = {key.rsplit(".", 1)[0] if key.count(".") else key for key in block.state_dict()}
    assert prefixes == REFERENCE_KEYS


def _reference_sgdc_forward(block: SGDC, x, g):
    """The released SGDC math, with unfold, written with torch ops (its einops pattern crashes)."""
    g = F.interpolate(g, size=x.shape[2:], mode="bilinear", align_corners=False)
    w = block.attn(x + block.proj_guidance(g))
    attn1, attn2, kernel = torch.split(w, [block.dim, block.dim, block.h * block.k_area], dim=1)
    x1 = block.dwconv(x * torch.sigmoid(attn1))
    kernel = kernel.reshape(x.shape[0], block.h, block.k_area, *x.shape[2:]).softmax(2)
    x2 = unfold_aggregate_reference(block.norm1(x), kernel, block.k) * torch.sigmoid(attn2)
    out = x + block.ls1.view(1, -1, 1, 1) * (x1 + x2)
    return out + block.ls2.view(1, -1, 1, 1) * block.mlp(block.norm2(out))


def test_sgdc_block_matches_reference_math_in_float64():
    torch.manual_seed(0)
    block = SGDC(dim=16, guide_ch=8, num_heads=4, kernel_size=5, ls_init=0.5).double()
    x = torch.randn(2, 16, 12, 10, dtype=torch.float64)
    g = torch.randn(2, 8, 6, 5, dtype=torch.float64)
    assert (block(x, g) - _reference_sgdc_forward(block, x, g)).abs().max() < 1e-10


def test_gates_are_returned_only_on_request():
    block = SGDC(dim=16, guide_ch=8, num_heads=4, kernel_size=3).eval()
    x, g = torch.randn(1, 16, 8, 8), torch.randn(1, 8, 8, 8)
    plain = block(x, g)
    out, gates = block(x, g, return_gates=True)
    assert torch.is_tensor(plain) and torch.equal(plain, out)
    assert gates["gate1"].shape == (1, 16, 8, 8) and gates["gate2"].shape == (1, 16, 8, 8)
    assert gates["kernel"].shape == (1, 4, 9, 8, 8)
    assert torch.allclose(gates["kernel"].sum(2), torch.ones(1, 4, 8, 8))
    assert 0 < gates["gate1"].min() and gates["gate1"].max() < 1


def test_sgdc_output_depends_on_guidance():
    torch.manual_seed(0)
    block = SGDC(dim=16, guide_ch=8, num_heads=4, kernel_size=3, ls_init=1.0).eval()
    x = torch.randn(1, 16, 8, 8)
    assert not torch.allclose(block(x, torch.zeros(1, 8, 8, 8)), block(x, torch.randn(1, 8, 8, 8)))


@pytest.mark.parametrize("block_type", [SGDC, PoolingDynamicConv, StaticBlock])
def test_blocks_share_one_interface(block_type):
    torch.manual_seed(0)
    block = block_type(dim=16, guide_ch=8, num_heads=4, kernel_size=5, ls_init=1.0)
    x, g = torch.randn(2, 16, 10, 12), torch.randn(2, 8, 5, 6)
    out = block(x, g)
    assert out.shape == x.shape
    out.sum().backward()
    assert all(p.grad is not None for p in block.parameters() if p.requires_grad)


def test_pooling_block_ignores_guidance_and_uses_pooled_context():
    torch.manual_seed(0)
    block = PoolingDynamicConv(dim=16, guide_ch=8, num_heads=4, kernel_size=3, ls_init=1.0).eval()
    x = torch.randn(1, 16, 8, 8)
    assert torch.equal(block(x, torch.zeros(1, 8, 8, 8)), block(x, torch.randn(1, 8, 8, 8)))
    _, gates = block(x, None, return_gates=True)
    assert gates["kernel"].shape == (1, 4, 9, 8, 8)
