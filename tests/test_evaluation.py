"""`napari_sgdc.evaluation`: items from folders and layouts, scoring, the summary and the CSV writer."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import io as skio

from napari_sgdc.evaluation import (
    EvaluationItem, check_csv_target, evaluate, folder_items, layout_items, summarize, summary_lines, write_csv,
)
from napari_sgdc.model import build_model, tiny_config

torch.set_num_threads(1)
DATA = Path(os.environ.get("NAPARI_SGDC_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = build_model(tiny_config(task="instance"))
    with torch.no_grad():
        net.mask_head.weight.mul_(200.0)  # a random net whose mask is partly on
    return net.eval()


def _folders(root: Path, n: int = 2) -> None:
    rng = np.random.default_rng(0)
    for name in ("images", "masks", "instances"):
        (root / name).mkdir(parents=True)
    for index in range(n):
        skio.imsave(str(root / "images" / f"im{index}.png"), (rng.random((48, 40, 3)) * 255).astype(np.uint8),
                    check_contrast=False)
        labels = np.zeros((48, 40), np.uint16)
        labels[4:20, 4:20], labels[25:40, 10:30] = 2, 5
        skio.imsave(str(root / "masks" / f"im{index}_mask.png"), ((labels > 0) * 255).astype(np.uint8),
                    check_contrast=False)
        skio.imsave(str(root / "instances" / f"im{index}.png"), labels, check_contrast=False)


def test_folder_items_match_labels_by_stem_and_mark_orphans(tmp_path):
    _folders(tmp_path)
    skio.imsave(str(tmp_path / "images" / "orphan.png"), np.zeros((8, 8, 3), np.uint8), check_contrast=False)
    items = folder_items(tmp_path / "images", tmp_path / "masks", tmp_path / "instances")
    assert [item.name for item in items] == ["im0.png", "im1.png", "orphan.png"]
    assert items[0].load_mask().dtype == bool and set(np.unique(items[0].load_instances())) == {0, 2, 5}
    assert items[2].problem is not None and "orphan.png" in items[2].problem and items[2].load_image is None
    only_instances = folder_items(tmp_path / "images", instances=tmp_path / "instances", max_images=1)
    assert len(only_instances) == 1 and only_instances[0].load_mask().sum() == 16 * 16 + 15 * 20
    with pytest.raises(ValueError, match="--masks"):
        folder_items(tmp_path / "images")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        folder_items(tmp_path / "empty", tmp_path / "masks")


def test_layout_items_and_an_empty_split():
    items = layout_items(DATA / "consep", "consep", "test", max_images=1)
    assert len(items) == 1 and items[0].load_instances is not None and items[0].load_mask().dtype == bool
    assert layout_items(DATA / "ph2", "ph2", "test", max_images=0)[0].load_instances is None  # 0 = all
    with pytest.raises(ValueError, match="no images in split 'test'"):
        layout_items(DATA / "monuseg", "monuseg", "test")


def test_evaluate_scores_rows_reports_failures_and_pools_pixels(tmp_path, model):
    _folders(tmp_path)
    items = folder_items(tmp_path / "images", tmp_path / "masks", tmp_path / "instances")
    bad = EvaluationItem("wrong.png", lambda: np.zeros((10, 10, 3), np.uint8), lambda: np.zeros((9, 9), bool))
    errors, ticks = [], []
    scores = evaluate(model, [*items, bad, EvaluationItem("x.png", problem="x.png: no mask")], tile=0,
                      on_error=errors.append, progress=lambda done, total: ticks.append((done, total)))
    assert [row["image"] for row in scores.rows] == ["im0.png", "im1.png"]
    assert scores.keys == ["iou", "dice", "hd95", "boundary_f1", "aji", "object_f1", "pq"]
    assert errors == scores.failures and len(errors) == 2
    assert errors[0].startswith("wrong.png: mask shape") and errors[1] == "x.png: no mask"
    assert ticks[-1] == (4, 4)
    intersection, predicted, reference = scores.pooled
    assert reference == 2 * (16 * 16 + 15 * 20) and 0 <= intersection <= min(predicted, reference)
    lines = summary_lines(scores, tolerance=1.5)
    assert lines[3].startswith("Boundary F1 (tol 1.5 px)") and lines[-1].startswith("Pooled IoU / Dice")


def test_summarize_ignores_nan_and_missing_keys():
    rows = [{"iou": 0.5, "hd95": math.nan}, {"iou": 1.0, "hd95": 4.0}, {"iou": 0.0}]
    summary = summarize(rows, ["iou", "hd95", "aji"])
    assert summary["iou"] == pytest.approx((0.5, np.std([0.5, 1.0, 0.0])))
    assert summary["hd95"] == (4.0, 0.0) and all(math.isnan(v) for v in summary["aji"])


def test_write_csv_is_atomic_and_never_replaces_without_overwrite(tmp_path, monkeypatch):
    rows = [{"image": "a.png", "iou": 0.123456789, "dice": 1.0}, {"image": "b.png", "iou": 0.5}]
    path = tmp_path / "sub" / "scores.csv"
    write_csv(rows, path)
    assert path.read_text().splitlines() == ["image,iou,dice", "a.png,0.123457,1", "b.png,0.5,"]
    before = path.read_bytes()
    with pytest.raises(ValueError, match="already exists") as error:
        write_csv(rows[:1], path)
    assert "\n" not in str(error.value) and path.read_bytes() == before
    with pytest.raises(ValueError, match="already exists"):
        check_csv_target(path)
    check_csv_target(path, overwrite=True)
    with pytest.raises(ValueError, match="folder"):
        check_csv_target(tmp_path, overwrite=True)

    import csv

    class Boom(RuntimeError):
        pass

    def failing_writerow(self, row):
        raise Boom

    monkeypatch.setattr(csv.DictWriter, "writerow", failing_writerow)
    with pytest.raises(Boom):  # a failed write leaves the old file whole and no temporary behind
        write_csv(rows, path, overwrite=True)
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == ["scores.csv"]
    monkeypatch.undo()
    write_csv(rows[:1], path, ["iou"], overwrite=True)
    assert path.read_text().splitlines() == ["image,iou", "a.png,0.123457"]
