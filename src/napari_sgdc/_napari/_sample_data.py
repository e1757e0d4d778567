"""Sample data contributions: one dermoscopy image and one H&E tile (see docs/samples.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

SAMPLES_DIR = Path(__file__).parent / "samples"
DERMOSCOPY_FILE = "dermoscopy_IMD019.jpg"
HE_FILE = "he_TCGA-21-5784_crop512.jpg"


def read_sample(file_name: str) -> np.ndarray:
    """Reads a bundled sample as an (H, W, 3) uint8 RGB array."""
    from PIL import Image as PILImage

    with PILImage.open(SAMPLES_DIR / file_name) as image:
        return np.asarray(image.convert("RGB"))


def dermoscopy_sample() -> list[tuple[np.ndarray, dict[str, Any], str]]:
    """PH² image IMD019 (held-out test split), downscaled to 512 × 385."""
    meta = {
        "name": "dermoscopy IMD019",
        "rgb": True,
        "metadata": {"source": "PH2 database, IMD019 (test split), downscaled 2/3", "licence": "research/education"},
    }
    return [(read_sample(DERMOSCOPY_FILE), meta, "image")]


def nuclei_sample() -> list[tuple[np.ndarray, dict[str, Any], str]]:
    """MoNuSeg TCGA-21-5784 H&E, top-left 512 × 512 crop at 40x (CC BY-NC-SA 4.0)."""
    meta = {
        "name": "H&E nuclei TCGA-21-5784",
        "rgb": True,
        "metadata": {"source": "MoNuSeg training set, TCGA-21-5784-01Z-00-DX1, crop [0:512, 0:512]",
                     "licence": "CC BY-NC-SA 4.0"},
    }
    return [(read_sample(HE_FILE), meta, "image")]
