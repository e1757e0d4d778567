"""Sample data contributions: one dermoscopy image and one H&E tile (see docs/samples.md)."""

from __future__ import annotations

from typing import Any

import numpy as np

from napari_sgdc.samples import SAMPLES, read_sample


def _layer(key: str) -> list[tuple[np.ndarray, dict[str, Any], str]]:
    sample = SAMPLES[key]
    meta = {"name": sample.layer_name, "rgb": True,
            "metadata": {"source": sample.source, "licence": sample.licence, "sgdc_model": sample.model}}
    return [(read_sample(key), meta, "image")]


def dermoscopy_sample() -> list[tuple[np.ndarray, dict[str, Any], str]]:
    """PH² image IMD019 (held-out test split), downscaled to 512 × 385."""
    return _layer("dermoscopy")


def nuclei_sample() -> list[tuple[np.ndarray, dict[str, Any], str]]:
    """MoNuSeg TCGA-21-5784 H&E, top-left 512 × 512 crop at 40x (CC BY-NC-SA 4.0)."""
    return _layer("nuclei")
