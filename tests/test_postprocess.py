"""The one post-processing stage: options, masks, instances, stacks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from napari_sgdc.postprocess import PostprocessOptions, postprocess


def _touching_pair():
    probability = np.zeros((20, 30), np.float32)
    boundary = np.zeros((20, 30), np.float32)
    probability[4:14, 4:24] = 0.9  # two 10x10 nuclei touching at column 14
    boundary[4:14, 13:15] = 0.8    # the boundary between them
    probability[17:19, 27:29] = 0.9  # a 4-pixel speck
    return probability, boundary


def test_postprocess_splits_touching_instances():
    probability, boundary = _touching_pair()
    mask, labels = postprocess(probability, boundary, PostprocessOptions(0.5, 0.5, 10), instances=True)
    assert labels.dtype == np.int32
    assert sorted(np.unique(labels)) == [0, 1, 2]
    left, right = labels[8, 6], labels[8, 20]
    assert left != right and left > 0 and right > 0
    assert np.count_nonzero(labels == left) == np.count_nonzero(labels == right) == 100
    assert labels[17, 27] == 0  # the speck is below min_size
    # Without a boundary (or with a threshold above it) the pair stays one instance.
    _, merged = postprocess(probability, boundary, PostprocessOptions(0.5, 0.85, 10), instances=True)
    assert sorted(np.unique(merged)) == [0, 1]
    _, keep_speck = postprocess(probability, boundary, PostprocessOptions(0.5, 0.5, 1), instances=True)
    assert keep_speck.max() == 3
    semantic_only, none = postprocess(probability, boundary, PostprocessOptions(0.5, 0.5, 10))
    assert none is None
    np.testing.assert_array_equal(semantic_only, mask)  # the mask does not depend on `instances`
    raw, _ = postprocess(probability, None, PostprocessOptions(0.5, 0.5, 1))
    assert mask.dtype == bool and raw.sum() == 204
    assert raw[17, 27] and not mask[17, 27]  # the speck is below min_size
    assert mask.sum() == 204 - np.count_nonzero(raw & ~mask)


def test_single_object_keeps_largest_region_with_holes_filled():
    probability = np.zeros((40, 40), np.float32)
    probability[5:30, 5:30] = 0.9
    probability[15:18, 15:18] = 0.1  # a hole
    probability[34:38, 34:38] = 0.9  # a stray blob
    mask, _ = postprocess(probability, probability, PostprocessOptions(min_size=1), single_object=True)
    assert mask[16, 16] and not mask[35, 35]
    assert mask.sum() == 25 * 25


def test_postprocess_stack_ids_unique_and_unseeded_components():
    probability, boundary = _touching_pair()
    _, labels = postprocess(np.stack([probability, probability]), np.stack([boundary, boundary]),
                            PostprocessOptions(min_size=10), instances=True)
    assert labels.shape == (2, 20, 30)
    assert set(np.unique(labels[0])) == {0, 1, 2} and set(np.unique(labels[1])) == {0, 3, 4}
    # A component that is boundary everywhere still becomes an instance.
    boundary_only = np.ones_like(boundary)
    _, labels = postprocess(probability, boundary_only, PostprocessOptions(min_size=10), instances=True)
    assert labels.max() == 1 and np.count_nonzero(labels) == 200


@pytest.mark.parametrize("field, value", [
    ("threshold", 1.5), ("threshold", -1), ("threshold", math.nan), ("threshold", "0.5"),
    ("split_level", math.inf), ("min_size", -1), ("min_size", 2.5), ("min_size", True),
])
def test_options_out_of_range_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        PostprocessOptions(**{field: value})


def test_nan_probabilities_are_background():
    probability, boundary = _touching_pair()
    probability[5, 5] = np.nan
    boundary[:] = np.nan
    mask, labels = postprocess(probability, boundary, PostprocessOptions(min_size=1), instances=True)
    assert not mask[5, 5] and labels[5, 5] == 0
    assert labels.max() >= 1 and (labels > 0).sum() == mask.sum()


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"\(4,\)"):
        postprocess(np.zeros(4), None)
    with pytest.raises(ValueError, match="boundary shape"):
        postprocess(np.zeros((4, 4)), np.zeros((4, 5)), instances=True)


def test_object_confidence_is_one_minus_mean_uncertainty():
    from napari_sgdc.postprocess import object_confidence

    labels = np.array([[0, 1, 1], [2, 2, 0], [0, 0, 4]], np.int32)
    uncertainty = np.array([[0.9, 0.2, 0.4], [0.0, 1.0, 0.9], [0.5, 0.5, 0.25]], np.float32)
    confidence = object_confidence(labels, uncertainty)
    np.testing.assert_allclose(confidence, [0.0, 0.7, 0.5, 0.0, 0.75], atol=1e-6)


def test_options_for_a_model_take_its_tuned_marker_threshold_then_the_overrides():
    from napari_sgdc.config import ModelConfig

    config = ModelConfig(encoder="mini", pretrained=False, task="instance", split_level=0.3)
    assert PostprocessOptions.for_model(config) == PostprocessOptions(split_level=0.3)
    assert PostprocessOptions.for_model(config, threshold=0.6, split_level=None, min_size=5) == \
        PostprocessOptions(threshold=0.6, split_level=0.3, min_size=5)
    assert PostprocessOptions.for_model(config, split_level=0.7).split_level == 0.7
    assert PostprocessOptions.for_model(None) == PostprocessOptions()  # no model: the plain defaults
    # a checkpoint written before the field existed loads with 0.5
    old = {key: value for key, value in config.to_dict().items() if key != "split_level"}
    assert ModelConfig.from_dict(old).split_level == 0.5
    for bad in (1.5, -0.1, "0.3", math.nan):
        with pytest.raises(ValueError, match="split_level"):
            ModelConfig(encoder="mini", pretrained=False, split_level=bad)


def test_options_for_a_model_take_all_its_tuned_defaults():
    from napari_sgdc.config import ModelConfig

    config = ModelConfig(encoder="mini", pretrained=False, task="instance", threshold=0.6, split_level=0.3,
                         min_size=40)
    assert PostprocessOptions.for_model(config) == PostprocessOptions(0.6, 0.3, 40)
    assert PostprocessOptions.for_model(config, min_size=5, threshold=None) == PostprocessOptions(0.6, 0.3, 5)
    assert ModelConfig.from_dict(config.to_dict()) == config  # saved in checkpoints
    old = {key: value for key, value in config.to_dict().items() if key not in ("threshold", "min_size")}
    assert (ModelConfig.from_dict(old).threshold, ModelConfig.from_dict(old).min_size) == (0.5, 20)
    for field, bad in (("threshold", 1.5), ("threshold", "0.5"), ("min_size", -1), ("min_size", 2.5),
                       ("min_size", True)):
        with pytest.raises(ValueError, match=field):
            ModelConfig(encoder="mini", pretrained=False, **{field: bad})


def test_old_name_of_the_split_level_still_works_with_a_warning():
    from napari_sgdc.config import ModelConfig

    with pytest.warns(DeprecationWarning, match="split_level"):
        options = PostprocessOptions(boundary_threshold=0.3)
    assert options.split_level == 0.3
    with pytest.warns(DeprecationWarning):
        assert options.boundary_threshold == 0.3
    with pytest.warns(DeprecationWarning):
        config = ModelConfig(encoder="mini", pretrained=False, task="instance", boundary_threshold=0.2)
    assert config.split_level == 0.2
    assert PostprocessOptions.for_model(config, boundary_threshold=0.7).split_level == 0.7
    # checkpoints written before the rename carry the old key: read without a warning
    assert ModelConfig.from_dict({**config.to_dict(), "split_level": 0.4}).split_level == 0.4
    old = config.to_dict()
    old["boundary_threshold"] = old.pop("split_level")
    assert ModelConfig.from_dict(old).split_level == 0.2
    with pytest.raises(TypeError, match="both"):
        PostprocessOptions(boundary_threshold=0.3, split_level=0.4)
