"""Guided decoder blocks: SGDC, its pooling-based baseline, and a static block.

All three share one interface, ``block(x, guidance, return_gates=False)``, and one
skeleton (a gated depthwise path plus a dynamic k×k path, LayerScale residuals, an MLP),
so ``ModelConfig.block`` switches between them for ablations:

- `SGDC`: per-pixel kernels and gates generated from the features plus the SGE guidance
  (the paper's block; reference-compatible constructor and state_dict keys).
- `PoolingDynamicConv`: the same block, but its kernels come from average-pooled context
  (adaptive average pooling to a small grid, as in OverLoCK's ContMix) and no guidance.
- `StaticBlock`: the same skeleton with a static depthwise k×k convolution.

The dynamic aggregation never materialises ``F.unfold`` (k²·C·H·W values); see
`dynamic_aggregate`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) tensor (eps 1e-6, as the reference)."""

    def __init__(self, dim: int):
        super().__init__(dim, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)  # (B, C, H, W)


class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval mode or when p = 0)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype) >= self.p
        return x * keep / (1.0 - self.p)


# --------------------------------------------------------------------------------------
# Dynamic aggregation: out[b, c, y, x] = sum_t kernel[b, head(c), t, y, x] * x[b, c, y+i_t-p, x+j_t-p]
# --------------------------------------------------------------------------------------


def _shift_and_sum(x: Tensor, kernel: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The forward loop of `_ShiftAndSum`: (output (B, C, H, W), zero-padded x (B, h, C/h, H+2p, W+2p))."""
    batch, channels, height, width = x.shape
    heads = kernel.shape[1]
    pad = k // 2
    x_padded = F.pad(x, (pad, pad, pad, pad)).reshape(
        batch, heads, channels // heads, height + 2 * pad, width + 2 * pad
    )  # (B, h, C/h, H+2p, W+2p)
    out = x.new_zeros(batch, heads, channels // heads, height, width)  # (B, h, C/h, H, W)
    for tap in range(k * k):
        i, j = divmod(tap, k)
        # kernel[:, :, tap:tap+1]: (B, h, 1, H, W), broadcast over the channels of a head
        out.addcmul_(x_padded[..., i : i + height, j : j + width], kernel[:, :, tap : tap + 1])
    return out.reshape(batch, channels, height, width), x_padded


class _ShiftAndSum(torch.autograd.Function):
    """Exact per-pixel k×k aggregation as a sum of k² shifted, weighted copies.

    Memory is O(C·H·W) instead of unfold's O(k²·C·H·W); the backward pass is written
    by hand with the same shift-and-sum loop so autograd stores nothing per tap.
    """

    @staticmethod
    def forward(ctx, x: Tensor, kernel: Tensor, k: int) -> Tensor:
        out, x_padded = _shift_and_sum(x, kernel, k)
        ctx.save_for_backward(x_padded, kernel)
        ctx.k = k
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x_padded, kernel = ctx.saved_tensors
        k = ctx.k
        pad = k // 2
        batch, heads, head_dim, padded_h, padded_w = x_padded.shape
        height, width = padded_h - 2 * pad, padded_w - 2 * pad
        grad_out = grad_out.reshape(batch, heads, head_dim, height, width).contiguous()
        grad_x = grad_kernel = None
        if ctx.needs_input_grad[0]:
            grad_x_padded = torch.zeros_like(x_padded)  # (B, h, C/h, H+2p, W+2p)
        if ctx.needs_input_grad[1]:
            grad_kernel = torch.empty_like(kernel)  # (B, h, k*k, H, W)
            product = torch.empty_like(grad_out)  # (B, h, C/h, H, W), reused per tap
        for tap in range(k * k):
            i, j = divmod(tap, k)
            if ctx.needs_input_grad[0]:
                grad_x_padded[..., i : i + height, j : j + width].addcmul_(
                    grad_out, kernel[:, :, tap : tap + 1]
                )
            if ctx.needs_input_grad[1]:
                torch.mul(grad_out, x_padded[..., i : i + height, j : j + width], out=product)
                grad_kernel[:, :, tap] = product.sum(dim=2)  # (B, h, H, W)
        if ctx.needs_input_grad[0]:
            grad_x = grad_x_padded[..., pad : pad + height, pad : pad + width].reshape(
                batch, heads * head_dim, height, width
            )
        return grad_x, grad_kernel, None


def dynamic_aggregate(x: Tensor, kernel: Tensor, kernel_size: int) -> Tensor:
    """Applies per-pixel, per-head k×k kernels to `x` with zero padding.

    Args:
        x: features, (B, C, H, W); C divisible by the number of heads.
        kernel: per-pixel tap weights, (B, heads, k*k, H, W), taps in row-major order
            (tap t = i*k + j covers offset (i - k//2, j - k//2)), as ``F.unfold`` orders them.
        kernel_size: k.

    Returns:
        (B, C, H, W): identical to the unfold formulation up to rounding.
    """
    kernel = kernel.to(x.dtype)
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():  # export: plain ops, no autograd.Function
        return _shift_and_sum(x, kernel, kernel_size)[0]
    return _ShiftAndSum.apply(x.contiguous(), kernel.contiguous(), kernel_size)


def unfold_aggregate_reference(x: Tensor, kernel: Tensor, kernel_size: int) -> Tensor:
    """The reference formulation (materialises unfold); for tests and benchmarks only."""
    batch, channels, height, width = x.shape
    heads = kernel.shape[1]
    taps = kernel_size * kernel_size
    patches = F.unfold(x, kernel_size=kernel_size, padding=kernel_size // 2)  # (B, C*k*k, H*W)
    patches = patches.view(batch, heads, channels // heads, taps, height * width)
    weights = kernel.reshape(batch, heads, 1, taps, height * width)
    out = (patches * weights).sum(dim=3)  # (B, h, C/h, H*W)
    return out.reshape(batch, channels, height, width)


# --------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------


class _DynamicBlockBase(nn.Module):
    """Skeleton shared by all blocks: gated depthwise path + k×k path, then an MLP."""

    def __init__(self, dim: int, num_heads: int, kernel_size: int, mlp_ratio: float,
                 drop_path: float, ls_init: float):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.h = num_heads
        self.k = kernel_size
        self.k_area = kernel_size * kernel_size
        self.norm1 = LayerNorm2d(dim)
        self.norm2 = LayerNorm2d(dim)
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.GELU(), nn.Conv2d(hidden, dim, 1))
        self.drop_path = DropPath(drop_path)
        self.ls1 = nn.Parameter(ls_init * torch.ones(dim))
        self.ls2 = nn.Parameter(ls_init * torch.ones(dim))

    def _finish(self, x: Tensor, mixed: Tensor) -> Tensor:
        x = x + self.drop_path(self.ls1.view(1, -1, 1, 1) * mixed)
        return x + self.drop_path(self.ls2.view(1, -1, 1, 1) * self.mlp(self.norm2(x)))

    def _dynamic_mix(self, x: Tensor, attn1: Tensor, attn2: Tensor, kernel_logits: Tensor,
                     return_gates: bool):
        """Shared math of the dynamic blocks, given gate and kernel logits."""
        batch, _, height, width = x.shape
        gate1 = torch.sigmoid(attn1)  # (B, C, H, W)
        gate2 = torch.sigmoid(attn2)  # (B, C, H, W)
        depthwise_path = self.dwconv(x * gate1)  # (B, C, H, W)
        kernel = kernel_logits.reshape(batch, self.h, self.k_area, height, width)
        kernel = torch.softmax(kernel, dim=2)  # (B, h, k*k, H, W)
        dynamic_path = dynamic_aggregate(self.norm1(x), kernel, self.k) * gate2  # (B, C, H, W)
        out = self._finish(x, depthwise_path + dynamic_path)
        gates = {"gate1": gate1, "gate2": gate2, "kernel": kernel} if return_gates else None
        return out, gates


class SGDC(_DynamicBlockBase):
    """Structure-Guided Dynamic Convolution (reference-compatible).

    Kernels (softmax over k² taps, one kernel per head) and two sigmoid gates are
    generated per pixel by a 1×1 conv of ``x + proj_guidance(guidance)``.

    Args:
        dim: channels of x.
        guide_ch: channels of the SGE guidance.
        num_heads: kernel heads h.
        kernel_size: k.
        mlp_ratio: hidden width of the MLP relative to dim.
        drop_path: stochastic depth rate.
        ls_init: initial LayerScale value.
    """

    def __init__(self, dim: int, guide_ch: int = 16, num_heads: int = 4, kernel_size: int = 7,
                 mlp_ratio: float = 4.0, drop_path: float = 0.0, ls_init: float = 1e-6):
        super().__init__(dim, num_heads, kernel_size, mlp_ratio, drop_path, ls_init)
        self.proj_guidance = nn.Conv2d(guide_ch, dim, 1)
        self.attn = nn.Conv2d(dim, dim * 2 + self.h * self.k_area, 1)

    def forward(self, x: Tensor, g: Tensor, return_gates: bool = False):
        """Args: x (B, C, H, W); g guidance (B, G, h', w'), resized to x.

        Returns:
            (B, C, H, W), or ``(out, gates)`` when `return_gates`.
        """
        g = F.interpolate(g, size=x.shape[2:], mode="bilinear", align_corners=False)
        logits = self.attn(x + self.proj_guidance(g))  # (B, 2C + h*k*k, H, W)
        attn1, attn2, kernel_logits = torch.split(logits, [self.dim, self.dim, self.h * self.k_area], 1)
        out, gates = self._dynamic_mix(x, attn1, attn2, kernel_logits, return_gates)
        return (out, gates) if return_gates else out


class PoolingDynamicConv(_DynamicBlockBase):
    """Pooling-based dynamic convolution: the baseline SGDC is compared against.

    The gates come from x alone; the kernel of each pixel comes from its affinity to
    a grid of average-pooled context tokens (ContMix-style): per head,
    ``softmax_taps(W_taps · softmax_tokens(q(x)ᵀ k(pool(x)) / √d))``. The guidance
    argument is accepted and ignored, so the block is interchangeable with `SGDC`.
    """

    def __init__(self, dim: int, guide_ch: int = 16, num_heads: int = 4, kernel_size: int = 7,
                 mlp_ratio: float = 4.0, drop_path: float = 0.0, ls_init: float = 1e-6,
                 pool_grid: int = 4):
        super().__init__(dim, num_heads, kernel_size, mlp_ratio, drop_path, ls_init)
        self.pool_grid = pool_grid
        self.attn = nn.Conv2d(dim, dim * 2, 1)
        self.query = nn.Conv2d(dim, dim, 1)
        self.context_key = nn.Conv2d(dim, dim, 1)
        self.tokens_to_taps = nn.Linear(pool_grid * pool_grid, self.k_area)

    def forward(self, x: Tensor, g: Tensor | None = None, return_gates: bool = False):
        batch, _, height, width = x.shape
        head_dim = self.dim // self.h
        attn1, attn2 = torch.chunk(self.attn(x), 2, dim=1)  # 2 × (B, C, H, W)
        query = self.query(x).reshape(batch, self.h, head_dim, height * width)  # (B, h, d, HW)
        context = F.adaptive_avg_pool2d(x, self.pool_grid)  # (B, C, G, G)
        key = self.context_key(context).reshape(batch, self.h, head_dim, -1)  # (B, h, d, G*G)
        affinity = torch.einsum("bhdn,bhdg->bhng", query, key) / head_dim**0.5  # (B, h, HW, G*G)
        kernel_logits = self.tokens_to_taps(affinity.softmax(dim=-1))  # (B, h, HW, k*k)
        kernel_logits = kernel_logits.permute(0, 1, 3, 2)  # (B, h, k*k, HW)
        out, gates = self._dynamic_mix(x, attn1, attn2, kernel_logits, return_gates)
        return (out, gates) if return_gates else out


class StaticBlock(_DynamicBlockBase):
    """The same skeleton with a static depthwise k×k convolution and no gates."""

    def __init__(self, dim: int, guide_ch: int = 16, num_heads: int = 4, kernel_size: int = 7,
                 mlp_ratio: float = 4.0, drop_path: float = 0.0, ls_init: float = 1e-6):
        super().__init__(dim, num_heads, kernel_size, mlp_ratio, drop_path, ls_init)
        self.static_conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def forward(self, x: Tensor, g: Tensor | None = None, return_gates: bool = False):
        out = self._finish(x, self.dwconv(x) + self.static_conv(self.norm1(x)))
        return (out, {}) if return_gates else out


BLOCK_TYPES: dict[str, type[_DynamicBlockBase]] = {
    "sgdc": SGDC,
    "pooling": PoolingDynamicConv,
    "static": StaticBlock,
}
