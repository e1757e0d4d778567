"""SGDCSegmenter: encoder → SGE → guided U-Net decoder → mask and edge heads.

    image (B, 3, H, W) in [0, 1] → normalise (cfg.norm_mean / norm_std, 0..255 units)
    encoder → f2, f4, f8, f16, f32                       (strides 2, 4, 8, 16, 32)
    SGE(f32, f4) → edge_s4 (B, 1, H/4, W/4), guidance (B, G, H/4, W/4)
    decoder, from f32 up: at each stride s in 16, 8, 4, 2, 1
        d = ConvBNReLU(cat(up(d), skip_s))               (no skip at stride 1)
        d = block(d, guidance)                           (strides 16, 8 and 4 only)
    mask  = mask_head(d)                                 (B, n_classes, H, W)
    edge  = up(edge_s4) + edge_head(d)                   (B, 1, H, W)
    instance maps (cfg.instance_map), instance_head = ConvBNReLU + 3×3 conv on d:
        distance = instance_head(d)                      (B, 1, H, W) logits of the normalised distance
        hover    = instance_head(d)                      (B, 2, H, W) x and y offsets to the centre
    nucleus types (cfg.type_names, T of them), type_head = ConvBNReLU + 1×1 conv on d4, the
    decoder's SGDC-guided stride-4 features (a type is a property of the whole nucleus, so a
    quarter-resolution map with the guided block's context serves; it is upsampled):
        type     = up(type_head(d4))                     (B, T, H, W) type logits

The edge output is the SGE edge map, upsampled and corrected at full resolution by a
3×3 head on the last decoder features; for instance models it is the boundary that
splits touching nuclei.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from .encoders import build_encoder
from .sge import SGE, ConvBNReLU
from .sgdc import BLOCK_TYPES, PoolingDynamicConv

GUIDED_STRIDES = (16, 8, 4)
DECODER_STRIDES = (16, 8, 4, 2, 1)
LAYER_SCALE_INIT = 1e-2
TYPE_STRIDE = 4  # the decoder stride whose features feed the type head


class DecoderStage(nn.Module):
    """Upsample, concatenate the skip, fuse with a 3×3 ConvBNReLU, then an optional guided block."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, block: nn.Module | None):
        super().__init__()
        self.fuse = ConvBNReLU(in_ch + skip_ch, out_ch)
        self.block = block

    def forward(self, x: Tensor, skip: Tensor | None, size: tuple[int, int], guidance: Tensor,
                return_gates: bool):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        x = self.fuse(x)  # (B, out_ch, h, w)
        if self.block is None:
            return x, None
        if return_gates:
            return self.block(x, guidance, return_gates=True)
        return self.block(x, guidance), None


class SGDCSegmenter(nn.Module):
    """The full network; build it with `napari_sgdc.model.build_model`."""

    size_multiple = 32

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.metadata: dict = {}  # the checkpoint's metadata (provenance, metrics) once loaded
        self.register_buffer("norm_mean", torch.tensor(cfg.norm_mean).view(1, 3, 1, 1) / 255.0)
        self.register_buffer("norm_std", torch.tensor(cfg.norm_std).view(1, 3, 1, 1) / 255.0)
        self.encoder = build_encoder(cfg.encoder, cfg.pretrained)
        enc_ch = self.encoder.out_channels  # strides 2, 4, 8, 16, 32
        self.sge = SGE(s4_in=enc_ch[4], s1_in=enc_ch[1], mid=cfg.sge_channels, guide_ch=cfg.guide_channels,
                       bottleneck=cfg.sge_channels, reduction_ratio=4)
        skip_channels = (enc_ch[3], enc_ch[2], enc_ch[1], enc_ch[0], 0)
        in_ch, stages = enc_ch[4], []
        for stride, skip_ch, out_ch in zip(DECODER_STRIDES, skip_channels, cfg.decoder_channels):
            stages.append(DecoderStage(in_ch, skip_ch, out_ch, self._make_block(out_ch) if stride in GUIDED_STRIDES else None))
            in_ch = out_ch
        self.decoder = nn.ModuleList(stages)
        self.mask_head = nn.Conv2d(in_ch, cfg.n_classes, 3, padding=1)
        self.edge_head = nn.Conv2d(in_ch, 1, 3, padding=1)
        if cfg.instance_channels:  # regression head of ModelConfig.instance_map (distance or hover)
            self.instance_head = nn.Sequential(ConvBNReLU(in_ch, in_ch),
                                               nn.Conv2d(in_ch, cfg.instance_channels, 3, padding=1))
        if cfg.has_types:  # nucleus types, from the guided stride-4 features
            width = cfg.decoder_channels[DECODER_STRIDES.index(TYPE_STRIDE)]
            self.type_head = nn.Sequential(ConvBNReLU(width, width), nn.Conv2d(width, len(cfg.type_names), 1))

    def _make_block(self, dim: int) -> nn.Module:
        cfg = self.config
        kwargs = dict(guide_ch=cfg.guide_channels, num_heads=cfg.heads, kernel_size=cfg.kernel_size,
                      ls_init=LAYER_SCALE_INIT)
        if BLOCK_TYPES[cfg.block] is PoolingDynamicConv:
            kwargs["pool_grid"] = cfg.pool_grid
        return BLOCK_TYPES[cfg.block](dim, **kwargs)

    def param_groups(self, lr_encoder: float, lr_decoder: float) -> list[dict]:
        """Optimiser parameter groups: the encoder at `lr_encoder` (left out when it has no
        trainable parameter), everything else at `lr_decoder`; frozen parameters are skipped."""
        encoder_ids = {id(p) for p in self.encoder.parameters()}
        encoder = [p for p in self.encoder.parameters() if p.requires_grad]
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in encoder_ids]
        groups = [{"params": rest, "lr": lr_decoder, "name": "decoder"}]
        if encoder:
            groups.insert(0, {"params": encoder, "lr": lr_encoder, "name": "encoder"})
        return groups

    def forward(self, x: Tensor, return_gates: bool = False) -> dict:
        """Args: x (B, 3, H, W) RGB in [0, 1]; H and W multiples of 32.

        Returns:
            {"mask": (B, n_classes, H, W) logits, "edge": (B, 1, H, W) logits}, plus
            "distance" (B, 1, H, W) logits or "hover" (B, 2, H, W) values for those
            ``config.instance_map`` settings, "type" (B, T, H, W) logits for a model with
            ``config.type_names``, and, when
            `return_gates`, "gates": one dict per guided block (deepest first) with
            "name", "stride", "gate1", "gate2" (B, C, h, w) and "kernel" (B, heads, k*k, h, w).
        """
        height, width = x.shape[-2:]
        if height % self.size_multiple or width % self.size_multiple:
            raise ValueError(f"input height and width must be multiples of {self.size_multiple}, got {height}×{width}")
        x = (x - self.norm_mean) / self.norm_std
        f2, f4, f8, f16, f32 = self.encoder(x)
        edge_s4, guidance = self.sge(f32, f4)  # (B, 1, H/4, W/4), (B, G, H/4, W/4)
        decoded, gates, type_features = f32, [], None
        for stage, stride, skip in zip(self.decoder, DECODER_STRIDES, (f16, f8, f4, f2, None)):
            size = (height // stride, width // stride)
            decoded, block_gates = stage(decoded, skip, size, guidance, return_gates)
            if stride == TYPE_STRIDE:
                type_features = decoded  # (B, C4, H/4, W/4)
            if block_gates is not None:
                gates.append({"name": f"{self.config.block}@s{stride}", "stride": stride, **block_gates})
        mask_logits = self.mask_head(decoded)  # (B, n_classes, H, W)
        edge_logits = F.interpolate(edge_s4, size=(height, width), mode="bilinear", align_corners=False)
        edge_logits = edge_logits + self.edge_head(decoded)  # (B, 1, H, W)
        out = {"mask": mask_logits, "edge": edge_logits}
        if self.config.instance_channels:
            out[self.config.instance_map] = self.instance_head(decoded)  # (B, 1 or 2, H, W)
        if self.config.has_types:
            type_logits = self.type_head(type_features)  # (B, T, H/4, W/4)
            out["type"] = F.interpolate(type_logits, size=(height, width), mode="bilinear", align_corners=False)
        if return_gates:
            out["gates"] = gates
        return out
