"""GUI tests of what the Fine-tune dock does with corrections: the edited-region count while
painting, the written mask passed as `predictions`, and the autosave / recovery of the
training list (including after the napari process is killed during a fine-tune)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gui

HERE = Path(__file__).parent


def _ready(seg, ft, viewer, image, wait_segment):
    assert wait_segment(seg.run_segment()).error is None
    mask = viewer.layers[f"{image.name} mask"]
    ft.reset_choices()
    ft.image_layer.value = image
    ft.labels_layer.value = mask
    return mask


def _background_square(mask, size: int = 10) -> tuple[slice, slice]:
    """A size × size square where the mask is background (the random model leaves some)."""
    data = np.asarray(mask.data)
    for top in range(0, data.shape[0] - size, size):
        for left in range(0, data.shape[1] - size, size):
            if not data[top:top + size, left:left + size].any():
                return slice(top, top + size), slice(left, left + size)
    raise AssertionError("no background square")


def test_edited_count_follows_painting_and_is_coalesced(sgdc, wait_segment, qtbot, monkeypatch):
    from napari_sgdc.train import corrections

    viewer, seg, ft, image, _ = sgdc
    mask = _ready(seg, ft, viewer, image, wait_segment)
    qtbot.waitUntil(lambda: ft.edits.value.startswith("no edits yet"), timeout=5_000)
    calls = []
    real = corrections.edit_summary
    monkeypatch.setattr(corrections, "edit_summary", lambda *a, **k: calls.append(1) or real(*a, **k))

    rows, cols = _background_square(mask)
    for row in range(rows.start, rows.stop):  # ten quick strokes: one count after they stop
        mask.data_setitem((np.full(10, row), np.arange(cols.start, cols.stop)), 1)
    qtbot.waitUntil(lambda: ft.edits.value.startswith("100 px"), timeout=5_000)
    assert "in 1 object;" in ft.edits.value and "(0.3%)" in ft.edits.value, ft.edits.value
    assert len(calls) == 1

    second = (slice(rows.start, rows.start + 2), slice(cols.start + 20, cols.start + 22))
    if not np.asarray(mask.data)[second].any():
        mask.data_setitem(tuple(np.mgrid[second].reshape(2, -1)), 1)
        qtbot.waitUntil(lambda: ft.edits.value.startswith("104 px"), timeout=5_000)
        assert "in 2 objects" in ft.edits.value
    seg.threshold.value = 0.9  # the sliders rewrite the mask: nothing edited any more
    qtbot.waitUntil(lambda: ft.edits.value.startswith("no edits yet"), timeout=5_000)

    other = viewer.add_labels(np.zeros((192, 192), np.uint8), name="my labels")
    ft.reset_choices()
    ft.labels_layer.value = other
    qtbot.waitUntil(lambda: "not the model's mask" in ft.edits.value, timeout=5_000)


def test_finetune_gets_the_written_mask_as_predictions(sgdc, wait_segment, wait_idle, monkeypatch, notes):
    import napari_sgdc.train as train

    viewer, seg, ft, image, disk = sgdc
    mask = _ready(seg, ft, viewer, image, wait_segment)
    written = np.array(seg._session.results[image].written_mask[0])
    mask.data_setitem(np.nonzero(disk & (np.asarray(mask.data) == 0)), 1)
    seen = {}

    def recording(model, images, labels, preset="quick", **kwargs):
        seen.update(kwargs, labels=labels)
        kwargs["cancel"].set()  # no need to train: the run is cancelled at once
        return real(model, images, labels, preset, **kwargs)

    real = train.finetune
    monkeypatch.setattr(train, "finetune", recording)
    ft.advanced.value = True
    ft.steps.value = 3
    assert ft.start_finetune() is not None
    wait_idle(seg._session)
    [prediction] = seen["predictions"]
    assert prediction.dtype == bool
    np.testing.assert_array_equal(prediction, written > 0)
    np.testing.assert_array_equal(seen["labels"][0], np.asarray(mask.data) > 0)


def _new_session(monkeypatch) -> None:
    """What a restart does: a new session id, so the old session's autosave is pending."""
    import napari_sgdc.autosave as autosave

    monkeypatch.setattr(autosave, "SESSION_ID", f"restarted-{autosave.SESSION_ID}")


def _assert_same_pair(a, b) -> None:
    assert (a.image_name, a.labels_name, a.model_source) == (b.image_name, b.labels_name, b.model_source)
    for field in ("images", "labels", "predictions"):
        for x, y in zip(getattr(a, field), getattr(b, field)):
            assert x.dtype == y.dtype and np.array_equal(x, y), field


def test_added_pairs_are_autosaved_and_recovered_in_a_new_session(sgdc, wait_segment, make_napari_viewer,
                                                                  monkeypatch, notes, sgdc_cache):
    from napari_sgdc.autosave import Autosave

    viewer, seg, ft, image, disk = sgdc
    mask = _ready(seg, ft, viewer, image, wait_segment)
    mask.data_setitem(np.nonzero(disk & (np.asarray(mask.data) == 0)), 1)
    assert ft.add_pair()
    [saved] = ft.pairs
    assert ft.training.flush(timeout=30)  # autosave writes off the GUI thread (finding 18)
    assert [e.image_name for e in Autosave().entries()] == ["lesion"]
    assert str(Autosave().folder).startswith(str(sgdc_cache))
    assert ft.recover_row.native.isHidden()  # this session's own autosave is not offered back

    _new_session(monkeypatch)
    fresh = make_napari_viewer()
    _, ft2 = fresh.window.add_plugin_dock_widget("napari-sgdc", "SGDC Fine-tune")
    assert not ft2.recover_row.native.isHidden() and ft2.recover_button.text == "Recover 1 autosaved correction"
    assert notes.matching("1 autosaved correction from an earlier session (lesion)")
    [pair] = ft2.recover()
    _assert_same_pair(pair, saved)
    assert ft2.training_list.choices == (saved.title,) and ft2.recover_row.native.isHidden()
    np.testing.assert_array_equal(fresh.layers["lesion"].data, image.data)  # the image came back too
    np.testing.assert_array_equal(fresh.layers["lesion mask (recovered)"].data, saved.labels[0])
    assert Autosave().pending() == []  # adopted by this session

    _new_session(monkeypatch)
    _, ft3 = make_napari_viewer().window.add_plugin_dock_widget("napari-sgdc", "SGDC Fine-tune")
    assert not ft3.recover_row.native.isHidden()
    ft3.discard()
    assert ft3.training.flush(timeout=30)
    assert Autosave().entries() == [] and ft3.recover_row.native.isHidden()


def test_recovery_never_touches_existing_layers(sgdc, wait_segment, monkeypatch):
    viewer, seg, ft, image, disk = sgdc
    mask = _ready(seg, ft, viewer, image, wait_segment)
    mask.data_setitem(np.nonzero(disk & (np.asarray(mask.data) == 0)), 1)
    assert ft.add_pair()
    layers_before = {layer.name: np.array(layer.data) for layer in viewer.layers}
    viewer.add_labels(np.zeros((192, 192), np.uint8), name="lesion mask (recovered)")
    _new_session(monkeypatch)
    from napari_sgdc._napari._finetune_widget import FinetuneWidget

    ft2 = FinetuneWidget(viewer)  # a widget of the new session on a viewer where the image is still open
    assert len(ft2.recover()) == 1
    for name, data in layers_before.items():
        np.testing.assert_array_equal(viewer.layers[name].data, data)
    assert not viewer.layers["lesion mask (recovered)"].data.any()
    np.testing.assert_array_equal(viewer.layers["lesion mask (recovered 2)"].data, ft.pairs[0].labels[0])
    np.testing.assert_allclose(viewer.layers["lesion mask (recovered 2)"].scale, image.scale)


def test_autosave_lasts_until_a_finetune_is_kept_and_returns_on_undo(sgdc, wait_segment, wait_idle, qtbot):
    from napari_sgdc.autosave import Autosave

    viewer, seg, ft, image, disk = sgdc
    mask = _ready(seg, ft, viewer, image, wait_segment)
    mask.data_setitem(np.nonzero(disk & (np.asarray(mask.data) == 0)), 1)
    ft.advanced.value = True
    ft.steps.value = 2000
    worker = ft.start_finetune()
    assert worker is not None
    assert ft.training.flush(timeout=30)
    assert [e.image_name for e in Autosave().entries()] == ["lesion"]  # saved when the run starts
    qtbot.waitUntil(lambda: len(ft.losses) >= 1, timeout=30_000)
    ft.cancel()
    wait_idle(seg._session)
    assert ft.training.flush(timeout=30)
    assert len(Autosave().entries()) == 1  # a cancelled run keeps the autosave

    ft.steps.value = 3
    assert ft.start_finetune() is not None
    wait_idle(seg._session)
    assert ft.training.flush(timeout=30)
    assert ft.status.value.startswith("fine-tuned 3 steps") and Autosave().entries() == []
    assert ft.undo()
    wait_idle(seg._session)
    assert ft.training.flush(timeout=30)
    assert [e.image_name for e in Autosave().entries()] == ["lesion"]  # the undone run no longer holds them


KILLED_GUI = textwrap.dedent("""
    import sys, time
    import numpy as np
    import napari
    from qtpy.QtWidgets import QApplication
    sys.path.insert(0, sys.argv[1])
    from conftest import lesion_image

    viewer = napari.Viewer(show=False)
    _, seg = viewer.window.add_plugin_dock_widget("napari-sgdc", "SGDC Segment")
    _, ft = viewer.window.add_plugin_dock_widget("napari-sgdc", "SGDC Fine-tune")
    image, disk = lesion_image()
    layer = viewer.add_image(image, name="lesion", rgb=True)
    assert seg.load_checkpoint(sys.argv[2])
    app = QApplication.instance()
    job = seg.run_segment()
    while job.outcome is None:
        app.processEvents(); time.sleep(0.01)
    mask = viewer.layers["lesion mask"]
    mask.data_setitem(np.nonzero(disk & (np.asarray(mask.data) == 0)), 1)
    mask.data_setitem(np.nonzero(~disk & (np.asarray(mask.data) != 0)), 0)
    ft.reset_choices(); ft.image_layer.value = layer; ft.labels_layer.value = mask
    ft.advanced.value = True; ft.steps.value = 100000
    np.savez(sys.argv[3], labels=np.asarray(mask.data), prediction=seg._session.results[layer].written_mask[0])
    ft.start_finetune()
    while len(ft.losses) < 2:
        app.processEvents(); time.sleep(0.01)
    print("TRAINING", flush=True)
    while True:
        app.processEvents(); time.sleep(0.01)
""")


def test_corrections_survive_napari_killed_during_finetune(make_napari_viewer, tiny_checkpoint, tmp_path,
                                                           sgdc_cache, monkeypatch, notes):
    from conftest import lesion_image

    script = tmp_path / "killed_gui.py"
    script.write_text(KILLED_GUI)
    expected = tmp_path / "expected.npz"
    process = subprocess.Popen(
        [sys.executable, str(script), str(HERE), str(tiny_checkpoint), str(expected)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "QT_QPA_PLATFORM": "offscreen"},
    )
    try:
        line = process.stdout.readline()  # blocks until the fine-tune is 2 steps in (or the script died)
        assert line.strip() == "TRAINING", process.stderr.read()[-3000:]
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    _new_session(monkeypatch)  # (another process: the id differs anyway)
    viewer = make_napari_viewer()
    _, ft = viewer.window.add_plugin_dock_widget("napari-sgdc", "SGDC Fine-tune")
    assert not ft.recover_row.native.isHidden() and notes.matching("autosaved correction from an earlier session (lesion)")
    [pair] = ft.recover()
    image, _ = lesion_image()
    with np.load(expected) as data:
        labels, prediction = data["labels"], data["prediction"]
    assert pair.model_source == str(tiny_checkpoint) and pair.labels_name == "lesion mask"
    for got, want in ((pair.images[0], image), (pair.labels[0], labels), (pair.predictions[0], prediction)):
        assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)


def test_autosave_writes_off_the_gui_thread_and_loses_nothing(sgdc, wait_segment, monkeypatch, notes):
    """Finding 18: saving a large pair froze the window; now Add returns at once, the write runs on
    the writer thread, a failure still reaches the user (once, on the GUI thread), and the pair is saved."""
    import threading
    import time

    from napari_sgdc.autosave import Autosave

    viewer, seg, ft, image, disk = sgdc
    mask = _ready(seg, ft, viewer, image, wait_segment)
    mask.data_setitem(np.nonzero(disk & (np.asarray(mask.data) == 0)), 1)
    real_save, writers = Autosave.save, []

    def slow_save(self, pairs):
        writers.append(threading.current_thread())
        time.sleep(1.5)  # a large label layer
        return real_save(self, pairs)

    monkeypatch.setattr(Autosave, "save", slow_save)
    started = time.perf_counter()
    assert ft.add_pair()
    assert time.perf_counter() - started < 1.0 and len(ft.pairs) == 1
    assert ft.training.flush(timeout=30) and writers and threading.main_thread() not in writers
    assert [e.image_name for e in Autosave().entries()] == ["lesion"]
    monkeypatch.setattr(Autosave, "save", lambda self, pairs: (_ for _ in ()).throw(OSError("disk full")))
    mask.data_setitem((np.array([0]), np.array([0])), 1)
    assert ft.add_pair() and ft.training.flush(timeout=30)
    from qtpy.QtWidgets import QApplication

    for _ in range(50):  # the relay's queued signal needs the event loop
        QApplication.processEvents()
        if notes.matching("disk full"):
            break
        time.sleep(0.02)
    assert len(notes.matching("Could not autosave the corrections")) == 1 and len(ft.pairs) == 1
