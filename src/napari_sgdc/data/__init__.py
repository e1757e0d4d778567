"""Data loading, boundary targets and augmentation (headless: no napari or Qt)."""

from .datasets import (
    CONSEP_VAL_PARENTS,
    LAYOUTS,
    SPLITS,
    Sample,
    SegmentationDataset,
    load_samples,
    read_rgb,
    resize_samples,
)
from .targets import boundary_target
from .transforms import (
    augment_pair, color_jitter, resize_image, resize_labels, stain_jitter, to_float_rgb, to_uint8_rgb, working_size,
)

__all__ = [
    "CONSEP_VAL_PARENTS",
    "LAYOUTS",
    "SPLITS",
    "Sample",
    "SegmentationDataset",
    "augment_pair",
    "boundary_target",
    "color_jitter",
    "load_samples",
    "read_rgb",
    "resize_image",
    "resize_labels",
    "resize_samples",
    "stain_jitter",
    "to_float_rgb",
    "to_uint8_rgb",
    "working_size",
]
