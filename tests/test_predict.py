"""`napari_sgdc.predict`: inputs from files and folders, output checks, and batch prediction of image files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from skimage import io as skio

from napari_sgdc.predict import check_outputs, collect_inputs, expand_inputs, predict_files
from napari_sgdc.model import build_model, tiny_config

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_config(task="instance")).eval()


def _images(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = [folder / "a.png", folder / "b.tif"]
    skio.imsave(str(paths[0]), (rng.random((40, 56, 3)) * 255).astype(np.uint8), check_contrast=False)
    tifffile.imwrite(str(paths[1]), (rng.random((33, 30)) * 65535).astype(np.uint16))
    return paths


def test_inputs_from_files_and_folders_once_each(tmp_path):
    paths = _images(tmp_path / "in")
    (tmp_path / "empty").mkdir()
    errors = []
    files, bad = expand_inputs([tmp_path / "in", tmp_path / "empty", tmp_path / "nope.png"], errors.append)
    assert files == paths and bad == 2 and len(errors) == 2
    assert "empty" in errors[0] and "nope.png" in errors[1] and "no such file" in errors[1]
    images, slides, bad = collect_inputs([paths[0], tmp_path / "in" / ".." / "in" / "a.png", tmp_path / "in"])
    assert images == [paths[0], paths[1]] and slides == [] and bad == 0


def test_check_outputs_refuses_clashes_and_existing_files(tmp_path):
    paths = _images(tmp_path / "in")
    other = tmp_path / "other" / "a.jpg"
    other.parent.mkdir()
    other.write_bytes(b"")
    with pytest.raises(ValueError, match="would both write a_mask.png"):
        check_outputs([paths[0], other], tmp_path / "out", instances=False, uncertainty=False, overwrite=False)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "b_labels.tif").write_bytes(b"x")
    check_outputs(paths, tmp_path / "out", instances=False, uncertainty=False, overwrite=False)  # labels not written
    with pytest.raises(ValueError, match="b_labels.tif already exists"):
        check_outputs(paths, tmp_path / "out", instances=True, uncertainty=False, overwrite=False)
    check_outputs(paths, tmp_path / "out", instances=True, uncertainty=True, overwrite=True)


def test_predict_files_writes_results_reports_failures_and_progress(tmp_path, model):
    paths = _images(tmp_path / "in")
    broken = tmp_path / "in" / "broken.png"
    broken.write_bytes(b"not an image")
    errors, ticks = [], []
    summary = predict_files(model, [paths[0], broken, paths[1]], tmp_path / "out", tile=0, uncertainty=True,
                            progress=lambda done, total, status: ticks.append((done, total, status)),
                            on_error=errors.append)
    assert (summary.done, summary.total) == (2, 3) and summary.failures == errors
    assert len(errors) == 1 and errors[0].startswith(str(broken))
    assert ticks[0] == (0, 3, "a.png") and ticks[-1] == (3, 3, "")
    for stem, shape in (("a", (40, 56)), ("b", (33, 30))):
        for suffix in ("_mask.png", "_prob.tif", "_boundary.tif", "_labels.tif", "_uncertainty.tif"):
            assert (tmp_path / "out" / f"{stem}{suffix}").is_file()
        assert tifffile.imread(str(tmp_path / "out" / f"{stem}_prob.tif")).shape == shape
    assert not any((tmp_path / "out").glob("broken*"))
    before = (tmp_path / "out" / "a_mask.png").read_bytes()
    with pytest.raises(ValueError, match="already exists"):  # refused before any work
        predict_files(model, paths, tmp_path / "out", tile=0)
    assert (tmp_path / "out" / "a_mask.png").read_bytes() == before
    assert predict_files(model, paths, tmp_path / "out", tile=0, overwrite=True).done == 2
