"""GUI tests of the "SGDC Segment" widget (pytest-qt + make_napari_viewer, under pytest-xvfb)."""

from __future__ import annotations

import time

import numpy as np
import pytest

pytestmark = pytest.mark.gui


def _forward_counter(model):
    """Counts the model's forward calls through a forward hook."""
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


def test_widgets_dock_through_the_plugin(make_napari_viewer):
    viewer = make_napari_viewer()
    dock_segment, segment_widget = viewer.window.add_plugin_dock_widget("napari-sgdc", "SGDC Segment")
    dock_finetune, finetune_widget = viewer.window.add_plugin_dock_widget("napari-sgdc", "SGDC Fine-tune")
    assert type(segment_widget).__name__ == "SegmentWidget"
    assert type(finetune_widget).__name__ == "FinetuneWidget"
    assert "SGDC Segment" in dock_segment.name and "SGDC Fine-tune" in dock_finetune.name
    assert segment_widget.model.value is None or segment_widget.model.value.startswith("built-in: ")


def test_segment_writes_four_aligned_layer_kinds_and_rerun_replaces(sgdc, wait_segment, notes):
    viewer, seg, _, image, _ = sgdc
    image.scale = (0.5, 2.0)
    image.translate = (10.0, -5.0)
    outcome = wait_segment(seg.run_segment())
    assert outcome.error is None and not outcome.cancelled, notes.messages

    name = image.name
    probability = viewer.layers[f"{name} probability"]
    mask = viewer.layers[f"{name} mask"]
    boundary = viewer.layers[f"{name} SGE boundary"]
    gate1 = [layer for layer in viewer.layers if layer.name.startswith(f"{name} gate1 sgdc@s")]
    gate2 = [layer for layer in viewer.layers if layer.name.startswith(f"{name} gate2 sgdc@s")]
    gates = gate1 + gate2
    assert type(probability).__name__ == "Image" and type(boundary).__name__ == "Image"
    assert type(mask).__name__ == "Labels"
    assert len(gate1) >= 1 and len(gate2) == len(gate1)
    assert all(type(g).__name__ == "Image" and not g.visible for g in gates)
    assert viewer.dims.ndim == 2  # one 2-D layer per gate: no stray dims slider
    for layer in (probability, mask, boundary):
        assert layer.data.shape == (192, 192)
        np.testing.assert_allclose(layer.scale, image.scale)
        np.testing.assert_allclose(layer.translate, image.translate)
    assert 0.0 <= probability.data.min() and probability.data.max() <= 1.0
    for gate in gates:
        stride = gate.metadata["sgdc"]["stride"]
        assert gate.data.shape == (-(-192 // stride), -(-192 // stride))
        np.testing.assert_allclose(gate.scale, np.asarray(image.scale) * stride)
        # gate pixel (0, 0) sits at the centre of the image pixels [0, stride) on both axes
        centre = np.asarray(image.data_to_world(((stride - 1) / 2, (stride - 1) / 2)))
        np.testing.assert_allclose(np.asarray(gate.data_to_world((0, 0))), centre)

    n_layers = len(viewer.layers)
    mask_before = mask
    outcome = wait_segment(seg.run_segment())
    assert outcome.error is None
    assert len(viewer.layers) == n_layers
    assert viewer.layers[f"{name} mask"] is mask_before


def test_threshold_slider_moves_mask_without_a_forward_pass(sgdc, wait_segment):
    from napari_sgdc.postprocess import PostprocessOptions, postprocess

    viewer, seg, _, image, _ = sgdc
    wait_segment(seg.run_segment())
    state = seg._session.current()
    calls, handle = _forward_counter(state.model)
    try:
        probability = viewer.layers["lesion probability"].data
        mask_layer = viewer.layers["lesion mask"]
        before = np.array(mask_layer.data)
        new_threshold = round(float(np.quantile(probability, 0.5)), 3)
        seg.threshold.value = new_threshold
        after = np.asarray(mask_layer.data)
        options = PostprocessOptions(seg.threshold.value, seg.split_level.value, seg.min_size.value)
        assert seg._session.options == options
        expected, _ = postprocess(probability, viewer.layers["lesion SGE boundary"].data, options)
        np.testing.assert_array_equal(after > 0, expected)
        assert not np.any((after > 0) & (probability <= seg.threshold.value))
        assert not np.array_equal(after, before)
        assert calls == []
    finally:
        handle.remove()


def test_instance_sliders_relabel_from_cache(make_napari_viewer, tiny_instance_checkpoint, wait_segment):
    from napari_sgdc.postprocess import PostprocessOptions, postprocess

    viewer = make_napari_viewer()
    _, seg = viewer.window.add_plugin_dock_widget("napari-sgdc", "SGDC Segment")
    rng = np.random.default_rng(1)
    image = viewer.add_image(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8), name="tile", rgb=True)
    assert seg.load_checkpoint(str(tiny_instance_checkpoint))
    seg.image_layer.value = image
    wait_segment(seg.run_segment())
    calls, handle = _forward_counter(seg._session.current().model)
    try:
        probability = viewer.layers["tile probability"].data
        boundary = viewer.layers["tile SGE boundary"].data
        seg.threshold.value = round(float(np.quantile(probability, 0.4)), 3)
        seg.split_level.value = round(float(np.quantile(boundary, 0.7)), 3)
        seg.min_size.value = 7
        options = PostprocessOptions(seg.threshold.value, seg.split_level.value, 7)
        _, expected = postprocess(probability, boundary, options, instances=True)
        labels = viewer.layers["tile mask"].data
        assert labels.dtype == np.int32
        np.testing.assert_array_equal(labels, expected)
        assert calls == []
    finally:
        handle.remove()


def _assert_disjoint_ids(labels) -> None:
    ids = [set(np.unique(plane).tolist()) - {0} for plane in labels]
    assert all(ids), "every plane should hold instances"
    for i in range(len(ids)):
        for j in range(i + 1, len(ids)):
            assert not ids[i] & ids[j], f"planes {i} and {j} share instance ids {sorted(ids[i] & ids[j])[:5]}"


def test_stack_instance_ids_stay_unique_across_planes_after_a_slider_move(
        make_napari_viewer, tiny_instance_checkpoint, wait_segment):
    from napari_sgdc.postprocess import PostprocessOptions, postprocess

    viewer = make_napari_viewer()
    _, seg = viewer.window.add_plugin_dock_widget("napari-sgdc", "SGDC Segment")
    stack = np.random.default_rng(2).integers(0, 255, (3, 64, 96), dtype=np.uint8)
    image = viewer.add_image(stack, name="stack")
    assert seg.load_checkpoint(str(tiny_instance_checkpoint))
    seg.image_layer.value = image
    seg.gates.value = False
    wait_segment(seg.run_segment())
    probability = np.asarray(viewer.layers["stack probability"].data)
    boundary = np.asarray(viewer.layers["stack SGE boundary"].data)
    written = np.asarray(viewer.layers["stack mask"].data)  # after segmenting: the same one stage
    np.testing.assert_array_equal(written, postprocess(probability, boundary, seg._session.options,
                                                       instances=True)[1])
    seg.min_size.value = 3
    seg.split_level.value = round(float(np.quantile(boundary, 0.7)), 3)
    seg.threshold.value = round(float(np.quantile(probability, 0.5)), 3)
    labels = np.asarray(viewer.layers["stack mask"].data)
    options = PostprocessOptions(seg.threshold.value, seg.split_level.value, 3)
    np.testing.assert_array_equal(labels, postprocess(probability, boundary, options, instances=True)[1])
    _assert_disjoint_ids(labels)


def test_hover_model_sliders_split_on_its_separation_map_without_a_forward_pass(
        make_napari_viewer, tiny_hover_checkpoint, wait_segment, monkeypatch):
    from napari_sgdc.inference import segment
    from napari_sgdc.checkpoints import load_checkpoint
    from napari_sgdc.postprocess import PostprocessOptions, postprocess

    viewer = make_napari_viewer()
    _, seg = viewer.window.add_plugin_dock_widget("napari-sgdc", "SGDC Segment")
    rgb = np.random.default_rng(4).integers(0, 255, (80, 96, 3), dtype=np.uint8)
    image = viewer.add_image(rgb, name="hne", rgb=True)
    assert seg.load_checkpoint(str(tiny_hover_checkpoint))
    seg.image_layer.value = image
    seg.gates.value = False
    wait_segment(seg.run_segment())
    reference = segment(load_checkpoint(tiny_hover_checkpoint)[0], rgb, tile=seg.tile.value)
    assert "hne SGE boundary" in viewer.layers  # the SGE boundary map stays a layer
    np.testing.assert_allclose(np.asarray(viewer.layers["hne probability"].data), reference.probability, atol=1e-5)

    def no_forward(*args, **kwargs):
        raise AssertionError("a slider ran the network")

    monkeypatch.setattr("napari_sgdc.inference.segment", no_forward)
    seg.min_size.value = 2
    seg.split_level.value = round(float(np.quantile(reference.separation, 0.6)), 3)
    seg.threshold.value = round(float(np.quantile(reference.probability, 0.4)), 3)
    options = PostprocessOptions(seg.threshold.value, seg.split_level.value, 2)
    expected = postprocess(reference.probability, reference.separation, options, instances=True)[1]
    np.testing.assert_array_equal(np.asarray(viewer.layers["hne mask"].data), expected)
    boundary_split = postprocess(reference.probability, reference.boundary, options, instances=True)[1]
    assert not np.array_equal(expected, boundary_split)  # it really decoded the HoVer maps


def test_each_model_brings_its_tuned_defaults_once_per_switch(
        make_napari_viewer, tiny_instance_checkpoint, tmp_path, wait_segment):
    from napari_sgdc.checkpoints import load_checkpoint, save_checkpoint
    from napari_sgdc.postprocess import PostprocessOptions, postprocess

    model = load_checkpoint(tiny_instance_checkpoint)[0]
    model.config.split_level, model.config.threshold, model.config.min_size = 0.3, 0.45, 7  # as tuning would
    tuned = save_checkpoint(tmp_path / "tuned.safetensors", model)
    viewer = make_napari_viewer()
    _, seg = viewer.window.add_plugin_dock_widget("napari-sgdc", "SGDC Segment")
    rgb = np.random.default_rng(5).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    image = viewer.add_image(rgb, name="hne", rgb=True)
    seg.image_layer.value = image
    seg.gates.value = False
    assert seg.load_checkpoint(str(tiny_instance_checkpoint))
    wait_segment(seg.run_segment())
    assert (seg.threshold.value, seg.split_level.value, seg.min_size.value) == (0.5, 0.5, 20)
    untuned_source = seg.model.value
    assert seg.load_checkpoint(str(tuned))
    wait_segment(seg.run_segment())
    assert seg.split_level.value == pytest.approx(0.3)
    assert seg.threshold.value == pytest.approx(0.45) and seg.min_size.value == 7
    cache = seg._session.results[image]
    split = cache.boundary if cache.separation is None else cache.separation
    expected = postprocess(cache.probability[0], split[0], PostprocessOptions(0.45, 0.3, 7), instances=True)[1]
    np.testing.assert_array_equal(np.asarray(viewer.layers["hne mask"].data), expected)
    seg.split_level.value = 0.4  # the user's choice holds while the model stays
    wait_segment(seg.run_segment())
    assert seg.split_level.value == pytest.approx(0.4)
    seg.model.value = untuned_source  # switching back brings that model's values again
    wait_segment(seg.run_segment())
    assert (seg.threshold.value, seg.split_level.value, seg.min_size.value) == (0.5, 0.5, 20)


def test_event_loop_ticks_while_segmenting_with_progress_per_tile(make_napari_viewer, tiny_checkpoint, qtbot,
                                                                   wait_segment):
    from qtpy.QtCore import QTimer

    viewer = make_napari_viewer()
    _, seg = viewer.window.add_plugin_dock_widget("napari-sgdc", "SGDC Segment")
    image = viewer.add_image(np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8),
                             name="big", rgb=True)
    assert seg.load_checkpoint(str(tiny_checkpoint))
    seg.image_layer.value = image
    seg.tile.value = 64
    seg.gates.value = False
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(10)
    try:
        job = seg.run_segment()
        started = time.perf_counter()
        outcome = wait_segment(job)
        finished = time.perf_counter()
    finally:
        timer.stop()
    assert outcome.error is None
    ticks_during = [t for t in ticks if started <= t <= finished]
    assert len(ticks_during) >= 5, (len(ticks_during), finished - started)
    assert job.pbar.total > 1 and job.pbar.n == job.pbar.total


def test_cancel_segmentation_adds_no_layers(make_napari_viewer, tiny_checkpoint, qtbot, wait_segment, notes):
    viewer = make_napari_viewer()
    _, seg = viewer.window.add_plugin_dock_widget("napari-sgdc", "SGDC Segment")
    image = viewer.add_image(np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8),
                             name="big", rgb=True)
    assert seg.load_checkpoint(str(tiny_checkpoint))
    seg.image_layer.value = image
    seg.tile.value = 64
    job = seg.run_segment()
    qtbot.waitUntil(lambda: job.pbar.n >= 1, timeout=20_000)
    seg.cancel_button.changed.emit(True)
    outcome = wait_segment(job, timeout=5_000)
    assert outcome.cancelled
    assert [layer.name for layer in viewer.layers] == ["big"]
    assert notes.matching("cancelled")
    assert seg.segment_button.enabled and not seg.cancel_button.enabled


def test_stack_current_plane_only(make_napari_viewer, tiny_checkpoint, wait_segment):
    viewer = make_napari_viewer()
    _, seg = viewer.window.add_plugin_dock_widget("napari-sgdc", "SGDC Segment")
    stack = np.random.default_rng(0).integers(0, 255, (3, 64, 96), dtype=np.uint8)
    image = viewer.add_image(stack, name="stack", scale=(2.0, 0.5, 0.5))
    assert seg.load_checkpoint(str(tiny_checkpoint))
    seg.image_layer.value = image
    seg.planes.value = "current"
    viewer.dims.set_point(0, 2.0)  # world z = 2.0 -> plane 1
    wait_segment(seg.run_segment())
    probability = viewer.layers["stack probability"]
    assert probability.data.shape == (3, 64, 96)
    np.testing.assert_allclose(probability.scale, image.scale)
    filled = [bool(np.any(probability.data[i])) for i in range(3)]
    assert filled == [False, True, False]
    gates = [layer for layer in viewer.layers if layer.name.startswith(("stack gate1 ", "stack gate2 "))]
    assert gates and all(gate.data.shape[0] == 3 and gate.ndim == 3 for gate in gates)
    assert viewer.dims.ndim == 3


def test_missing_model_and_bad_checkpoint_are_notifications(make_napari_viewer, monkeypatch, tmp_path, notes):
    from napari_sgdc._napari import _segment_widget

    monkeypatch.setattr(_segment_widget, "available_builtins", lambda: [])
    viewer = make_napari_viewer()
    _, seg = viewer.window.add_plugin_dock_widget("napari-sgdc", "SGDC Segment")
    assert "No built-in models" in seg.model_note.value
    viewer.add_image(np.zeros((32, 32), np.uint8), name="img")
    seg.reset_choices()
    assert seg.run_segment() is None
    assert notes.matching("No model picked")
    bad = tmp_path / "not_a_model.safetensors"
    bad.write_bytes(b"junk")
    assert not seg.load_checkpoint(str(bad))
    assert notes.matching("Could not load checkpoint")


def test_shortcut_runs_segment(sgdc, wait_segment):
    from napari_sgdc._napari._segment_widget import SEGMENT_SHORTCUT

    viewer, seg, _, _, _ = sgdc
    bound = [callback for key, callback in viewer.keymap.items() if str(key) == "Shift+S"]
    assert SEGMENT_SHORTCUT == "Shift-S" and len(bound) == 1
    bound[0](viewer)
    assert seg.job is not None
    outcome = wait_segment(seg.job)
    assert outcome.error is None and "lesion mask" in viewer.layers


def test_out_of_range_slider_value_is_a_notification(sgdc, wait_segment, notes):
    viewer, seg, _, image, _ = sgdc
    wait_segment(seg.run_segment())
    options = seg._session.options
    before = np.array(viewer.layers["lesion mask"].data)
    seg.threshold.max = 2.0  # e.g. a script widened the range
    seg.threshold.value = 1.5
    assert notes.matching("threshold must be a number in [0, 1]"), notes.messages
    assert seg._session.options == options
    np.testing.assert_array_equal(viewer.layers["lesion mask"].data, before)


def test_pickers_follow_the_image_the_user_opens_or_selects(sgdc, wait_segment):
    viewer, seg, ft, lesion, _ = sgdc
    wait_segment(seg.run_segment())
    second = viewer.add_image(np.random.default_rng(3).integers(0, 255, (64, 80, 3), dtype=np.uint8),
                              name="second", rgb=True)
    assert seg.image_layer.value is second and ft.image_layer.value is second
    [shortcut] = [callback for key, callback in viewer.keymap.items() if str(key) == "Shift+S"]
    shortcut(viewer)
    wait_segment(seg.job)
    assert "second mask" in viewer.layers and viewer.layers["second mask"].data.shape == (64, 80)
    viewer.layers.selection.active = lesion
    assert seg.image_layer.value is lesion and ft.image_layer.value is lesion
    assert ft.labels_layer.value is viewer.layers["lesion mask"]
    viewer.layers.selection.active = viewer.layers["second mask"]  # a result layer picks its image
    assert seg.image_layer.value is second and ft.image_layer.value is second
    viewer.layers.selection.active = lesion
    job = seg.run_segment()
    assert job.image is lesion
    wait_segment(job)


def test_a_second_job_is_refused_while_one_runs(make_napari_viewer, tiny_checkpoint, wait_segment, notes):
    from napari_sgdc.session import Job

    viewer = make_napari_viewer()
    _, seg = viewer.window.add_plugin_dock_widget("napari-sgdc", "SGDC Segment")
    _, ft = viewer.window.add_plugin_dock_widget("napari-sgdc", "SGDC Fine-tune")
    viewer.add_image(np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8), name="big", rgb=True)
    assert seg.load_checkpoint(str(tiny_checkpoint))
    seg.tile.value = 64
    job = seg.run_segment()
    session = seg._session
    assert session.busy.job is Job.SEGMENT and str(session.busy) == "segmenting big"
    assert seg.run_segment() is None and ft.start_finetune() is None and not ft.undo()
    assert len(notes.matching("SGDC is busy (segmenting big)")) == 3
    seg.cancel()
    wait_segment(job, timeout=10_000)
    assert session.busy.idle


def test_image_scale_and_bf16_settings_reach_segment(make_napari_viewer, tiny_checkpoint, tmp_path, wait_segment,
                                                     monkeypatch):
    import napari_sgdc.inference as inference
    from napari_sgdc.checkpoints import load_checkpoint

    nuclei_like = _save_scaled_model(tmp_path)
    calls = []
    real_segment = inference.segment

    def spy(*args, **kwargs):
        calls.append({key: kwargs.get(key) for key in ("mpp", "amp")})
        return real_segment(*args, **kwargs)

    monkeypatch.setattr(inference, "segment", spy)
    viewer, seg, image = _scaled_model_on_an_image(make_napari_viewer, nuclei_like, (64, 96), seed=6)
    rgb = image.data
    seg.mpp.value = 0.5  # a 20x image for a 40x model
    seg.amp.value = True
    wait_segment(seg.run_segment())
    assert calls[-1] == {"mpp": 0.5, "amp": True}
    expected = real_segment(load_checkpoint(nuclei_like)[0], rgb, tile=seg.tile.value, mpp=0.5, amp=True)
    np.testing.assert_allclose(np.asarray(viewer.layers["hne20x probability"].data), expected.probability, atol=1e-5)
    assert seg.status.value.endswith("at 0.5 µm/px")
    seg.mpp.value = 0.0  # 0: the layer's own scale, when it is a length
    image.units = ("µm", "µm")
    image.scale = (0.5, 0.5)
    wait_segment(seg.run_segment())
    assert calls[-1]["mpp"] == pytest.approx(0.5)
    image.units = ("pixel", "pixel")  # in pixels: the image is at the model's scale
    wait_segment(seg.run_segment())
    assert calls[-1]["mpp"] is None and seg.status.value.endswith(" s")
    image.units = ("µm", "µm")
    seg.mpp.value = 0.25  # the field wins over the layer's scale
    wait_segment(seg.run_segment())
    assert calls[-1]["mpp"] == 0.25
    assert seg.load_checkpoint(str(tiny_checkpoint))  # records no scale: the field is ignored, not an error
    seg.amp.value = False
    seg.mpp.value = 0.5
    outcome = wait_segment(seg.run_segment())
    assert outcome.error is None and calls[-1] == {"mpp": None, "amp": False}


def _scaled_model_on_an_image(make_napari_viewer, checkpoint, shape, seed):
    """A viewer with SGDC Segment holding `checkpoint` and a random RGB image 'hne20x' of `shape`."""
    viewer = make_napari_viewer()
    _, seg = viewer.window.add_plugin_dock_widget("napari-sgdc", "SGDC Segment")
    rgb = np.random.default_rng(seed).integers(0, 255, (*shape, 3), dtype=np.uint8)
    image = viewer.add_image(rgb, name="hne20x", rgb=True)
    seg.image_layer.value = image
    seg.gates.value = False
    assert seg.load_checkpoint(str(checkpoint))
    return viewer, seg, image


def _save_scaled_model(folder):
    import torch

    from napari_sgdc.checkpoints import save_checkpoint
    from napari_sgdc.model import build_model, tiny_config

    torch.manual_seed(0)
    model = build_model(tiny_config(task="instance", mpp=0.25)).eval()
    return save_checkpoint(folder / "scaled.safetensors", model)


def test_corrections_fine_tune_at_the_scale_the_image_was_segmented_at(make_napari_viewer, tmp_path,
                                                                       wait_segment, wait_idle, monkeypatch):
    import napari_sgdc.train as train

    scaled = _save_scaled_model(tmp_path)
    seen = []
    real_finetune = train.finetune

    def spy(model, images, labels, *args, **kwargs):
        seen.append((kwargs.get("mpp"), [image.shape[:2] for image in images]))
        return real_finetune(model, images, labels, *args, **kwargs)

    monkeypatch.setattr(train, "finetune", spy)
    viewer, seg, image = _scaled_model_on_an_image(make_napari_viewer, scaled, (48, 64), seed=7)
    _, ft = viewer.window.add_plugin_dock_widget("napari-sgdc", "SGDC Fine-tune")
    seg.mpp.value = 0.5  # a 20x image for the 40x model
    assert wait_segment(seg.run_segment()).error is None
    assert seg._session.results[image].mpp == 0.5
    mask = viewer.layers["hne20x mask"]
    mask.data_setitem(np.nonzero(np.pad(np.ones((10, 10), bool), ((10, 28), (20, 34)))), 9)  # a painted nucleus
    seg.mpp.value = 0.0  # changed afterwards: the pair keeps the scale its image was segmented at
    ft.reset_choices()
    ft.image_layer.value = image
    ft.labels_layer.value = mask
    ft.advanced.value = True
    ft.steps.value = 1
    assert ft.start_finetune() is not None
    wait_idle(seg._session)
    assert seen == [([0.5], [(48, 64)])] and ft.pairs[0].mpp == 0.5


def test_postprocessing_runs_once_per_segment_click(sgdc, wait_segment, monkeypatch):
    import importlib

    viewer, seg, _, image, _ = sgdc
    calls = []
    module = importlib.import_module("napari_sgdc.postprocess")  # (the package exports a function of this name)
    real = module.postprocess

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "postprocess", counting)
    monkeypatch.setattr(importlib.import_module("napari_sgdc.inference"), "postprocess", counting)
    for _ in range(2):  # the first click also adopts the model's defaults; the second reuses them
        calls.clear()
        assert wait_segment(seg.run_segment()).error is None
        assert len(calls) == 1
    written = np.asarray(viewer.layers["lesion mask"].data)
    cache = seg._session.results[image]
    np.testing.assert_array_equal(written, cache.postprocessed(seg._session.options)[0])  # what a slider would show
    calls.clear()
    seg.threshold.value = 0.3  # re-thresholding from the cache: one more, no forward pass
    assert len(calls) == 1
