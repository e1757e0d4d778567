"""The registries of encoders and guided decoder blocks, by the names a `ModelConfig` uses.

`napari_sgdc.config` owns the names (it validates configs without importing torch); this
module owns the classes behind them, and refuses to import if the two disagree.
"""

from ..config import BLOCK_NAMES, ENCODER_NAMES
from .encoders import ENCODERS
from .sgdc import BLOCK_TYPES

__all__ = ["ENCODERS", "BLOCK_TYPES"]

if tuple(ENCODERS) != ENCODER_NAMES or tuple(BLOCK_TYPES) != BLOCK_NAMES:  # a new encoder or block is named in both
    raise ImportError(f"napari_sgdc.config names {ENCODER_NAMES} / {BLOCK_NAMES}, but the model registry holds "
                      f"{tuple(ENCODERS)} / {tuple(BLOCK_TYPES)}")
