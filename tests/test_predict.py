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


def test_label_files_are_uint16_or_uint32_whatever_the_count(tmp_path, model):
    """Finding 17: one label type per batch: uint16 (few or no objects: not uint8), uint32 above 65,535."""
    from napari_sgdc.files import label_dtype, write_labels

    assert label_dtype(np.zeros((2, 2), np.int32)) == np.uint16
    assert label_dtype(np.array([[3]], np.int64)) == np.uint16 and label_dtype(np.array([[65536]])) == np.uint32
    assert tifffile.imread(write_labels(tmp_path / "mask.tif", np.ones((4, 4), bool))).dtype == np.uint16
    assert tifffile.imread(write_labels(tmp_path / "big.tif", np.full((2, 2), 70000))).dtype == np.uint32
    paths = _images(tmp_path / "in")
    assert predict_files(model, paths, tmp_path / "out", tile=0).done == 2
    for path in paths:
        assert tifffile.imread(str(tmp_path / "out" / f"{path.stem}_labels.tif")).dtype == np.uint16


def test_each_page_of_a_multi_page_tiff_is_its_own_image(tmp_path, model):
    """Finding 15: a 3-page stack wrote one output, and pages of other sizes were dropped silently;
    now every page is segmented as its own image (S_p0, S_p1, …), whatever its size."""
    from napari_sgdc.files import image_pages, read_image
    from napari_sgdc.predict import image_targets

    rng = np.random.default_rng(1)
    stack = tmp_path / "stack.tif"
    planes = (rng.random((3, 96, 96)) * 255).astype(np.uint8)
    tifffile.imwrite(stack, planes, photometric="minisblack")
    mixed = tmp_path / "mixed.tif"
    with tifffile.TiffWriter(mixed) as writer:
        writer.write((rng.random((64, 80, 3)) * 255).astype(np.uint8), photometric="rgb")
        writer.write((rng.random((50, 44)) * 255).astype(np.uint8))
    volume = tmp_path / "volume.tif"
    tifffile.imwrite(volume, np.zeros((2, 3, 30, 40, 3), np.uint8))  # z × c: not pages of images
    assert (image_pages(stack), image_pages(mixed), image_pages(volume)) == (3, 2, 1)
    np.testing.assert_array_equal(read_image(stack, 2), planes[2])
    assert [stem for _, _, stem in image_targets([stack, mixed])] == ["stack_p0", "stack_p1", "stack_p2",
                                                                      "mixed_p0", "mixed_p1"]
    errors, ticks = [], []
    summary = predict_files(model, [stack, mixed, volume], tmp_path / "out", tile=0, on_error=errors.append,
                            progress=lambda done, total, status: ticks.append((done, total, status)))
    assert (summary.done, summary.total) == (5, 6) and len(errors) == 1 and errors[0].startswith(str(volume))
    assert (1, 6, "stack.tif page 1") in ticks
    shapes = {"stack_p0": (96, 96), "stack_p1": (96, 96), "stack_p2": (96, 96), "mixed_p0": (64, 80),
              "mixed_p1": (50, 44)}
    for stem, shape in shapes.items():
        assert tifffile.imread(str(tmp_path / "out" / f"{stem}_labels.tif")).shape == shape
    assert not (tmp_path / "out" / "stack_mask.png").exists()
    with pytest.raises(ValueError, match="would both write stack_p1_mask.png"):  # a file named like a page
        other = tmp_path / "other" / "stack_p1.png"
        other.parent.mkdir()
        other.write_bytes(b"")
        check_outputs([stack, other], tmp_path / "out2", instances=False, uncertainty=False, overwrite=False)


def test_a_huge_tiff_in_one_strip_is_refused_not_loaded(tmp_path, monkeypatch, model):
    """Finding 10 (f): a TIFF over the slide size stored as ONE strip cannot be read in parts: one line."""
    import napari_sgdc.slide as slide_module
    from napari_sgdc.files import read_image

    monkeypatch.setattr(slide_module, "LARGE_PLAIN_SIDE", 512)
    one_strip = tmp_path / "one_strip.tif"
    tifffile.imwrite(one_strip, np.zeros((520, 600, 3), np.uint8), photometric="rgb", rowsperstrip=520)
    images, slides, _ = collect_inputs([one_strip])
    assert images == [one_strip] and slides == []
    loaded = []
    monkeypatch.setattr(tifffile.TiffFile, "asarray", lambda *a, **k: loaded.append(1))
    with pytest.raises(ValueError, match=r"one_strip.tif: a 600×520 TIFF stored as one strip cannot be read in par"):
        read_image(one_strip)
    errors = []
    assert predict_files(model, [one_strip], tmp_path / "out", tile=0, on_error=errors.append).done == 0
    assert len(errors) == 1 and "\n" not in errors[0] and "--tile --pyramid" in errors[0] and not loaded
    monkeypatch.setattr(slide_module, "LARGE_PLAIN_SIDE", 8192)
    monkeypatch.undo()
    assert read_image(one_strip).shape == (520, 600, 3)  # below the size it is an ordinary image
