"""The registries of encoders and guided decoder blocks, by the names a `ModelConfig` uses."""

from .encoders import ENCODERS
from .sgdc import BLOCK_TYPES

__all__ = ["ENCODERS", "BLOCK_TYPES"]
