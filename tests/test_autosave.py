"""Headless tests of `napari_sgdc.autosave`: corrections survive a crash, bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from napari_sgdc.autosave import Autosave, cache_dir
from napari_sgdc.training_pairs import TrainingPair

SOURCE = "built-in: dermoscopy"


def _pairs(seed: int = 0) -> list[TrainingPair]:
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    labels = np.zeros((40, 56), np.uint8)
    labels[5:20, 10:30] = 1
    prediction = np.zeros_like(labels)
    prediction[8:22, 12:28] = 1
    stack = rng.integers(0, 65535, (2, 24, 32), dtype=np.uint16)
    instances = rng.integers(0, 300, (2, 24, 32)).astype(np.int32)
    return [
        TrainingPair("lesion", "lesion mask", [rgb], [labels], SOURCE, [prediction]),
        TrainingPair("nuclei stack", "painted", list(stack), list(instances), "/models/my model.safetensors",
                     mpp=0.5),
    ]


def _assert_same(a: list[TrainingPair], b: list[TrainingPair]) -> None:
    assert len(a) == len(b)
    for x, y in zip(sorted(a, key=lambda p: p.key), sorted(b, key=lambda p: p.key)):
        assert (x.image_name, x.labels_name, x.model_source, x.mpp) == (y.image_name, y.labels_name,
                                                                         y.model_source, y.mpp)
        for field in ("images", "labels", "predictions"):
            xs, ys = getattr(x, field), getattr(y, field)
            assert (xs is None) == (ys is None), field
            for u, v in zip(xs or [], ys or []):
                assert u.dtype == v.dtype and u.shape == v.shape and np.array_equal(u, v), field


def test_cache_folder_follows_the_environment_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("NAPARI_SGDC_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    assert Autosave().folder == tmp_path / "c" / "corrections"
    monkeypatch.delenv("NAPARI_SGDC_CACHE")
    assert "napari-sgdc" in str(cache_dir())


def test_another_session_recovers_the_pairs_bit_for_bit(tmp_path):
    pairs = _pairs()
    mine = Autosave(tmp_path, session="first")
    written = mine.save(pairs)
    assert [entry.key for entry in written] == [pair.key for pair in pairs]
    assert mine.pending() == []  # a session does not offer its own pairs
    later = Autosave(tmp_path, session="second")
    assert sorted(entry.image_name for entry in later.pending()) == ["lesion", "nuclei stack"]
    recovered, problems = later.load()
    assert problems == []
    _assert_same(recovered, pairs)
    later.adopt(later.pending())
    assert later.pending() == [] and len(Autosave(tmp_path, session="third").pending()) == 2


def test_newer_pair_replaces_older_and_remove_and_clear_delete_files(tmp_path):
    store = Autosave(tmp_path, session="s")
    first, stack = _pairs(0)
    store.save([first, stack])
    newer = TrainingPair(first.image_name, first.labels_name, first.images, [first.labels[0] * 0 + 1],
                         first.model_source, first.predictions)
    store.save([newer])
    assert len(store.entries()) == 2 and len(list(tmp_path.glob("pair-*.npz"))) == 2
    _assert_same(store.load(store.entries())[0], [newer, stack])
    store.remove([stack.key])
    assert [entry.key for entry in store.entries()] == [newer.key]
    assert len(list(tmp_path.glob("pair-*.npz"))) == 1
    store.clear()
    assert store.entries() == [] and not list(tmp_path.glob("pair-*.npz"))


def test_a_crash_while_saving_keeps_the_previous_autosave(tmp_path, monkeypatch):
    store = Autosave(tmp_path, session="s")
    pairs = _pairs()
    store.save(pairs[:1])
    index_before = (tmp_path / "index.json").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(OSError, match="disk full"):
        store.save(pairs[1:])
    assert (tmp_path / "index.json").read_bytes() == index_before
    assert not list(tmp_path.glob(".*.tmp"))  # the half-written file is gone
    _assert_same(Autosave(tmp_path, session="other").load()[0], pairs[:1])


def test_unreadable_index_or_pair_file_is_reported_not_raised(tmp_path):
    store = Autosave(tmp_path, session="s")
    store.save(_pairs())
    entry = store.entries()[0]
    (tmp_path / entry.file).write_bytes(b"not an npz")
    pairs, problems = Autosave(tmp_path, session="o").load()
    assert len(pairs) == 1 and len(problems) == 1 and entry.file in problems[0]
    (tmp_path / "index.json").write_text("{broken")
    assert Autosave(tmp_path, session="o").pending() == []


def test_index_names_image_labels_model_and_time(tmp_path):
    Autosave(tmp_path, session="s").save(_pairs()[:1])
    [entry] = json.loads((tmp_path / "index.json").read_text())["pairs"]
    assert entry["image_name"] == "lesion" and entry["labels_name"] == "lesion mask"
    assert entry["model_source"] == SOURCE and entry["planes"] == 1 and entry["session"] == "s"
    assert time.strptime(entry["saved"], "%Y-%m-%dT%H:%M:%S")


def test_an_index_written_before_pairs_kept_their_scale_still_loads(tmp_path):
    Autosave(tmp_path, session="s").save(_pairs())
    index = json.loads((tmp_path / "index.json").read_text())
    assert sorted(str(entry["mpp"]) for entry in index["pairs"]) == ["0.5", "None"]
    for entry in index["pairs"]:
        del entry["mpp"]
    (tmp_path / "index.json").write_text(json.dumps(index))
    pairs, problems = Autosave(tmp_path, session="o").load()
    assert problems == [] and [pair.mpp for pair in pairs] == [None, None]


def test_autosave_imports_neither_napari_nor_qt():
    code = ("import sys, napari_sgdc.autosave; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('napari', 'qtpy', 'PyQt5', 'PyQt6', "
            "'PySide2', 'PySide6', 'magicgui', 'torch')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


KILLED_FINETUNE = textwrap.dedent("""
    import sys
    from dataclasses import replace
    import numpy as np
    import torch
    torch.set_num_threads(1)
    from napari_sgdc.autosave import Autosave
    from napari_sgdc.config import PRESETS
    from napari_sgdc.model import build_model, tiny_config
    from napari_sgdc.train import finetune
    from napari_sgdc.training_pairs import TrainingPair

    data = np.load(sys.argv[2])
    pair = TrainingPair("lesion", "lesion mask", [data["image"]], [data["labels"]], "built-in: dermoscopy",
                        [data["prediction"]])
    Autosave(sys.argv[1], session="killed").save([pair])
    model = build_model(tiny_config())
    config = replace(PRESETS["quick"], max_steps=100000, steps_per_epoch=100000, epochs=1)

    def said_training(event):
        if event.get("kind") == "step" and event.get("step") == 2:
            print("TRAINING", flush=True)

    finetune(model, [data["image"]], [data["labels"] > 0], config, predictions=[data["prediction"] > 0],
             callbacks=[said_training])
    print("FINISHED", flush=True)
""")


def test_corrections_survive_a_process_killed_during_finetune(tmp_path):
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
    labels = np.zeros((96, 96), np.uint8)
    labels[20:60, 30:70] = 1
    prediction = np.zeros_like(labels)
    prediction[25:50, 35:60] = 1
    np.savez(tmp_path / "input.npz", image=image, labels=labels, prediction=prediction)
    script = tmp_path / "killed.py"
    script.write_text(KILLED_FINETUNE)
    folder = tmp_path / "corrections"
    process = subprocess.Popen([sys.executable, str(script), str(folder), str(tmp_path / "input.npz")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()  # blocks until the run is 2 steps in (or the script died)
        assert line.strip() == "TRAINING", process.stderr.read()
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    recovered, problems = Autosave(folder, session="next start").load()
    assert problems == []
    _assert_same(recovered, [TrainingPair("lesion", "lesion mask", [image], [labels], SOURCE, [prediction])])
