"""Structural Guidance Extractor (SGE), reference-compatible.

Projects a deep (stride 32) and a shallow (stride 4) feature map, gates each by the
sigmoid of its Sobel gradient magnitude, refines, fuses at stride 4, and returns
``(edge_logits, guidance)``.

Deviations from the released reference (each has a test):
- the Sobel kernels are non-persistent buffers, not (frozen) Parameters, so optimisers
  and state_dicts never see them; a reference state_dict still loads (`load_reference_state_dict`);
- the gradient magnitude is ``sqrt(gx² + gy² + eps)``: finite gradients on flat input;
- the reference convolves with a full ch×ch Sobel whose every output channel is the Sobel
  of the channel sum. ``sobel="shared"`` (default) computes exactly that cheaply: channel
  sum, one 1-channel Sobel, broadcast. ``sobel="depthwise"`` is the per-channel variant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SOBEL_X = ((1.0, 0.0, -1.0), (2.0, 0.0, -2.0), (1.0, 0.0, -1.0))
SOBEL_Y = ((1.0, 2.0, 1.0), (0.0, 0.0, 0.0), (-1.0, -2.0, -1.0))


class ConvBNReLU(nn.Sequential):
    """Conv → BatchNorm → ReLU (state_dict keys ``conv``, ``bn`` as in the reference)."""

    def __init__(self, in_chan: int, out_chan: int, ks: int = 3, stride: int = 1,
                 padding: int = 1, bias: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(in_chan, out_chan, ks, stride=stride, padding=padding, bias=bias)
        self.bn = nn.BatchNorm2d(out_chan)
        self.relu = nn.ReLU(inplace=True)


class BottleneckRefiner(nn.Module):
    """Residual 1×1 → 3×3 → 1×1 bottleneck (keys ``refine.0`` … ``refine.7``)."""

    def __init__(self, channels: int, reduction_ratio: int = 4):
        super().__init__()
        reduced = max(channels // reduction_ratio, 1)
        self.refine = nn.Sequential(
            nn.Conv2d(channels, reduced, 1, bias=False),
            nn.BatchNorm2d(reduced),
            nn.ReLU(inplace=True),
            nn.Conv2d(reduced, reduced, 3, padding=1, bias=False),
            nn.BatchNorm2d(reduced),
            nn.ReLU(inplace=True),
            nn.Conv2d(reduced, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(x + self.refine(x))


class SGE(nn.Module):
    """Structural Guidance Extractor.

    Args:
        s4_in: channels of the deep (stride 32) features (the reference's "s4").
        s1_in: channels of the shallow (stride 4) features (the reference's "s1").
        mid: width of the fused map.
        guide_ch: channels of the guidance output.
        bottleneck: width of both projections.
        reduction_ratio: bottleneck reduction of the refiners.
        sobel: ``shared`` (the reference's mathematics, cheap) or ``depthwise``.
        eps: added under the square root of the gradient magnitude.
    """

    def __init__(self, s4_in: int = 2048, s1_in: int = 256, mid: int = 256, guide_ch: int = 16,
                 bottleneck: int = 256, reduction_ratio: int = 4, sobel: str = "shared",
                 eps: float = 1e-6):
        super().__init__()
        if sobel not in ("shared", "depthwise"):
            raise ValueError(f"sobel must be 'shared' or 'depthwise', got {sobel!r}")
        self.sobel = sobel
        self.eps = eps
        self.s4_proj = ConvBNReLU(s4_in, bottleneck, ks=1, padding=0)
        self.s1_proj = ConvBNReLU(s1_in, bottleneck, ks=1, padding=0)
        self.refine4 = BottleneckRefiner(bottleneck, reduction_ratio)
        self.refine1 = BottleneckRefiner(bottleneck, reduction_ratio)
        self.fuse = ConvBNReLU(bottleneck * 2, mid)
        self.out_edge_map = nn.Conv2d(mid, 1, 1, bias=False)
        self.out_guidance = nn.Conv2d(mid, guide_ch, 1, bias=False)
        sobel_kernels = torch.tensor([SOBEL_X, SOBEL_Y]).unsqueeze(1)  # (2, 1, 3, 3)
        self.register_buffer("sobel_kernels", sobel_kernels, persistent=False)

    def gradient_magnitude(self, x: Tensor) -> Tensor:
        """Sobel gradient magnitude: (B, 1, H, W) for ``shared``, (B, C, H, W) for ``depthwise``."""
        kernels = self.sobel_kernels.to(x.dtype)
        if self.sobel == "shared":
            gradients = F.conv2d(x.sum(dim=1, keepdim=True), kernels, padding=1)  # (B, 2, H, W)
            gx, gy = gradients[:, :1], gradients[:, 1:]  # (B, 1, H, W) each
        else:
            channels = x.shape[1]
            gx = F.conv2d(x, kernels[:1].repeat(channels, 1, 1, 1), padding=1, groups=channels)
            gy = F.conv2d(x, kernels[1:].repeat(channels, 1, 1, 1), padding=1, groups=channels)
        return torch.sqrt(gx * gx + gy * gy + self.eps)

    def _gate_and_refine(self, x: Tensor, refiner: nn.Module) -> Tensor:
        return refiner(torch.sigmoid(self.gradient_magnitude(x)) * x)  # (B, C, H, W)

    def forward(self, x4: Tensor, x1: Tensor) -> tuple[Tensor, Tensor]:
        """Args: x4 deep features (B, s4_in, H/32, W/32); x1 shallow (B, s1_in, H/4, W/4).

        Returns:
            edge logits (B, 1, H/4, W/4) and guidance (B, guide_ch, H/4, W/4).
        """
        deep = self._gate_and_refine(self.s4_proj(x4), self.refine4)  # (B, bottleneck, H/32, W/32)
        shallow = self._gate_and_refine(self.s1_proj(x1), self.refine1)  # (B, bottleneck, H/4, W/4)
        deep = F.interpolate(deep, size=shallow.shape[2:], mode="bilinear", align_corners=False)
        fused = self.fuse(torch.cat([deep, shallow], dim=1))  # (B, mid, H/4, W/4)
        return self.out_edge_map(fused), self.out_guidance(fused)

    def load_reference_state_dict(self, state_dict: dict[str, Tensor], strict: bool = True):
        """Loads a state_dict of the released reference SGE (drops its Sobel weights)."""
        kept = {k: v for k, v in state_dict.items() if not k.startswith(("sobel_x.", "sobel_y."))}
        return self.load_state_dict(kept, strict=strict)
