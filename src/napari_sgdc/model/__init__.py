"""The SGDC model library: encoders, SGE, guided blocks and the composed segmenter."""

from __future__ import annotations

from ..config import ModelConfig
from .encoders import EfficientNetLite0, MiniEncoder, ResNet50, build_encoder
from .registry import BLOCK_TYPES, ENCODERS
from .segmenter import SGDCSegmenter
from .sge import SGE
from .sgdc import SGDC, PoolingDynamicConv, StaticBlock, dynamic_aggregate

__all__ = ["ModelConfig", "build_model", "SGDCSegmenter", "SGE", "SGDC", "PoolingDynamicConv",
           "StaticBlock", "dynamic_aggregate", "EfficientNetLite0", "ResNet50", "MiniEncoder",
           "build_encoder", "tiny_config", "ENCODERS", "BLOCK_TYPES"]


def build_model(cfg: ModelConfig | None = None) -> SGDCSegmenter:
    """Builds an `SGDCSegmenter` from `cfg` (the default config if None)."""
    return SGDCSegmenter(cfg or ModelConfig())


def tiny_config(**overrides) -> ModelConfig:
    """A small random-init configuration for tests and quick experiments."""
    values = dict(encoder="mini", pretrained=False, decoder_channels=(32, 16, 16, 8, 8),
                  sge_channels=16, guide_channels=8, heads=4)
    values.update(overrides)
    return ModelConfig(**values)
