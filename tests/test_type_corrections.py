"""Nucleus types in the correction loop (issue 23): the session's type tables, type changes as
undoable edits, training pairs and autosaves that keep the types, fine-tuning on changed types."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from napari_sgdc.autosave import Autosave
from napari_sgdc.model import build_model, tiny_config
from napari_sgdc.postprocess import PostprocessOptions
from napari_sgdc.session import CorrectionSession, PlaneInput
from napari_sgdc.train.corrections import retyped_pixels
from napari_sgdc.training_pairs import InputError, TrainingPair, collect_pair, pair_arrays

TYPES = dict(task="instance", instance_map="hover", type_names=("a", "b"), type_colors=("#ff0000", "#00ff00"))


def _typed_result(shape=(48, 64)):
    """Three nuclei: 1 and 2 of type a (left half), 3 of type b (right half)."""
    labels = np.zeros(shape, np.int32)
    labels[5:15, 5:15], labels[25:40, 8:20], labels[10:30, 40:55] = 1, 2, 3
    type_probability = np.zeros((*shape, 2), np.float32)
    type_probability[:, :32] = (0.9, 0.1)
    type_probability[:, 32:] = (0.2, 0.8)
    probability = (labels > 0).astype(np.float32)
    return SimpleNamespace(probability=probability, boundary=np.zeros(shape, np.float32), mask=labels > 0,
                           labels=labels, separation=np.zeros(shape, np.float32), uncertainty=None, mpp=None,
                           type_probability=type_probability)


def _session_with_result(typed=True):
    session = CorrectionSession()
    config = tiny_config(**TYPES) if typed else tiny_config(task="instance", instance_map="hover")
    state = SimpleNamespace(source="synthetic", model=SimpleNamespace(config=config))
    result = _typed_result()
    if not typed:
        result.type_probability = None
    key = object.__new__(type("Key", (), {}))  # any weakly referenceable key
    planes = PlaneInput(np.zeros((1, 48, 64, 3), np.uint8), [0], (), (48, 64))
    session.options = PostprocessOptions.for_model(config)
    session.defaults_source = "synthetic"
    session.store_result(key, planes, state, result, used=session.options)
    return session, key, result


def test_the_cache_keeps_the_type_table_and_a_type_change_is_an_undoable_edit():
    session, key, result = _session_with_result()
    types, confidence = session.object_types(key)
    assert types.tolist() == [0, 1, 1, 2] and confidence[1:] == pytest.approx([0.9, 0.9, 0.8])
    labels = result.labels.copy()
    assert session.mask_edits(key, labels).pixels == 0

    events = []
    session.connect("types_changed", lambda key: events.append(key))
    change = session.set_object_type(key, 2, 2, labels=labels)
    assert change.text == "object 2: a → b" and events == [key]
    assert session.object_types(key, labels)[0].tolist() == [0, 1, 2, 2]
    count = session.mask_edits(key, labels)
    assert count.objects == 1 and count.retyped == 1 and count.pixels == int((labels == 2).sum())
    assert "1 object (1 retyped)" in count.text()

    labels[40:46, 50:60] = 4  # a painted nucleus takes its type from the probabilities: b (right half)
    assert session.object_types(key, labels)[0].tolist() == [0, 1, 2, 2, 2]
    count = session.mask_edits(key, labels)
    assert count.objects == 2 and count.retyped == 1

    assert session.undo_type_change(key) == change and session.undo_type_change(key) is None
    assert session.object_types(key, labels)[0].tolist() == [0, 1, 1, 2, 2]
    with pytest.raises(InputError, match="no type 3"):
        session.set_object_type(key, 1, 3, labels=labels)
    with pytest.raises(InputError, match="no object 9"):
        session.set_object_type(key, 9, 1, labels=labels)


def test_rethresholding_reassigns_types_and_forgets_the_users():
    session, key, result = _session_with_result()
    session.set_object_type(key, 1, 2)
    session.options = PostprocessOptions(threshold=0.5, split_level=0.5, min_size=0)
    cache = session.rethreshold(key)
    assert not cache.overrides.types and cache.object_types is not None
    assert set(cache.object_types[1:].tolist()) == {1, 2}


def test_untyped_results_have_no_types():
    session, key, result = _session_with_result(typed=False)
    assert session.object_types(key) is None
    with pytest.raises(InputError, match="nucleus types"):
        session.set_object_type(key, 1, 1)
    assert session.mask_edits(key, result.labels).retyped == 0


def test_the_pair_of_a_type_change_keeps_the_tables_and_the_autosave_restores_them(tmp_path):
    session, key, result = _session_with_result()
    labels = result.labels.copy()
    with pytest.raises(InputError, match="No corrections"):
        session.image_pair(key, np.zeros((1, 48, 64, 3), np.uint8), labels, image_shape=(48, 64), image_name="he",
                           labels_name="he mask", own_mask=True, image_mpp=None)
    session.set_object_type(key, 3, 1, labels=labels)  # only a type changed: a correction
    pair = session.image_pair(key, np.zeros((1, 48, 64, 3), np.uint8), labels, image_shape=(48, 64),
                              image_name="he", labels_name="he mask", own_mask=True, image_mpp=None)
    assert pair.types[0].tolist() == [0, 1, 1, 1] and pair.predicted_types[0].tolist() == [0, 1, 1, 2]
    assert np.array_equal(retyped_pixels(pair.labels[0], pair.predictions[0], pair.types[0],
                                         pair.predicted_types[0]), labels == 3)

    saver = Autosave(tmp_path, session="first")
    saver.save([pair])
    [back], problems = Autosave(tmp_path, session="second").load()
    assert not problems and back.types[0].dtype == np.int16
    assert [t.tolist() for t in back.types] == [t.tolist() for t in pair.types]
    assert [t.tolist() for t in back.predicted_types] == [t.tolist() for t in pair.predicted_types]

    old = TrainingPair("old", "old mask", pair.images, pair.labels, "synthetic", pair.predictions)  # no tables
    Autosave(tmp_path / "old", session="first").save([old])
    [loaded], _ = Autosave(tmp_path / "old", session="second").load()
    assert loaded.types is None and loaded.predicted_types is None


def test_pair_arrays_follow_renumbered_ids_and_drop_types_for_untyped_models():
    labels = np.array([[0, 2**32 + 5], [7, 7]], np.uint64)
    table = np.zeros(8, np.int16)
    table[7] = 2  # 2**32 + 5 is beyond the table: no type
    pair = collect_pair(np.zeros((1, 2, 2, 3), np.uint8), labels, image_shape=(2, 2), image_name="x",
                        labels_name="y", model_source="m", types=table)
    typed = pair_arrays([pair], tiny_config(**TYPES))
    ids = typed.labels[0]
    assert typed.types[0][ids[1, 0]] == 2 and typed.types[0][ids[0, 1]] == 0
    assert pair_arrays([pair], tiny_config(task="instance")).types == [None]


def _typed_model():
    torch.manual_seed(0)
    model = build_model(tiny_config(**TYPES)).eval()
    with torch.no_grad():  # a type head that calls everything type a
        model.type_head[1].bias.copy_(torch.tensor([2.0, 0.0]))
    return model


def _nuclei_image(size=96):
    rng = np.random.default_rng(0)
    labels = np.zeros((size, size), np.int32)
    image = np.full((size, size, 3), 220, np.uint8)
    for index, (row, col) in enumerate([(20, 20), (20, 70), (70, 20), (70, 70)], start=1):
        rr, cc = np.ogrid[:size, :size]
        disk = (rr - row) ** 2 + (cc - col) ** 2 < 12 ** 2
        labels[disk] = index
        image[disk] = (90, 40, 120)
    image = np.clip(image + rng.normal(0, 5, image.shape), 0, 255).astype(np.uint8)
    return image, labels


def _type_b_probability(model, image, where):
    from napari_sgdc.inference import segment

    result = segment(model, image, tile=None)
    return float(result.type_probability[..., 1][where].mean())


def test_finetune_moves_the_type_of_retyped_objects_toward_the_new_type():
    from napari_sgdc.config import PRESETS
    from napari_sgdc.train import finetune
    from napari_sgdc.train.finetune import override_preset

    model = _typed_model()
    image, labels = _nuclei_image()
    retyped = labels == 4
    before = _type_b_probability(model, image, retyped)
    predicted_types = np.array([0, 1, 1, 1, 1], np.int16)
    types = predicted_types.copy()
    types[4] = 2  # the user called nucleus 4 type b
    preset = override_preset(PRESETS["quick"], steps=20, learning_rate=1e-2, freeze_encoder=True, device="cpu")
    pair = TrainingPair("he", "he mask", [image], [labels], "m", [labels.copy()], None, [types], [predicted_types])
    history = finetune(model, [pair], preset=preset)
    assert all("type" in parts for parts in history.loss_parts)
    after = _type_b_probability(model, image, retyped)
    assert after > before + 0.05, (before, after)


def test_a_retyped_object_weighs_like_a_corrected_outline():
    from napari_sgdc.train.corrections import EDIT_WEIGHT
    from napari_sgdc.train.finetune import _focus_on_edits, _prepare_pairs

    image, labels = _nuclei_image()
    types = np.array([0, 1, 1, 1, 2], np.int16)
    [sample] = _prepare_pairs([image], [labels], True, [labels], [types])
    assert sample.types.tolist() == types.tolist()
    [kept], [weight] = _focus_on_edits([sample], [labels], True, 64, [np.array([0, 1, 1, 1, 1], np.int16)])
    assert kept.types is sample.types
    assert np.all(weight[labels == 4] == EDIT_WEIGHT) and np.all(weight[labels == 1] == 1.0)
    with pytest.raises(ValueError, match="nothing was corrected"):  # the same types: no edit
        _focus_on_edits([sample], [labels], True, 64, [types])


def test_untyped_models_fine_tune_as_before_and_ignore_type_tables():
    from napari_sgdc.config import PRESETS
    from napari_sgdc.train import finetune
    from napari_sgdc.train.finetune import override_preset

    image, labels = _nuclei_image()
    edited = labels.copy()
    edited[edited == 4] = 0
    preset = override_preset(PRESETS["quick"], steps=2, learning_rate=1e-3, freeze_encoder=True, device="cpu")
    results = []
    for types in (None, [np.array([0, 1, 2, 1], np.int16)]):
        torch.manual_seed(0)
        model = build_model(tiny_config(task="instance", instance_map="hover"))
        history = finetune(model, [image], [edited], preset, predictions=[labels], types=types,
                           predicted_types=None if types is None else [np.array([0, 1, 1, 1, 1], np.int16)])
        results.append((history.losses, {k: v.clone() for k, v in model.state_dict().items()}))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(results[0][1][k], results[1][1][k]) for k in results[0][1])
