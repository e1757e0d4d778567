"""Fault injection on whole-slide runs (issue 26): kill -9 and SIGINT at random tiles of the CLI in a
subprocess, a full disk, a corrupted tile, a failed overwrite, a finished resume and a foreign model.

After each: the resumed result equals an uninterrupted run's, and the files that were there before
are unchanged, byte for byte. Marked ``faults`` (part of the default run, about a minute).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from _slides import synthetic_rgb, write_slide
from napari_sgdc.cli import main
from napari_sgdc.wholeslide import read_store_labels, store_status

pytestmark = pytest.mark.faults

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--model", "nuclei", "--device", "cpu", "--slide-tile", "256", "--margin", "32"]


def _snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    return write_slide(tmp_path_factory.mktemp("slide") / "syn.ome.tif", synthetic_rgb())


@pytest.fixture(scope="module")
def reference(slide, tmp_path_factory):
    """An uninterrupted CLI run: its labels and object table."""
    out = tmp_path_factory.mktemp("reference")
    assert main(["predict", *FLAGS, "--out", str(out), str(slide)]) == 0
    return out


def _same_result(out: Path, reference: Path) -> None:
    np.testing.assert_array_equal(read_store_labels(out / "syn.ome.zarr"), read_store_labels(reference / "syn.ome.zarr"))
    np.testing.assert_array_equal(read_store_labels(out / "syn.ome.zarr", 1),
                                  read_store_labels(reference / "syn.ome.zarr", 1))
    assert (out / "syn_objects.csv").read_bytes() == (reference / "syn_objects.csv").read_bytes()
    assert (out / "syn_objects.geojson").read_bytes() == (reference / "syn_objects.geojson").read_bytes()
    assert store_status(out / "syn.ome.zarr") == "complete"


def _user_files(out: Path) -> dict[str, str]:
    """Files of the user's in the output folder before the run (never touched)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "notes.txt").write_text("my notes\n")
    (out / "other_objects.csv").write_text("id\n1\n")
    return _snapshot(out)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "napari_sgdc.cli", *args]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


def _run_until(command: list[str], store: Path, tiles: int, sig: int) -> subprocess.CompletedProcess:
    """Starts `command`, sends `sig` once `tiles` tile records exist, returns the finished process."""
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if len(list((store / "tiles").glob("*.npz"))) >= tiles if (store / "tiles").is_dir() else False:
            process.send_signal(sig)
            break
        time.sleep(0.005)
    out, err = process.communicate(timeout=120)
    return subprocess.CompletedProcess(command, process.returncode, out, err)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM], ids=["kill-9", "sigint", "sigterm"])
def test_a_signal_at_a_random_tile_then_resume_equals_an_uninterrupted_run(sig, slide, reference, tmp_path):
    out = tmp_path / "out"
    before = _user_files(out)
    tiles = int(np.random.default_rng(int(sig)).integers(2, 12))
    stopped = _run_until(_cli("predict", *FLAGS, "--out", str(out), str(slide)), out / "syn.ome.zarr", tiles, sig)
    store = out / "syn.ome.zarr"
    assert stopped.returncode != 0 and store_status(store) == "interrupted"
    if sig == signal.SIGKILL:
        resume = _cli("predict", *FLAGS, "--out", str(out), "--resume", str(slide))
    else:  # one line: what was kept and the exact command that resumes; no traceback
        assert stopped.returncode == 130 and "Traceback" not in stopped.stderr
        errors = [line for line in stopped.stderr.splitlines() if ": error: " in line]
        assert len(errors) == 1 and "interrupted; kept " in errors[0] and f" tiles in {store};" in errors[0]
        said = errors[0].split("; kept ")[0]
        assert said.count(str(slide)) == 1 and said.count(slide.name) == 1  # the path, not doubled
        command = shlex.split(errors[0].split("resume with: ")[1])
        assert command[0] == "napari-sgdc" and "--resume" in command
        resume = _cli(*command[1:])
    again = subprocess.run(resume, env=_env(), capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stderr
    _same_result(out, reference)
    after = _snapshot(out)
    assert {k: after[k] for k in before} == before


def test_a_full_disk_then_resume(slide, reference, tmp_path, monkeypatch):
    from napari_sgdc.wholeslide import tiles

    out = tmp_path / "out"
    before = _user_files(out)
    real, calls = tiles.atomic_write, []

    def full(path, write):
        calls.append(path)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, write)

    monkeypatch.setattr(tiles, "atomic_write", full)
    assert main(["predict", *FLAGS, "--out", str(out), str(slide)]) == 1
    monkeypatch.setattr(tiles, "atomic_write", real)
    assert store_status(out / "syn.ome.zarr") == "failed"
    assert main(["predict", *FLAGS, "--out", str(out), "--resume", str(slide)]) == 0
    _same_result(out, reference)
    after = _snapshot(out)
    assert {k: after[k] for k in before} == before


def test_a_full_disk_while_writing_the_geojson_then_resume(slide, reference, tmp_path, monkeypatch, capsys):
    from napari_sgdc import files

    out = tmp_path / "out"
    real = files.atomic_write

    def full(path, write):
        if str(path).endswith(".geojson"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, write)

    monkeypatch.setattr("napari_sgdc.wholeslide.export.atomic_write", full)
    assert main(["predict", *FLAGS, "--out", str(out), str(slide)]) == 1
    monkeypatch.undo()
    assert not (out / "syn_objects.geojson").exists() and store_status(out / "syn.ome.zarr") == "complete"
    capsys.readouterr()
    started = time.perf_counter()
    assert main(["predict", *FLAGS, "--out", str(out), "--resume", str(slide)]) == 0
    assert time.perf_counter() - started < 10 and "already complete; nothing to do" in capsys.readouterr().err
    _same_result(out, reference)


def _corrupt_one_tile(slide: Path, target: Path) -> Path:
    """A copy of `slide` with garbage in the middle of one level-0 tile with tissue."""
    import tifffile

    shutil.copy(slide, target)
    with tifffile.TiffFile(target) as tiff:
        page = tiff.pages[0]
        offset, count = page.dataoffsets[len(page.dataoffsets) // 2], page.databytecounts[len(page.dataoffsets) // 2]
    with open(target, "r+b") as stream:
        stream.seek(offset + 2)
        stream.write(b"\xff" * (count - 4))
    return target


def test_a_corrupted_tile_stops_the_run_naming_it(slide, tmp_path):
    bad = _corrupt_one_tile(slide, tmp_path / "syn.ome.tif")
    out = tmp_path / "out"
    before = _user_files(out)
    # --tissue none: the thumbnail of this small slide is level 0, so detection would meet the tile first
    run = subprocess.run(_cli("predict", *FLAGS, "--tissue", "none", "--out", str(out), str(bad)), env=_env(),
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 1 and "Traceback" not in run.stderr and "Event loop is closed" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "[tile " in errors[0] and "cannot read" in errors[0] and "kept " in errors[0]
    assert store_status(out / "syn.ome.zarr") == "failed"
    after = _snapshot(out)
    assert {k: after[k] for k in before} == before


def test_a_failed_overwrite_keeps_the_old_result_byte_for_byte(slide, reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    before = _snapshot(out)
    bad = _corrupt_one_tile(slide, tmp_path / "syn.ome.tif")
    assert main(["predict", *FLAGS, "--tissue", "none", "--out", str(out), "--overwrite", str(bad)]) == 1
    assert _snapshot(out) == before and sorted(p.name for p in out.iterdir()) == sorted(
        p.name for p in reference.iterdir())


def test_an_overwrite_killed_during_the_swap_keeps_the_old_result(reference, tmp_path):
    from napari_sgdc.wholeslide import check_outputs

    out = tmp_path / "out"
    shutil.copytree(reference, out)
    before = _snapshot(out)
    store = out / "syn.ome.zarr"
    os.replace(store, f"{store}.outgoing")  # killed between the two renames
    assert check_outputs(store, resume=True) == "resume"  # the old store came back
    assert _snapshot(out) == before


def test_a_finished_resume_does_nothing(slide, reference, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    capsys.readouterr()
    assert main(["predict", *FLAGS, "--out", str(out), "--resume", str(slide)]) == 0
    assert "already complete; nothing to do" in capsys.readouterr().err
    _same_result(out, reference)


def test_a_foreign_model_cannot_resume(slide, reference, tmp_path, capsys):
    import torch

    from napari_sgdc.checkpoints import load_model, save_checkpoint

    out = tmp_path / "out"
    shutil.copytree(reference, out)
    store = out / "syn.ome.zarr"
    from napari_sgdc.wholeslide.store import update_attrs

    update_attrs(store, complete=False, status="interrupted")  # an interrupted store …
    before = _snapshot(out)
    model = load_model("nuclei", device="cpu")
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)  # … and a fine-tuned copy of its model
    copy = save_checkpoint(tmp_path / "tuned.safetensors", model)
    flags = [*FLAGS]
    flags[1] = str(copy)
    capsys.readouterr()
    assert main(["predict", *flags, "--out", str(out), "--resume", str(slide)]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "other weights" in errors[0]
    assert _snapshot(out) == before


def test_a_users_own_object_table_is_never_replaced(slide, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "syn_objects.csv").write_text("my table\n")
    before = _snapshot(out)
    capsys.readouterr()
    assert main(["predict", *FLAGS, "--out", str(out), "--resume", str(slide)]) == 1
    assert "not written by syn.ome.zarr" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_labels_match_the_table_after_a_partly_cleaned_scratch_folder(slide, reference, tmp_path):
    import threading

    from napari_sgdc.inference import Cancelled
    from napari_sgdc.wholeslide import export_objects, segment_slide

    out = tmp_path / "out"
    cancel = threading.Event()
    store = out / "syn.ome.zarr"

    def progress(done, total):
        if done >= 12:
            cancel.set()

    with pytest.raises(Cancelled):
        segment_slide("nuclei", slide, store, tile=256, margin=32, progress=progress, cancel=cancel)
    owned = sorted((store / "_work" / "owned").glob("*/*"))
    for chunk in owned[: len(owned) // 2]:  # someone cleaned half the scratch folder
        shutil.rmtree(chunk)
    segment_slide("nuclei", slide, store, tile=256, margin=32, resume=True)
    export_objects(store, out / "syn_objects.csv")
    np.testing.assert_array_equal(read_store_labels(store), read_store_labels(reference / "syn.ome.zarr"))
    assert (out / "syn_objects.csv").read_bytes() == (reference / "syn_objects.csv").read_bytes()
