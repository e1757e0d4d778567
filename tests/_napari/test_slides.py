"""GUI tests of whole slides in the widgets: field of view, rectangle and whole-slide targets,
store-backed multiscale result layers, and fine-tuning on a corrected slide region."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/_slides.py

from _slides import PixelModel, synthetic_rgb, write_slide  # noqa: E402

pytestmark = pytest.mark.gui

SIZE = (1280, 1536)


@pytest.fixture(scope="module")
def slide_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slides")
    rgb = synthetic_rgb(SIZE, seed=3, n_nuclei=200)
    return write_slide(folder / "synth.ome.tif", rgb, mpp=0.25, levels=3), rgb


@pytest.fixture
def slide_viewer(make_napari_viewer, slide_file, tmp_path, monkeypatch):
    """A viewer with SGDC Segment docked, the pixel-wise fake model picked and the slide opened
    through napari-sgdc's reader (a copy per test: the whole-slide store goes next to it)."""
    import shutil

    from napari_sgdc._napari import _wholeslide as ws
    from napari_sgdc.session import ModelState

    monkeypatch.setattr("napari_sgdc.grid.DEFAULT_TILE", 256)
    path = Path(shutil.copy(slide_file[0], tmp_path / "synth.ome.tif"))
    viewer = make_napari_viewer()
    _, seg = viewer.window.add_plugin_dock_widget("napari-sgdc", "SGDC Segment")
    [layer] = viewer.open(str(path), plugin="napari-sgdc")
    seg._session.models["pixel"] = ModelState("pixel", PixelModel())
    seg.model.reset_choices()
    seg.model.value = "pixel"
    seg.image_layer.value = layer
    return viewer, seg, layer, path


def _show(viewer, layer, y0, x0, y1, x1):
    """Centres the camera on the level-0 box and zooms so it just fills the canvas."""
    from napari_sgdc._napari._wholeslide import _camera

    camera = _camera(viewer)
    camera.center = tuple(layer.data_to_world(((y0 + y1) / 2 - 0.5, (x0 + x1) / 2 - 0.5)))
    size = np.asarray(viewer.canvas.viewbox_size(viewer.layers), dtype=float)
    world = np.asarray(layer.scale[-2:], dtype=float) * (y1 - y0, x1 - x0)
    camera.zoom = float(np.min(size / world))  # the tighter axis fills; the other shows more


def _shown(widget) -> bool:
    return not widget.native.isHidden()  # (.visible is False while the viewer window is not shown)


def _done_tiles(store: Path) -> set[tuple[int, int]]:
    return {tuple(int(v) for v in p.stem.split("_")) for p in (store / "tiles").glob("*.npz")}


def _assert_lazy_multiscale(layer):
    import dask.array as da

    assert layer.multiscale
    assert len(layer.data) >= 2
    assert all(isinstance(level, da.Array) for level in layer.data), [type(level) for level in layer.data]


def test_slide_layer_shows_the_slide_targets_and_a_plain_image_does_not(slide_viewer):
    viewer, seg, layer, _ = slide_viewer
    assert layer.multiscale and _shown(seg.target) and not _shown(seg.tile)
    image = viewer.add_image(np.zeros((64, 64, 3), np.uint8), rgb=True, name="plain")
    seg.image_layer.value = image
    assert not _shown(seg.target) and _shown(seg.tile) and _shown(seg.planes)


def test_field_of_view_segments_only_the_visible_region(slide_viewer, wait_segment, notes):
    viewer, seg, layer, _ = slide_viewer
    _show(viewer, layer, 300, 300, 500, 500)
    expected = seg_roi = None
    from napari_sgdc._napari import _wholeslide as ws

    seg_roi = ws.visible_roi(viewer, layer)
    x, y, w, h = seg_roi
    height, width = np.asarray(viewer.canvas.viewbox_size(viewer.layers)) / ws._camera(viewer).zoom / 0.25
    assert abs(w - width) <= 2 and abs(h - height) <= 2  # canvas size / zoom, in level-0 px
    assert x <= 300 and y <= 300 and x + w >= 500 and y + h >= 500
    assert w < SIZE[1] and h < SIZE[0]
    seg.target.value = ws.TARGET_VIEW
    job = seg.run_segment()
    outcome = wait_segment(job)
    assert outcome.error is None and not outcome.cancelled, notes.messages
    assert job.roi == seg_roi
    expected = {(i, j) for i in range(y // 256, (y + h - 1) // 256 + 1) for j in range(x // 256, (x + w - 1) // 256 + 1)}
    assert _done_tiles(job.store) <= expected and len(_done_tiles(job.store)) >= 1
    assert job.store.parent.name == "slides" and "sgdc-cache" in str(job.store)
    nuclei = viewer.layers[f"{layer.name} view nuclei"]
    _assert_lazy_multiscale(nuclei)
    level0 = np.asarray(nuclei.data[0])
    ys, xs = np.nonzero(level0)
    assert len(ys) and ys.min() >= y - 64 and xs.min() >= x - 64 and ys.max() < y + h + 64 and xs.max() < x + w + 64
    # aligned with the slide in µm (same grid: 0.25 µm/px)
    np.testing.assert_allclose(nuclei.scale, layer.scale)
    np.testing.assert_allclose(nuclei.translate, layer.translate)
    assert seg._session.busy.idle


def test_a_slide_run_uses_the_models_tuned_marker_threshold(slide_viewer, wait_segment, notes):
    from napari_sgdc._napari import _wholeslide as ws

    viewer, seg, layer, _ = slide_viewer
    seg._session.models["pixel"].model.config.split_level = 0.3  # as training would tune it
    _show(viewer, layer, 300, 300, 500, 500)
    seg.target.value = ws.TARGET_VIEW
    job = seg.run_segment()
    outcome = wait_segment(job)
    assert outcome.error is None, notes.messages
    assert job.options.split_level == 0.3  # what the store was written with
    assert seg.split_level.value == pytest.approx(0.3)  # and what the slider now shows


def test_rectangle_target_segments_the_first_rectangle(slide_viewer, wait_segment, notes):
    viewer, seg, layer, _ = slide_viewer
    from napari_sgdc._napari import _wholeslide as ws

    box = np.array([[700, 900], [700, 1300], [1000, 1300], [1000, 900]], dtype=float) * 0.25  # µm
    viewer.add_shapes([box], shape_type="rectangle", name="roi")
    seg.target.value = ws.TARGET_RECTANGLE
    assert _shown(seg.shapes_layer)
    job = seg.run_segment()
    outcome = wait_segment(job)
    assert outcome.error is None, notes.messages
    assert job.roi == (900, 700, 400, 300)
    assert _done_tiles(job.store) <= {(2, 3), (2, 4), (2, 5), (3, 3), (3, 4), (3, 5)}
    _assert_lazy_multiscale(viewer.layers[f"{layer.name} rectangle nuclei"])


def test_rectangle_target_without_shapes_says_so(slide_viewer, notes):
    _, seg, _, _ = slide_viewer
    seg.target.value = "rectangle"
    assert seg.run_segment() is None
    assert notes.matching("no rectangle")
    assert seg._session.busy.idle


def test_whole_slide_runs_in_background_cancels_and_resumes(slide_viewer, qtbot, wait_segment, notes):
    from qtpy.QtCore import QTimer

    from napari_sgdc._napari import _wholeslide as ws

    viewer, seg, layer, path = slide_viewer
    seg._session.models["pixel"].model.delay = 0.15
    seg.target.value = ws.TARGET_WHOLE
    assert _shown(seg.output)
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(20)
    job = seg.run_segment()
    assert job is not None and job.store == path.parent / "synth.ome.zarr"
    assert not seg._session.busy.idle
    qtbot.waitUntil(lambda: job.done >= 2, timeout=30_000)
    assert len(ticks) >= 5  # the event loop kept running while tiles were segmented
    assert job.total > job.done >= 2 and job.pbar.n >= 2
    assert seg.run_segment() is None and notes.matching("busy")  # the guard holds
    seg.cancel()
    outcome = wait_segment(job)
    timer.stop()
    assert outcome.cancelled and seg._session.busy.idle
    done_before = len(_done_tiles(job.store))
    assert 2 <= done_before < job.total
    assert ws.store_state(job.store) == "partial"
    assert f"{layer.name} nuclei" not in viewer.layers

    seg._session.models["pixel"].model.delay = 0.0
    again = seg.run_segment()
    assert again is not None and again.resume and notes.matching("resuming")
    outcome = wait_segment(again)
    assert outcome.error is None and not outcome.cancelled, notes.messages
    assert outcome.value.tiles_resumed == done_before
    assert ws.store_state(again.store) == "complete"
    for kind in ("nuclei", "probability", "boundary"):
        _assert_lazy_multiscale(viewer.layers[f"{layer.name} {kind}"])
    assert outcome.value.n_objects > 50

    # a finished store is opened, never run again or replaced
    stamp = (again.store / ".zattrs").stat().st_mtime_ns
    assert seg.run_segment() is None and notes.matching("already segmented")
    assert (again.store / ".zattrs").stat().st_mtime_ns == stamp
    assert f"{layer.name} nuclei" in viewer.layers


def test_whole_slide_refuses_a_foreign_store(slide_viewer, notes):
    viewer, seg, layer, path = slide_viewer
    (path.parent / "synth.ome.zarr").mkdir()
    seg.target.value = "whole slide"
    assert seg.run_segment() is None and notes.matching("not a napari-sgdc slide store")


def test_finetune_on_a_slide_region_trains_on_the_crop(slide_viewer, slide_file, wait_segment, wait_idle, notes,
                                                       monkeypatch):
    import napari_sgdc.train as train

    viewer, seg, layer, _ = slide_viewer
    _, ft = viewer.window.add_plugin_dock_widget("napari-sgdc", "SGDC Fine-tune")
    _show(viewer, layer, 200, 300, 456, 556)
    seg.target.value = "field of view"
    assert wait_segment(seg.run_segment()).error is None, notes.messages
    ft.image_layer.value = layer
    assert _shown(ft.region_button)
    corrections = ft.correct_region()
    assert corrections is not None, notes.messages
    assert ft.labels_layer.value is corrections
    y0, x0, h, w = corrections.metadata["sgdc"]["box"]
    nuclei = viewer.layers[f"{layer.name} view nuclei"]
    np.testing.assert_array_equal(corrections.data, np.asarray(nuclei.data[0])[y0:y0 + h, x0:x0 + w])
    assert "no edits" in ft.update_edits()
    data = np.array(corrections.data)
    data[10:30, 10:30] = data.max() + 1  # a painted nucleus
    corrections.data = data
    assert "400 px" in ft.update_edits()

    seen = {}

    def fake_finetune(model, images, labels, **kwargs):
        seen["images"], seen["labels"] = images, labels
        from napari_sgdc.train import History

        return History(steps=2, total_steps=2, losses=[1.0, 0.5])

    monkeypatch.setattr(train, "finetune", fake_finetune)
    worker = ft.start_finetune()
    assert worker is not None, notes.messages
    wait_idle(seg._session)
    assert len(seen["images"]) == 1
    rgb = slide_file[1]
    np.testing.assert_array_equal(seen["images"][0], rgb[y0:y0 + h, x0:x0 + w])  # the crop the labels cover
    np.testing.assert_array_equal(seen["labels"][0], data)
    assert ft.pairs[0].image_name.startswith(layer.name)


def test_tta_is_offered_and_honoured_for_slides_and_images(slide_viewer, wait_segment, notes, monkeypatch):
    from napari_sgdc import inference
    from napari_sgdc._napari import _wholeslide as ws
    from napari_sgdc.wholeslide import open_store

    viewer, seg, layer, _ = slide_viewer
    assert _shown(seg.tta)  # offered on a slide (uncertainty and gates are not: slides have neither)
    seg.tta.value = True
    _show(viewer, layer, 300, 300, 400, 400)
    seg.target.value = ws.TARGET_VIEW
    job = seg.run_segment()
    outcome = wait_segment(job)
    assert outcome.error is None, notes.messages
    assert open_store(job.store).plan.tta  # the store was made with TTA (and a resume must match it)
    calls = []
    segment = inference.segment
    monkeypatch.setattr(inference, "segment", lambda *a, **k: calls.append(k["tta"]) or segment(*a, **k))
    seg.image_layer.value = viewer.add_image(np.zeros((64, 64, 3), np.uint8), rgb=True, name="plain")
    assert _shown(seg.tta)
    assert wait_segment(seg.run_segment()).error is None, notes.messages
    assert calls == [True]


def test_multi_dot_names_and_an_incomplete_store_say_so(make_napari_viewer, slide_file, tmp_path, notes):
    """Finding 14: ``case.01`` keeps its ``.01`` in the slide's and the store's layer names, and a store
    whose run stopped opens with "incomplete: N of M tiles" in its names, its metadata and a warning."""
    import shutil
    import threading

    from napari_sgdc.inference import Cancelled
    from napari_sgdc.wholeslide import open_store, segment_slide

    path = Path(shutil.copy(slide_file[0], tmp_path / "case.01.ome.tif"))
    cancel = threading.Event()
    with pytest.raises(Cancelled):
        segment_slide(PixelModel(), path, tmp_path / "case.01.ome.zarr", tile=256, margin=32, cancel=cancel,
                      progress=lambda done, total: done >= 3 and cancel.set())
    done, total = open_store(tmp_path / "case.01.ome.zarr").tiles_done
    assert 0 < done < total
    viewer = make_napari_viewer()
    [slide_layer] = viewer.open(str(path), plugin="napari-sgdc")
    assert slide_layer.name == "case.01.ome.tif"
    layers = viewer.open(str(tmp_path / "case.01.ome.zarr"), plugin="napari-sgdc")
    note = f"incomplete: {done} of {total} tiles"
    assert [layer.name for layer in layers] == [f"case.01 {kind} ({note})"
                                                for kind in ("probability", "boundary", "nuclei", "tissue")]
    assert all(layer.metadata["sgdc_store"]["incomplete"] == note for layer in layers)
    assert [layer.metadata["sgdc_store"]["kind"] for layer in layers] == ["probability", "boundary", "nuclei",
                                                                          "tissue"]
    assert notes.matching(f"case.01.ome.zarr: {note}")
    segment_slide(PixelModel(), path, tmp_path / "case.01.ome.zarr", tile=256, margin=32, resume=True)
    finished = viewer.open(str(tmp_path / "case.01.ome.zarr"), plugin="napari-sgdc")
    assert [layer.name for layer in finished][2] == "case.01 nuclei"
    assert finished[2].metadata["sgdc_store"]["incomplete"] == ""
