"""Training: losses, the `fit` loop and GUI fine-tuning (headless: no napari or Qt)."""

from .finetune import finetune
from .fit import History, evaluate, fit, last_checkpoint_path_for, state_path_for
from .losses import edge_loss, mask_loss, total_loss

__all__ = [
    "History",
    "edge_loss",
    "evaluate",
    "finetune",
    "fit",
    "last_checkpoint_path_for",
    "mask_loss",
    "state_path_for",
    "total_loss",
]
