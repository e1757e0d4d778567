"""Training: losses, the `fit` loop, validation, training from a config and dataset layouts
(`train_from_config`), post-processing tuning and GUI fine-tuning (headless: no napari or Qt)."""

from .corrections import EditSummary, crop_to_edits, edit_summary, edited_pixels, loss_weight_map
from .finetune import finetune
from .fit import History, check_train_config, fit, seed_everything
from .losses import edge_loss, mask_loss, total_loss
from .state import last_checkpoint_path_for, state_path_for
from .validate import tune_postprocess, validate
from .recipe import TrainResult, train_from_config
from .tune import tune_checkpoint, tuning_summary, write_tuned_checkpoint

__all__ = [
    "EditSummary",
    "History",
    "TrainResult",
    "check_train_config",
    "crop_to_edits",
    "edit_summary",
    "edited_pixels",
    "edge_loss",
    "finetune",
    "fit",
    "last_checkpoint_path_for",
    "loss_weight_map",
    "mask_loss",
    "seed_everything",
    "state_path_for",
    "total_loss",
    "train_from_config",
    "tune_checkpoint",
    "tune_postprocess",
    "tuning_summary",
    "validate",
    "write_tuned_checkpoint",
]
