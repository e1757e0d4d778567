"""The bundled sample images (headless; docs/samples.md gives their sources and licences).

Used by napari's *Open Sample* menu, the demo and the tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["SAMPLES", "SampleImage", "read_sample"]

SAMPLES_DIR = Path(__file__).parent / "sample_images"


@dataclass(frozen=True)
class SampleImage:
    """One bundled sample.

    Attributes:
        file_name: file in ``sample_images/``.
        layer_name: name of the napari layer it opens as.
        model: the built-in model made for it.
        source: where the pixels come from.
        licence: their licence.
    """

    file_name: str
    layer_name: str
    model: str
    source: str
    licence: str


SAMPLES: dict[str, SampleImage] = {
    "dermoscopy": SampleImage(
        "dermoscopy_IMD019.jpg", "dermoscopy IMD019", "dermoscopy",
        "PH2 database, IMD019 (test split), downscaled 2/3", "research/education"),
    "nuclei": SampleImage(
        "he_TCGA-21-5784_crop512.jpg", "H&E nuclei TCGA-21-5784", "nuclei",
        "MoNuSeg training set, TCGA-21-5784-01Z-00-DX1, crop [0:512, 0:512]", "CC BY-NC-SA 4.0"),
}


def read_sample(key: str) -> np.ndarray:
    """Reads sample `key` (``dermoscopy`` or ``nuclei``) as an (H, W, 3) uint8 RGB array.

    Raises:
        KeyError: an unknown key (the message lists the known ones).
    """
    from PIL import Image as PILImage

    if key not in SAMPLES:
        raise KeyError(f"unknown sample {key!r}; choose one of {', '.join(SAMPLES)}")
    with PILImage.open(SAMPLES_DIR / SAMPLES[key].file_name) as image:
        return np.asarray(image.convert("RGB"))
