"""The shipped models load offline by name and segment the shipped samples well."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from skimage import io as skio

from napari_sgdc.data.transforms import resize_labels
from napari_sgdc.inference import segment
from napari_sgdc.checkpoints import builtin_models, load_model
from napari_sgdc.metrics import dice, iou
from napari_sgdc.samples import read_sample

REFERENCE_DIR = Path(__file__).parent / "data"

CASES = {
    # reference mask in shared/data, crop of the reference, minimum score
    "dermoscopy": ("ph2/masks/IMD019.png", None, ("iou", 0.85)),
    "nuclei": ("monuseg/train/masks/TCGA-21-5784-01Z-00-DX1.png", (512, 512), ("dice", 0.7)),
}


def test_both_builtin_models_are_shipped():
    assert {"dermoscopy", "nuclei"} <= set(builtin_models())


@pytest.mark.parametrize("name", sorted(CASES))
def test_builtin_model_segments_its_sample(name, shared_data):
    reference_file, crop, (metric, minimum) = CASES[name]
    model = load_model(name, device="cpu")
    image = read_sample(name)
    result = segment(model, image)
    reference = skio.imread(str(shared_data / reference_file)) > 0
    if crop is not None:
        reference = reference[: crop[0], : crop[1]]
    reference = resize_labels(reference, image.shape[:2])
    assert 0.01 < result.mask.mean() < 0.9  # non-trivial
    score = {"iou": iou, "dice": dice}[metric](result.mask, reference)
    assert score >= minimum, f"{name}: {metric} {score:.3f} < {minimum}"
    if model.config.is_instance:
        assert result.labels is not None and result.labels.max() > 20  # many separate nuclei


@pytest.mark.parametrize("name", sorted(CASES))
def test_builtin_model_output_is_unchanged(name):
    """The masks (and nuclei labels) of the shipped samples, as written by version 0.1.0
    before the code was reorganised (tests/data/*_sample_*.png)."""
    result = segment(load_model(name, device="cpu"), read_sample(name))
    expected_mask = skio.imread(str(REFERENCE_DIR / f"{name}_sample_mask.png")) > 0
    np.testing.assert_array_equal(result.mask, expected_mask)
    labels_file = REFERENCE_DIR / f"{name}_sample_labels.png"
    assert (result.labels is not None) == labels_file.exists()
    if result.labels is not None:
        np.testing.assert_array_equal(result.labels, skio.imread(str(labels_file)))
    classes_file = REFERENCE_DIR / f"{name}_sample_classes.png"
    assert (result.type_map is not None) == classes_file.exists()
    if result.type_map is not None:
        np.testing.assert_array_equal(result.type_map, skio.imread(str(classes_file)))
