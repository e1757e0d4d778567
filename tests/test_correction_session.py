"""Headless tests of the correction session (`napari_sgdc.session`): no napari, no Qt."""

from __future__ import annotations

import importlib
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from napari_sgdc.config import TrainConfig
from napari_sgdc.inference import SegmentationResult
from napari_sgdc.model import build_model, tiny_config
from napari_sgdc.postprocess import PostprocessOptions, postprocess
from napari_sgdc.session import (MAX_UNDO, CachedResult, CorrectionSession, ModelState, PlaneInput, TrainingList,
                                 count_edits, merge_result)
from napari_sgdc.training_pairs import InputError, TrainingPair, collect_pair, pair_arrays

SOURCE = "/models/tiny.safetensors"
CONFIG = TrainConfig(epochs=1, max_steps=2, steps_per_epoch=2, batch_size=2, crop_size=64, lr_encoder=1e-3,
                     lr_decoder=1e-3, warmup_steps=1, freeze_encoder=False, val_every=0, l2sp=0.0)


def _state(task: str = "semantic", **config) -> ModelState:
    torch.manual_seed(0)
    return ModelState(SOURCE, build_model(tiny_config(task=task, **config)).eval())


def _weights(model) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def _disk_pair(name: str = "lesion", source: str = SOURCE) -> TrainingPair:
    yy, xx = np.mgrid[:48, :48]
    disk = ((yy - 24) ** 2 + (xx - 24) ** 2 < 150).astype(np.uint8)
    image = np.where(disk[..., None] > 0, 60, 200).astype(np.uint8).repeat(3, axis=-1)
    return collect_pair(image[None], disk, image_shape=disk.shape, image_name=name, labels_name=f"{name} mask",
                        model_source=source)


def _session_with(state: ModelState) -> CorrectionSession:
    session = CorrectionSession()
    session.models[state.source] = state
    session.current_source = state.source
    return session


def test_undo_restores_the_weights_of_a_real_finetune_bit_for_bit():
    state = _state()
    session = _session_with(state)
    before = _weights(state.model)
    run = state.begin_run([_disk_pair()], CONFIG, "quick")
    history = session.run_finetune(run)
    assert len(history.losses) == 2 and not _same(before, _weights(state.model))
    info = session.keep_finetune(run, history)
    assert info["steps"] == 2 and info["images"] == ["lesion"] and info["loss_last"] == history.losses[-1]
    assert session.undo()["images"] == ["lesion"]
    assert _same(before, _weights(state.model)) and state.runs == [] and state.last_train_config is None
    with pytest.raises(InputError, match="Nothing to undo"):
        session.undo()


def test_a_dropped_run_leaves_no_trace_and_events_say_when_the_model_changed():
    state = _state()
    session = _session_with(state)
    changes = []
    session.connect("model_changed", lambda: changes.append(1))
    before = _weights(state.model)
    run = state.begin_run([_disk_pair()], CONFIG)
    with torch.no_grad():
        next(state.model.parameters()).add_(1.0)  # as a failed run might leave it
    state.drop_run(run)
    assert _same(before, _weights(state.model)) and not state.undo and not state.runs and not changes
    session.keep_finetune(state.begin_run([_disk_pair()], CONFIG), None)
    assert changes == [1]


def test_provenance_counts_every_kept_run_and_undo_is_capped():
    state = _state()
    state.model.metadata = {"provenance": {"note": "base"}}
    history = type("History", (), {"losses": [1.0, 0.5, 0.25], "steps": 3})()
    for index in range(MAX_UNDO + 2):
        state.keep_run(state.begin_run([_disk_pair(f"img{index % 3}")], CONFIG, "quick"), history)
    provenance = state.provenance()
    assert provenance["base_model"] == SOURCE and provenance["base_provenance"] == {"note": "base"}
    assert provenance["corrected_images"] == 3 and provenance["corrected_image_names"] == ["img0", "img1", "img2"]
    assert provenance["finetune_steps"] == 3 * (MAX_UNDO + 2)
    assert len(state.undo) == MAX_UNDO and provenance["finetune_runs"][0]["loss_first"] == 1.0


def test_run_finetune_converts_pairs_into_the_targets_of_the_model(monkeypatch):
    import napari_sgdc.train as train

    state = _state("instance", mpp=0.25)
    seen = {}
    monkeypatch.setattr(train, "finetune", lambda model, images, labels, **kwargs: seen.update(kwargs, labels=labels))
    written = np.zeros((1, 48, 48), np.int32)
    labels = written.copy()
    labels[0, 5:10, 5:10] = 7
    pair = collect_pair(np.zeros((1, 48, 48, 3), np.uint8), labels[0], image_shape=(48, 48), image_name="a",
                        labels_name="a mask", model_source=SOURCE, predicted=written, mpp=0.5)
    CorrectionSession.run_finetune(state.begin_run([pair], CONFIG))
    assert seen["labels"][0].dtype == np.int32 and seen["predictions"][0].dtype == np.int32
    assert seen["mpp"] == [0.5] and seen["preset"] is CONFIG
    semantic = pair_arrays([pair], tiny_config())
    assert semantic.labels[0].dtype == bool and semantic.mpp == [None]  # a model without a scale: as the image is


def test_finetune_takes_training_pairs_directly():
    from napari_sgdc.train import finetune

    state = _state()
    before = _weights(state.model)
    history = finetune(state.model, [_disk_pair()], preset=CONFIG)
    assert len(history.losses) == 2 and not _same(before, _weights(state.model))
    with pytest.raises(ValueError, match="carry their own"):
        finetune(state.model, [_disk_pair()], [np.zeros((48, 48), np.uint8)])


def test_override_preset_keeps_the_encoder_decoder_ratio():
    from napari_sgdc.train.finetune import override_preset

    preset = TrainConfig(lr_encoder=1e-5, lr_decoder=1e-4)
    config = override_preset(preset, steps=7, learning_rate=0.01, freeze_encoder=True, device="cpu")
    assert (config.max_steps, config.steps_per_epoch, config.epochs) == (7, 7, 1)
    assert config.lr_decoder == 0.01 and config.lr_encoder == pytest.approx(0.001)
    assert config.freeze_encoder and config.device == "cpu"
    with pytest.raises(ValueError, match="at least 1 step"):
        override_preset(preset, steps=0, learning_rate=0.01, freeze_encoder=False)


def test_edit_counts_per_plane_and_their_text():
    written = np.zeros((2, 20, 20), np.int32)
    written[:, 2:6, 2:6] = [[[1]], [[2]]]
    labels = written.copy()
    labels[1, 10:14, 10:15] = 9  # a new object on plane 1
    count = count_edits(labels, written, instances=True, stack=True)
    assert (count.pixels, count.objects, count.planes) == (20, 1, 1)
    assert count.text() == "20 px (2.5%) in 1 object on 1 plane; they weigh most in fine-tuning"
    assert count_edits(written, written, instances=True).text() == "no edits yet: paint or erase on the mask"
    renumbered = np.where(written > 0, written + 5, 0)  # renumbering is not an edit
    assert count_edits(renumbered, written, instances=True).pixels == 0
    region = CorrectionSession.region_edits(labels[1], written[1])
    assert region.text("region") == "20 px in 1 object of the region; they weigh most in fine-tuning"
    assert CorrectionSession.region_edits(labels[1][:5], written[1]).pixels == 0  # another size: nothing to compare


def test_image_pair_converts_the_own_mask_with_its_prediction_and_scale():
    session = CorrectionSession()
    key = type("Layer", (), {})()  # any weak-referenceable key (the plugin uses the image layer)
    with pytest.raises(InputError, match="No model"):
        session.image_pair(key, np.zeros((1, 8, 8), np.uint8), np.ones((8, 8), np.uint8), image_shape=(8, 8),
                           image_name="a", labels_name="a mask", own_mask=False, image_mpp=None)
    written = np.zeros((1, 8, 8), np.uint8)
    written[0, 2:4, 2:4] = 1
    session.results[key] = CachedResult(np.zeros((1, 8, 8), np.float32), np.zeros((1, 8, 8), np.float32),
                                        np.ones(1, bool), (), False, written, SOURCE, mpp=0.5)
    labels = written[0].copy()
    labels[5, 5] = 1
    pair = session.image_pair(key, np.zeros((1, 8, 8), np.uint8), labels, image_shape=(8, 8), image_name="a",
                              labels_name="a mask", own_mask=True, image_mpp=2.0)
    assert pair.model_source == SOURCE and pair.mpp == 0.5
    np.testing.assert_array_equal(pair.predictions[0], written[0])
    other = session.image_pair(key, np.zeros((1, 8, 8), np.uint8), labels, image_shape=(8, 8), image_name="a",
                               labels_name="painted", own_mask=False, image_mpp=2.0)
    assert other.predictions is None
    with pytest.raises(InputError, match="still equals the model's prediction"):
        session.image_pair(key, np.zeros((1, 8, 8), np.uint8), written[0], image_shape=(8, 8), image_name="a",
                           labels_name="a mask", own_mask=True, image_mpp=None)


def _result(probability: np.ndarray, boundary: np.ndarray, options: PostprocessOptions,
            mpp: float | None = None) -> SegmentationResult:
    mask, labels = postprocess(probability, boundary, options, instances=True)
    return SegmentationResult(probability=probability, mask=mask, boundary=boundary, labels=labels,
                              separation=boundary, mpp=mpp)


def _counting(monkeypatch) -> list[int]:
    module = importlib.import_module("napari_sgdc.postprocess")
    calls, real = [], module.postprocess
    monkeypatch.setattr(module, "postprocess", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_a_result_is_stored_without_postprocessing_again_and_stack_ids_stay_unique(monkeypatch):
    rng = np.random.default_rng(0)
    probability, boundary = rng.random((3, 24, 24)).astype(np.float32), rng.random((3, 24, 24)).astype(np.float32)
    options = PostprocessOptions(0.4, 0.6, 2)
    full = PlaneInput(np.zeros((3, 24, 24)), [0, 1, 2], (3,), (24, 24))
    calls = _counting(monkeypatch)
    cache = merge_result(None, full, _result(probability, boundary, options), model_source=SOURCE, instances=True,
                         single_object=False, used=options, options=options)
    assert calls == []  # the labels `segment` made are the written mask
    np.testing.assert_array_equal(cache.written_mask, postprocess(probability, boundary, options, instances=True)[1])
    # the current plane only, segmented again: earlier planes stay, ids are renumbered as one stack
    again = PlaneInput(np.zeros((1, 24, 24)), [1], (3,), (24, 24))
    new_probability = rng.random((24, 24)).astype(np.float32)
    cache = merge_result(cache, again, _result(new_probability, boundary[1], options), model_source=SOURCE,
                         instances=True, single_object=False, used=options, options=options)
    assert calls == []
    probability[1] = new_probability
    np.testing.assert_array_equal(cache.written_mask, postprocess(probability, boundary, options, instances=True)[1])
    moved = PostprocessOptions(0.5, 0.6, 2)  # a slider moved while the network ran: post-processed once more
    cache = merge_result(cache, again, _result(new_probability, boundary[1], options), model_source=SOURCE,
                         instances=True, single_object=False, used=options, options=moved)
    assert calls == [1]
    np.testing.assert_array_equal(cache.written_mask, postprocess(probability, boundary, moved, instances=True)[1])


def test_store_result_adopts_the_models_defaults_and_keeps_the_scale():
    state = _state("instance")
    state.model.config.threshold, state.model.config.min_size = 0.45, 3
    session = _session_with(state)
    used = session.options_for(state)
    assert used == PostprocessOptions.for_model(state.model.config) != session.options
    rng = np.random.default_rng(1)
    probability, boundary = rng.random((16, 16)).astype(np.float32), rng.random((16, 16)).astype(np.float32)
    key = type("Layer", (), {})()
    cache = session.store_result(key, PlaneInput(np.zeros((1, 16, 16)), [0], (), (16, 16)), state,
                                 _result(probability, boundary, used, mpp=0.5), used=used)
    assert session.options == used and session.options_for(state) is session.options
    assert session.results[key] is cache and cache.mpp == 0.5 and cache.model_source == SOURCE
    np.testing.assert_array_equal(cache.written_mask[0], postprocess(probability, boundary, used, instances=True)[1])


def test_training_list_replaces_by_key_filters_by_model_and_autosaves(tmp_path):
    from napari_sgdc.autosave import Autosave

    problems = []
    training = TrainingList(Autosave(tmp_path / "saved", session="me"), on_problem=problems.append)
    first, other = _disk_pair("a"), _disk_pair("b", source="built-in: nuclei")
    training.put(first)
    training.put(_disk_pair("a"))  # the same image for the same model: replaced
    training.put(other)
    assert [pair.image_name for pair in training.pairs] == ["a", "b"] and len(training.autosave.entries()) == 2
    kept, note = training.for_model(SOURCE)
    assert [pair.image_name for pair in kept] == ["a"] and "left out 1 pair(s) made for built-in: nuclei: b." in note
    training.trained(kept)
    assert [entry.image_name for entry in training.autosave.entries()] == ["b"]
    training.untrained(SOURCE, ["a"])
    assert len(training.autosave.entries()) == 2
    training.remove([other.title])
    with pytest.raises(InputError, match="No corrections for 'built-in: nuclei'"):
        training.for_model("built-in: nuclei")  # only a pair of another model is left
    training.remove([first.title])
    with pytest.raises(InputError, match="No corrections: segment an image"):
        training.for_model(SOURCE)
    assert problems == [] and training.autosave.entries() == []


def test_the_session_imports_no_gui():
    code = ("import sys, napari_sgdc.session, napari_sgdc.training_pairs, napari_sgdc.train.finetune; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('napari', 'qtpy', 'PyQt5', 'PyQt6', 'PySide2', "
            "'PySide6', 'magicgui', 'superqt')]; print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_segment_runs_at_the_settings_scale_else_the_layers_and_the_pair_keeps_it():
    """The image µm/px goes dock setting -> session.segment -> result.mpp -> cache -> training pair."""
    state = ModelState(SOURCE, build_model(tiny_config(task="instance", mpp=0.25)).eval())
    session = _session_with(state)
    planes = PlaneInput(np.random.default_rng(0).integers(0, 255, (1, 64, 64, 3)).astype(np.uint8), [0], (), (64, 64))
    session.settings.mpp = 0.0
    assert session.segment(planes, SOURCE, layer_mpp=0.5)[2].mpp == 0.5  # 0: the layer's own scale
    session.settings.mpp = 0.25
    state_, used, result = session.segment(planes, SOURCE, layer_mpp=0.5)
    assert result.mpp == 0.25 and result.probability.shape == (64, 64)
    key = type("Layer", (), {})()
    session.store_result(key, planes, state_, result, used=used)
    painted = np.zeros((64, 64), np.int32)
    painted[10:30, 10:30] = 1  # the user's corrected object
    pair = session.image_pair(key, planes.planes, painted, image_shape=(64, 64), image_name="img",
                              labels_name="img mask", own_mask=False, image_mpp=None)
    assert pair.mpp == 0.25
    semantic = ModelState("plain", build_model(tiny_config()).eval())  # a model without a scale ignores it
    session.models["plain"] = semantic
    assert session.segment(planes, "plain", layer_mpp=0.5)[2].mpp is None


def test_training_list_in_the_background_writes_off_the_callers_thread_in_order(tmp_path):
    """Finding 18: the Fine-tune dock's autosave wrote on the GUI thread; with ``background=True``
    every write runs on one writer thread, in the order asked, and nothing is lost."""
    import threading

    from napari_sgdc.autosave import Autosave

    autosave, gate, threads = Autosave(tmp_path / "saved", session="me"), threading.Event(), []
    real_save = autosave.save

    def slow_save(pairs):
        threads.append(threading.current_thread())
        gate.wait(10)  # a large pair: the write takes long
        return real_save(pairs)

    autosave.save = slow_save
    problems = []
    training = TrainingList(autosave, on_problem=problems.append, background=True)
    first, second = _disk_pair("a"), _disk_pair("b")
    started = time.perf_counter()
    training.put(first)
    training.put(second)
    training.remove([first.title])  # queued behind the saves: runs after them
    assert time.perf_counter() - started < 1.0 and [p.image_name for p in training.pairs] == ["b"]
    assert not training.flush(timeout=0.05)  # still writing
    gate.set()
    assert training.flush(timeout=30)
    assert threads and all(thread is not threading.main_thread() for thread in threads)
    assert [entry.image_name for entry in autosave.entries()] == ["b"] and problems == []
    autosave.save = lambda pairs: (_ for _ in ()).throw(OSError("disk full"))
    training.put(_disk_pair("c"))
    assert training.flush(timeout=30) and problems == [f"Could not autosave the corrections to {autosave.folder}: "
                                                       "disk full"]
    assert [p.image_name for p in training.pairs] == ["b", "c"]  # kept in memory all the same
