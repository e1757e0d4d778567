"""GUI tests of the "SGDC Fine-tune" widget: correct, retrain, re-segment, undo, cancel, save."""

from __future__ import annotations

import time

from dataclasses import replace

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gui


def _weights(model) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


STEPS = 16


def _short_run(finetune_widget, steps: int = STEPS) -> None:
    """Advanced settings for a fast test run (the mini model learns the disk in a few steps;
    with the edited pixels weighted it overshoots to all-foreground for the first ~10)."""
    finetune_widget._presets = {name: replace(preset, l2sp=0.0) for name, preset in finetune_widget._presets.items()}
    finetune_widget.advanced.value = True  # (L2-SP would hold the random tiny model at its start: tested headless)
    finetune_widget.steps.value = steps
    finetune_widget.learning_rate.value = 0.01
    finetune_widget.freeze_encoder.value = False


def _paint_correction(mask_layer, correction: np.ndarray) -> None:
    """Paints `correction` (bool) into the mask layer the way the brush does (with undo history)."""
    current = np.asarray(mask_layer.data)
    add = np.nonzero(correction & (current == 0))
    erase = np.nonzero(~correction & (current != 0))
    if len(add[0]):
        mask_layer.data_setitem(add, 1)
    if len(erase[0]):
        mask_layer.data_setitem(erase, 0)


@pytest.fixture
def corrected(sgdc, wait_segment):
    """The lesion image segmented by the random tiny model, then its mask painted to the true disk."""
    viewer, seg, ft, image, disk = sgdc
    assert wait_segment(seg.run_segment()).error is None
    mask_layer = viewer.layers["lesion mask"]
    before = np.asarray(mask_layer.data) > 0
    _paint_correction(mask_layer, disk)
    ft.reset_choices()
    ft.image_layer.value = image
    ft.labels_layer.value = mask_layer
    _short_run(ft)
    return viewer, seg, ft, image, disk, before


def test_finetune_lowers_loss_and_moves_mask_toward_correction(corrected, qtbot, wait_idle, notes):
    viewer, seg, ft, image, disk, before = corrected
    state = seg._session.current()
    weights_before = _weights(state.model)
    assert ft.start_finetune() is not None
    wait_idle(seg._session)
    assert not notes.matching("failed"), notes.messages
    losses = ft.history.losses
    assert len(losses) == STEPS and np.mean(losses[-3:]) < np.mean(losses[:3])
    assert len(ft.axes.lines) == 1 and len(ft.axes.lines[0].get_xdata()) == STEPS  # the dock's loss plot
    after = np.asarray(viewer.layers["lesion mask"].data) > 0  # re-segmented automatically:
    assert not np.array_equal(after, disk)  # the painted correction was replaced by a prediction
    np.testing.assert_array_equal(seg._session.results[image].written_mask[0] > 0, after)
    assert _iou(after, disk) > _iou(before, disk) + 0.3
    assert not _same_weights(weights_before, _weights(state.model))
    assert [pair.image_name for pair in ft.pairs] == ["lesion"]  # the corrections are kept in the list
    assert ft.status.value.startswith(f"fine-tuned {STEPS} steps"), ft.status.value


def test_undo_restores_weights_bit_for_bit(corrected, wait_idle):
    viewer, seg, ft, image, disk, before = corrected
    state = seg._session.current()
    weights_before = _weights(state.model)
    ft.start_finetune()
    wait_idle(seg._session)
    assert not _same_weights(weights_before, _weights(state.model))
    assert ft.undo()
    assert _same_weights(weights_before, _weights(state.model))
    wait_idle(seg._session)
    restored = np.asarray(viewer.layers["lesion mask"].data) > 0
    np.testing.assert_array_equal(restored, before)  # re-segmented with the old weights
    assert not ft.undo()  # nothing left to undo


def test_cancel_stops_within_a_second_and_keeps_the_model(corrected, qtbot, notes):
    viewer, seg, ft, image, disk, before = corrected
    state = seg._session.current()
    weights_before = _weights(state.model)
    ft.steps.value = 2000
    worker = ft.start_finetune()
    qtbot.waitUntil(lambda: len(ft.losses) >= 1, timeout=30_000)
    finished = []
    worker.finished.connect(lambda: finished.append(time.perf_counter()))
    cancelled_at = time.perf_counter()
    ft.cancel_button.changed.emit(True)
    qtbot.waitUntil(lambda: bool(finished), timeout=5_000)
    assert finished[0] - cancelled_at < 1.0
    qtbot.waitUntil(lambda: seg._session.busy.idle, timeout=5_000)
    assert _same_weights(weights_before, _weights(state.model))
    assert notes.matching("cancelled")
    assert not state.undo  # nothing to undo: the cancelled run left no trace


def test_save_model_writes_checkpoint_with_provenance(corrected, wait_idle, tmp_path, tiny_checkpoint):
    from napari_sgdc.checkpoints import load_checkpoint

    viewer, seg, ft, image, disk, before = corrected
    ft.start_finetune()
    wait_idle(seg._session)
    written = ft.save_model(str(tmp_path / "tuned"))
    assert str(written).endswith(".safetensors")
    model, metadata = load_checkpoint(written)
    provenance = metadata["provenance"]
    assert provenance["base_model"] == str(tiny_checkpoint)
    assert provenance["corrected_images"] == 1
    assert provenance["finetune_steps"] == STEPS
    state = seg._session.current()
    assert _same_weights(_weights(state.model), _weights(model))


def test_training_list_add_and_remove(corrected, tiny_checkpoint):
    viewer, seg, ft, image, disk, before = corrected
    assert ft.add_pair()
    title = f"lesion ← mask ({tiny_checkpoint.name})"
    assert ft.training_list.choices == (title,)
    ft.training_list.value = [title]
    ft.remove_selected()
    assert ft.pairs == [] and ft.training_list.choices == ()


def _assert_rejected(ft, seg, notes, text, layers_before, viewer):
    state = seg._session.current()
    weights = _weights(state.model)
    assert ft.start_finetune() is None
    assert notes.matching(text), notes.messages
    assert _same_weights(weights, _weights(state.model))
    for name, data in layers_before.items():
        np.testing.assert_array_equal(np.asarray(viewer.layers[name].data), data)


def _snapshot(viewer) -> dict[str, np.ndarray]:
    return {layer.name: np.array(layer.data) for layer in viewer.layers}


def test_no_corrections_is_a_notification(sgdc, wait_segment, notes):
    viewer, seg, ft, image, _ = sgdc
    wait_segment(seg.run_segment())
    ft.reset_choices()
    ft.image_layer.value = image
    ft.labels_layer.value = viewer.layers["lesion mask"]
    viewer.layers["lesion mask"].data = np.zeros((192, 192), np.uint8)  # erase everything...
    seg.threshold.value = 0.0  # ...then the slider re-thresholds: the mask equals the prediction again
    _assert_rejected(ft, seg, notes, "No corrections", _snapshot(viewer), viewer)


def test_labels_shape_mismatch_is_a_notification(sgdc, wait_segment, notes):
    viewer, seg, ft, image, _ = sgdc
    wait_segment(seg.run_segment())
    other = viewer.add_labels(np.ones((100, 120), np.uint8), name="wrong size")
    ft.reset_choices()
    ft.image_layer.value = image
    ft.labels_layer.value = other
    _assert_rejected(ft, seg, notes, "must match pixel for pixel", _snapshot(viewer), viewer)


def test_all_background_labels_are_a_notification(sgdc, wait_segment, notes):
    viewer, seg, ft, image, _ = sgdc
    wait_segment(seg.run_segment())
    empty = viewer.add_labels(np.zeros((192, 192), np.uint8), name="empty")
    ft.reset_choices()
    ft.image_layer.value = image
    ft.labels_layer.value = empty
    _assert_rejected(ft, seg, notes, "all background", _snapshot(viewer), viewer)


def test_wrong_layer_type_is_a_notification(sgdc, wait_segment, notes):
    viewer, seg, ft, image, _ = sgdc
    wait_segment(seg.run_segment())
    points = viewer.add_points(np.array([[10.0, 10.0]]), name="clicks")
    ft.reset_choices()
    ft.image_layer.value = image
    ft.labels_layer.value = points
    _assert_rejected(ft, seg, notes, "not Labels", _snapshot(viewer), viewer)


def test_pairs_of_another_model_are_never_trained_into_the_current_one(corrected, tmp_path, tiny_checkpoint,
                                                                       wait_segment, wait_idle, notes):
    from napari_sgdc.checkpoints import save_checkpoint
    from napari_sgdc.model import build_model, tiny_config

    viewer, seg, ft, image, disk, _ = corrected
    assert ft.add_pair()
    first = seg._session.current()
    first_weights = _weights(first.model)
    torch.manual_seed(1)
    other_path = save_checkpoint(tmp_path / "other.safetensors", build_model(tiny_config()).eval())
    assert seg.load_checkpoint(str(other_path))
    other = seg._session.current()
    other_weights = _weights(other.model)

    # only pairs of the first model: refused, nothing trained
    assert ft.start_finetune() is None
    assert notes.matching("No corrections for 'other.safetensors'"), notes.messages
    assert notes.matching(tiny_checkpoint.name)
    assert _same_weights(other_weights, _weights(other.model)) and seg._session.busy.idle

    # a pair made with the other model: trained alone, the first model's pair left out with a note
    second = viewer.add_image(np.array(image.data), name="lesion 2", rgb=True)
    assert wait_segment(seg.run_segment()).error is None
    _paint_correction(viewer.layers["lesion 2 mask"], disk)
    ft.labels_layer.value = viewer.layers["lesion 2 mask"]
    assert ft.image_layer.value is second
    assert ft.start_finetune() is not None
    wait_idle(seg._session)
    assert notes.matching("left out 1 pair(s) made for tiny_semantic.safetensors: lesion"), notes.messages
    assert other.runs[-1]["images"] == ["lesion 2"]
    assert not _same_weights(other_weights, _weights(other.model))
    assert _same_weights(first_weights, _weights(first.model))
    assert sorted(ft.training_list.choices) == sorted([
        f"lesion ← mask ({tiny_checkpoint.name})", "lesion 2 ← mask (other.safetensors)"])


def test_finetune_loads_the_picked_model_when_nothing_was_segmented_yet(make_napari_viewer, tiny_checkpoint,
                                                                        wait_idle, notes):
    from conftest import lesion_image

    viewer = make_napari_viewer()
    _, seg = viewer.window.add_plugin_dock_widget("napari-sgdc", "SGDC Segment")
    _, ft = viewer.window.add_plugin_dock_widget("napari-sgdc", "SGDC Fine-tune")
    image, disk = lesion_image()
    layer = viewer.add_image(image, name="lesion", rgb=True)
    outline = viewer.add_labels(disk.astype(np.uint8), name="my outline")  # drawn by hand, no Segment run
    source = str(tiny_checkpoint)
    seg._session.current_source = source  # picked in the model picker, not loaded yet
    assert source not in seg._session.models
    ft.reset_choices()
    ft.image_layer.value = layer
    ft.labels_layer.value = outline
    _short_run(ft, steps=2)
    ft.start_finetune()
    wait_idle(seg._session)
    assert not notes.matching("Could not load model"), notes.messages
    assert source in seg._session.models


def test_dock_opens_without_matplotlib_and_shows_the_losses_as_text(corrected, wait_idle, monkeypatch, notes):
    import sys

    from napari_sgdc._napari._finetune_widget import FinetuneWidget

    for name in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)  # as in a plugin-manager install without the extra
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    viewer, seg, _, image, disk, _ = corrected
    ft = FinetuneWidget(viewer)
    assert ft.axes is None and ft.plot.text == "fine-tune loss: no run yet"
    ft.reset_choices()
    ft.image_layer.value = image
    ft.labels_layer.value = viewer.layers["lesion mask"]
    _short_run(ft, steps=3)
    assert ft.start_finetune() is not None
    wait_idle(seg._session)
    assert not notes.matching("failed"), notes.messages
    losses = ft.history.losses
    assert len(losses) == 3
    assert ft.plot.text.startswith(f"loss {losses[0]:.3f} → {losses[-1]:.3f} (3 steps) ")
