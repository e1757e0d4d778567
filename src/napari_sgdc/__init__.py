"""napari-sgdc: Structure-Guided Dynamic Convolution segmentation for napari.

The headless API (no napari or Qt import):

    from napari_sgdc import load_model, segment
    model = load_model("dermoscopy")
    result = segment(model, image)

Names are imported lazily, so ``import napari_sgdc`` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "ModelConfig": "napari_sgdc.config",
    "TrainConfig": "napari_sgdc.config",
    "PRESETS": "napari_sgdc.config",
    "build_model": "napari_sgdc.model",
    "save_checkpoint": "napari_sgdc.checkpoints",
    "load_checkpoint": "napari_sgdc.checkpoints",
    "load_model": "napari_sgdc.checkpoints",
    "resolve_device": "napari_sgdc.device",
    "segment": "napari_sgdc.inference",
    "read_image": "napari_sgdc.files",
    "write_result": "napari_sgdc.files",
    "SegmentationResult": "napari_sgdc.inference",
    "fit": "napari_sgdc.train",
    "finetune": "napari_sgdc.train",
    "export": "napari_sgdc.modelzoo",
}

# Imported eagerly (numpy only): the submodule napari_sgdc.postprocess would otherwise shadow
# the function `postprocess` as soon as anything imports the submodule.
from .postprocess import PostprocessOptions, postprocess  # noqa: E402

__all__ = sorted([*_LAZY, "PostprocessOptions", "postprocess"]) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'napari_sgdc' has no attribute {name!r}")
