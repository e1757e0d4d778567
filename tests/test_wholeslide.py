"""segment_slide: seams (vs one piece), resampling, resume, outputs, CLI, Dask workers, the reader."""

from __future__ import annotations

import csv
import json
from pathlib import Path
import os
import threading

import numpy as np
import pytest
import zarr

import _slides
from _slides import PixelModel, same_partition, synthetic_rgb, write_slide
from napari_sgdc.inference import Cancelled, predict_maps
from napari_sgdc.postprocess import postprocess
from napari_sgdc.slide import SlideError, detect_tissue, open_slide
from napari_sgdc.wholeslide import (OBJECT_COLUMNS, StoreExistsError, export_objects, read_store_labels,
                                    segment_slide)

TILE, MARGIN = 256, 32  # small tiles: many seams on a small slide


@pytest.fixture(scope="module")
def rgb():
    return synthetic_rgb()  # (1280, 1536), ~50 % background


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory, rgb):
    return write_slide(tmp_path_factory.mktemp("slide") / "syn.ome.tif", rgb)


@pytest.fixture(scope="module")
def reference(slide_path, tmp_path_factory):
    """An uninterrupted single-process run (shared by the comparisons)."""
    out = tmp_path_factory.mktemp("ref") / "syn.ome.zarr"
    result = segment_slide(PixelModel(), slide_path, out, tile=TILE, margin=MARGIN)
    return out, result


def _arrays(store):
    """Every array of a store as {path: ndarray}, plus the tile records."""
    root = zarr.open_group(str(store), mode="r")
    out = {}
    for name in [str(k) for k in range(len(root.attrs["multiscales"][0]["datasets"]))]:
        array = root[name]
        out[name] = np.asarray(array[...])
    for group in ("labels/nuclei", "labels/tissue"):
        for name, array in root[group].arrays():
            out[f"{group}/{name}"] = np.asarray(array[...])
    for record in sorted((store / "tiles").glob("*.npz")):
        with np.load(record) as data:
            for key in data.files:
                out[f"tiles/{record.stem}/{key}"] = data[key]
    return out


def _assert_same_store(a, b):
    left, right = _arrays(a), _arrays(b)
    assert sorted(left) == sorted(right)
    for key in left:
        np.testing.assert_array_equal(left[key], right[key], err_msg=key)


def test_seams_match_one_piece_segmentation(reference, rgb):
    out, result = reference
    labels = read_store_labels(out)
    probability, boundary = predict_maps(PixelModel(), rgb)  # the same region in one piece
    _, whole = postprocess(probability, boundary, instances=True)
    assert result.too_large == 0 and result.n_objects == whole.max() > 200
    assert same_partition(labels, whole)  # no duplicates, no cut halves, nothing lost
    assert np.array_equal(np.unique(labels), np.arange(result.n_objects + 1))  # ids 1..N, unique slide-wide
    # many objects really do cross a tile border
    crossing = sum(len(np.unique(labels[:, c - 1:c + 1][labels[:, c - 1:c + 1] > 0])) for c in range(TILE, 1536, TILE))
    assert crossing > 10


def test_tissue_skipping_and_store_layout(reference, slide_path):
    out, result = reference
    assert result.tiles_total == 30 and result.tiles_run < result.tiles_total
    # tiles are run when their core meets tissue; the seams test above shows nothing is lost by
    # skipping tiles whose margin alone holds tissue (on this slide: 2 of them)
    tissue = detect_tissue(open_slide(slide_path))
    grid = [(i * TILE, j * TILE) for i in range(5) for j in range(6)]
    assert result.tiles_run == sum(tissue.any_in(x, y, x + TILE, y + TILE) for y, x in grid)
    assert result.tiles_run < sum(tissue.any_in(x - MARGIN, y - MARGIN, x + TILE + MARGIN, y + TILE + MARGIN)
                                  for y, x in grid)
    root = zarr.open_group(str(out), mode="r")
    assert root.attrs["napari_sgdc"]["complete"] and not (out / "_work").exists()
    assert root["0"].shape == (2, 1280, 1536) and root["labels/nuclei/0"].chunks == (TILE, TILE)
    assert root.attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 0.25, 0.25]
    levels = [root[f"labels/nuclei/{k}"].shape for k in range(len(root.attrs["multiscales"][0]["datasets"]))]
    assert levels[1] == (640, 768) and len(levels) >= 3
    tissue = np.asarray(root["labels/tissue/0"][...])
    assert set(np.unique(tissue)) <= {0, 1, 2} and (tissue == 0).mean() > 0.3


def test_lower_magnification_slide_is_resampled(tmp_path, rgb):
    """A 20x slide (0.5 µm/px) is read at the model's 0.25 µm/px: nuclei keep their size in µm."""
    path = write_slide(tmp_path / "x20.ome.tif", rgb[::2, ::2], mpp=0.5)
    result = segment_slide(PixelModel(), path, tmp_path / "x20.ome.zarr", tile=TILE, margin=MARGIN)
    assert result.shape == (1280, 1536) and result.working_mpp == 0.25
    n = export_objects(tmp_path / "x20.ome.zarr", tmp_path / "t.csv")
    areas = np.loadtxt(tmp_path / "t.csv", delimiter=",", skiprows=1, usecols=3)
    assert n > 150 and 5 < np.median(areas) < 30  # radius 5-10 px at 0.25 µm: about 6-20 µm²


def test_resume_after_cancel_equals_uninterrupted(reference, slide_path, tmp_path):
    out = tmp_path / "syn.ome.zarr"
    cancel = threading.Event()

    def progress(done, total):
        if done >= 6:
            cancel.set()

    with pytest.raises(Cancelled):
        segment_slide(PixelModel(), slide_path, out, tile=TILE, margin=MARGIN, progress=progress, cancel=cancel)
    done_before = len(list((out / "tiles").glob("*.npz")))
    assert 0 < done_before < reference[1].tiles_run
    with pytest.raises(StoreExistsError):
        segment_slide(PixelModel(), slide_path, out, tile=TILE, margin=MARGIN)
    with pytest.raises(ValueError, match="other settings"):
        segment_slide(PixelModel(), slide_path, out, tile=TILE, margin=64, resume=True)
    with pytest.raises(ValueError, match="other settings"):  # bf16 gives slightly different maps
        segment_slide(PixelModel(), slide_path, out, tile=TILE, margin=MARGIN, resume=True, amp=True)
    result = segment_slide(PixelModel(), slide_path, out, tile=TILE, margin=MARGIN, resume=True)
    assert result.tiles_resumed == done_before
    _assert_same_store(out, reference[0])


def test_object_table_and_geojson(reference, tmp_path):
    out, result = reference
    labels = read_store_labels(out)
    table, geojson = tmp_path / "o.csv", tmp_path / "o.geojson"
    assert export_objects(out, table, geojson) == result.n_objects
    with open(table) as stream:
        rows = list(csv.DictReader(stream))
    assert tuple(rows[0]) == OBJECT_COLUMNS and len(rows) == result.n_objects
    areas = np.bincount(labels.ravel())
    for row in rows[:: max(1, len(rows) // 25)]:
        k = int(row["id"])
        ys, xs = np.nonzero(labels == k)
        assert float(row["area_um2"]) == pytest.approx(areas[k] * 0.0625, abs=1e-3)
        assert float(row["centroid_x_um"]) == pytest.approx((xs.mean() + 0.5) * 0.25, abs=1e-3)
        assert float(row["bbox_y0_um"]) == pytest.approx(ys.min() * 0.25) and 0.5 < float(row["mean_probability"]) <= 1
    features = json.loads(geojson.read_text())["features"]
    assert len(features) == result.n_objects
    feature = features[len(features) // 2]
    assert feature["properties"]["objectType"] == "detection" and feature["geometry"]["type"] == "Polygon"
    ring = np.array(feature["geometry"]["coordinates"][0])
    k = int(feature["properties"]["name"])
    ys, xs = np.nonzero(labels == k)  # the polygon hugs the object (level-0 pixels = working pixels here)
    assert np.array_equal(ring[0], ring[-1])
    assert xs.min() - 0.01 <= ring[:, 0].min() and ring[:, 0].max() <= xs.max() + 1.01
    assert ys.min() - 0.01 <= ring[:, 1].min() and ring[:, 1].max() <= ys.max() + 1.01
    with pytest.raises(FileExistsError):
        export_objects(out, table)


def _shoelace(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * abs(float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])))


def test_polygon_simplification_keeps_the_shape_exactly():
    from skimage.draw import disk, polygon as fill_polygon
    from skimage.measure import find_contours

    from napari_sgdc.wholeslide.tiles import drop_collinear

    mask = np.zeros((60, 80), bool)
    mask[disk((20, 20), 12)] = True
    mask[35:55, 40:75] = True  # long straight edges
    mask[fill_polygon([5, 30, 5], [45, 60, 75])] = True  # diagonal edges
    for region in (mask[:, :35], mask[:, 35:]):
        ring = max(find_contours(np.pad(region, 1).astype(np.float32), 0.5), key=len)
        simple = drop_collinear(ring)
        assert np.array_equal(simple[0], simple[-1]) and len(simple) < 0.7 * len(ring)
        assert _shoelace(simple) == pytest.approx(_shoelace(ring), abs=1e-6)  # the same polygon
        assert {tuple(p) for p in simple} <= {tuple(p) for p in ring}  # only vertices were dropped
    square = np.array([[0, 0], [0, 2], [2, 2], [2, 0], [0, 0]], float)
    np.testing.assert_array_equal(drop_collinear(square), square)  # nothing to drop


def test_roi_keeps_objects_with_centroid_inside(reference, slide_path, tmp_path):
    out = tmp_path / "roi.ome.zarr"
    result = segment_slide(PixelModel(), slide_path, out, roi=(300, 400, 500, 300), tile=TILE, margin=MARGIN)
    export_objects(out, tmp_path / "roi.csv")
    xy = np.loadtxt(tmp_path / "roi.csv", delimiter=",", skiprows=1, usecols=(1, 2), ndmin=2) / 0.25
    assert result.n_objects == len(xy) > 5
    assert (xy[:, 0] >= 300).all() and (xy[:, 0] < 800).all() and (xy[:, 1] >= 400).all() and (xy[:, 1] < 700).all()


def test_missing_mpp_refused_before_writing(tmp_path, rgb):
    path = write_slide(tmp_path / "nompp.tif", rgb[:512, :512], mpp=None, ome=False)
    out = tmp_path / "nompp.ome.zarr"
    with pytest.raises(SlideError, match="mpp") as error:
        segment_slide(PixelModel(), path, out, tile=TILE, margin=MARGIN)
    assert str(path) in str(error.value) and "\n" not in str(error.value) and not out.exists()
    assert segment_slide(PixelModel(), path, out, mpp=0.25, tile=TILE, margin=MARGIN).n_objects > 0


def test_cli_predict_on_a_slide(slide_path, tmp_path):
    import torch

    from napari_sgdc.cli import main
    from napari_sgdc.checkpoints import save_checkpoint
    from napari_sgdc.model import build_model, tiny_config

    torch.manual_seed(0)
    checkpoint = save_checkpoint(tmp_path / "tiny.safetensors",
                                 build_model(tiny_config(task="instance", mpp=0.25)).eval())
    args = ["predict", "--model", str(checkpoint), "--out", str(tmp_path / "out"), "--device", "cpu",
            "--slide-tile", "512", "--threshold", "0.2", str(slide_path)]
    assert main(args) == 0
    out = tmp_path / "out"
    assert (out / "syn.ome.zarr" / ".zattrs").is_file()
    assert (out / "syn_objects.csv").is_file() and (out / "syn_objects.geojson").is_file()
    assert main(args) == 1  # the store exists: refused


def test_cli_slide_options_are_honoured_or_refused(rgb, tmp_path, capsys):
    import shutil

    import torch

    from napari_sgdc.cli import main
    from napari_sgdc.checkpoints import save_checkpoint
    from napari_sgdc.model import build_model, tiny_config
    from napari_sgdc.wholeslide import open_store

    torch.manual_seed(0)
    checkpoint = save_checkpoint(tmp_path / "tiny.safetensors",
                                 build_model(tiny_config(task="instance", mpp=0.25)).eval())
    slide = write_slide(tmp_path / "case.01.ome.tif", rgb[:512, :512])
    base = ["predict", "--model", str(checkpoint), "--device", "cpu", "--slide-tile", "512"]
    out = tmp_path / "tta"
    assert main([*base, "--out", str(out), "--tta", str(slide)]) == 0
    assert open_store(out / "case.01.ome.zarr").plan.tta  # --tta reached the tiles (and the resume signature)
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "u"), "--uncertainty", str(slide)]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "uncertainty" in errors[0]
    assert not (tmp_path / "u" / "case.01.ome.zarr").exists()
    twin = tmp_path / "twin" / "case.01.tif"  # same stem, other suffix: both would write case.01.*
    twin.parent.mkdir()
    shutil.copy(slide, twin)
    assert main([*base, "--out", str(tmp_path / "both"), str(slide), str(twin)]) == 1
    assert "would both write case.01.ome.zarr" in capsys.readouterr().err
    assert not (tmp_path / "both").exists()  # refused before any work


@pytest.fixture(scope="module")
def cluster():
    distributed = pytest.importorskip("distributed")
    import cloudpickle

    cloudpickle.register_pickle_by_value(_slides)  # workers need not import the test helpers
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as lc, \
            distributed.Client(lc) as client:
        yield client


def test_two_workers_equal_single_process(cluster, reference, slide_path, tmp_path):
    out = tmp_path / "w2.ome.zarr"
    segment_slide(PixelModel(), slide_path, out, tile=TILE, margin=MARGIN, client=cluster, threads=1)
    _assert_same_store(out, reference[0])


def test_killed_worker_tiles_are_retried(cluster, reference, slide_path, tmp_path):
    out = tmp_path / "killed.ome.zarr"
    killed = []

    def progress(done, total):
        if done == 4 and not killed:
            pids = cluster.run(os.getpid)
            victim = sorted(pids.values())[0]
            os.kill(victim, 9)
            killed.append(victim)

    segment_slide(PixelModel(delay=0.15), slide_path, out, tile=TILE, margin=MARGIN, client=cluster, threads=1,
                  progress=progress)
    assert killed
    _assert_same_store(out, reference[0])


def test_reader_opens_slide_and_store_lazily(reference, slide_path):
    import dask.array as da

    from napari_sgdc._napari._reader import get_reader

    reader = get_reader(str(slide_path))
    [(levels, meta, kind)] = reader(str(slide_path))
    assert kind == "image" and meta["multiscale"] and meta["rgb"] and meta["scale"] == (0.25, 0.25)
    assert all(isinstance(level, da.Array) for level in levels)  # nothing read yet
    assert [level.shape[:2] for level in levels] == [(1280, 1536), (640, 768), (320, 384)]
    layers = get_reader(str(reference[0]))(str(reference[0]))
    kinds = [kind for _, _, kind in layers]
    assert kinds == ["image", "image", "labels", "labels"]
    nuclei, meta, _ = layers[2]
    assert meta["multiscale"] and meta["scale"] == (0.25, 0.25) and isinstance(nuclei[0], da.Array)
    np.testing.assert_array_equal(np.asarray(nuclei[0]), read_store_labels(reference[0]))
    assert get_reader("image.png") is None and get_reader(str(slide_path.parent)) is None


def test_a_model_given_by_name_or_path_brings_its_scale_and_defaults(tmp_path, slide_path):
    """Cluster runs pass the model as a path (each worker loads it): the plan must not change."""
    import torch

    from napari_sgdc.checkpoints import save_checkpoint
    from napari_sgdc.model import build_model, tiny_config

    torch.manual_seed(0)
    model = build_model(tiny_config(task="instance", mpp=0.25, threshold=0.6, split_level=0.2,
                                    min_size=30)).eval()
    path = save_checkpoint(tmp_path / "m.safetensors", model)
    roi = (0, 0, TILE, TILE)
    by_path = segment_slide(str(path), slide_path, tmp_path / "a.ome.zarr", roi=roi, tile=TILE, margin=MARGIN)
    by_object = segment_slide(model, slide_path, tmp_path / "b.ome.zarr", roi=roi, tile=TILE, margin=MARGIN)
    plans = [json.loads((tmp_path / name / ".zattrs").read_text())["napari_sgdc"]["plan"]
             for name in ("a.ome.zarr", "b.ome.zarr")]
    assert plans[0] == plans[1]
    assert (plans[0]["threshold"], plans[0]["split_level"], plans[0]["min_size"]) == (0.6, 0.2, 30)
    assert by_path.working_mpp == by_object.working_mpp == 0.25 and by_path.n_objects == by_object.n_objects


class CountingModel(PixelModel):
    """PixelModel that counts its forward passes."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x, return_gates=False):
        self.calls += 1
        return super().forward(x, return_gates)


def test_tta_is_honoured_on_slides_and_part_of_the_resume_settings(slide_path, tmp_path):
    from napari_sgdc.wholeslide import open_store

    one_tile = dict(roi=(0, 0, TILE, TILE), tissue="none", tile=TILE, margin=MARGIN)
    plain, augmented = CountingModel(), CountingModel()
    segment_slide(plain, slide_path, tmp_path / "plain.ome.zarr", **one_tile)
    segment_slide(augmented, slide_path, tmp_path / "tta.ome.zarr", tta=True, **one_tile)
    assert plain.calls == 1 and augmented.calls == 8  # the 8 flips and rotations of the one tile
    assert open_store(tmp_path / "tta.ome.zarr").plan.tta and not open_store(tmp_path / "plain.ome.zarr").plan.tta
    with pytest.raises(ValueError, match="other settings"):
        segment_slide(PixelModel(), slide_path, tmp_path / "tta.ome.zarr", resume=True, **one_tile)
    assert segment_slide(PixelModel(), slide_path, tmp_path / "tta.ome.zarr", resume=True, tta=True,
                         **one_tile).tiles_resumed == 1


def test_a_store_written_before_tta_existed_resumes_as_tta_off(slide_path, tmp_path):
    from napari_sgdc.wholeslide import open_store

    out = tmp_path / "old.ome.zarr"
    one_tile = dict(roi=(0, 0, TILE, TILE), tissue="none", tile=TILE, margin=MARGIN)
    segment_slide(PixelModel(), slide_path, out, **one_tile)
    attrs = json.loads((out / ".zattrs").read_text())
    del attrs["napari_sgdc"]["plan"]["tta"], attrs["napari_sgdc"]["plan"]["amp"]
    (out / ".zattrs").write_text(json.dumps(attrs))
    assert not open_store(out).plan.tta
    assert segment_slide(PixelModel(), slide_path, out, resume=True, **one_tile).tiles_resumed == 1
    with pytest.raises(ValueError, match="other settings"):
        segment_slide(PixelModel(), slide_path, out, resume=True, tta=True, **one_tile)


def test_uncertainty_is_refused_on_slides_in_one_line(slide_path, tmp_path):
    with pytest.raises(ValueError, match="not available for whole slides") as error:
        segment_slide(PixelModel(), slide_path, tmp_path / "u.ome.zarr", uncertainty=True)
    assert "\n" not in str(error.value) and not (tmp_path / "u.ome.zarr").exists()


@pytest.mark.parametrize("name, stem", [("case.01.svs", "case.01"), ("case.01.ome.tif", "case.01"),
                                        ("case.01.ome.tiff", "case.01"), ("a.b.c.ndpi", "a.b.c"),
                                        ("syn.ome.zarr", "syn"), ("slide.tif", "slide"), ("S.OME.TIF", "S")])
def test_one_stem_rule(name, stem):
    from napari_sgdc.wholeslide import slide_stem, store_paths

    assert slide_stem(name) == slide_stem(f"/some/folder/{name}") == stem
    paths = store_paths("out", name)
    assert [p.name for p in paths] == [f"{stem}.ome.zarr", f"{stem}_objects.csv", f"{stem}_objects.geojson"]


def test_multi_dot_slide_names_give_distinct_stores(rgb, tmp_path):
    from napari_sgdc.wholeslide import open_store, store_paths

    stores = []
    for name in ("case.01.ome.tif", "case.02.ome.tif"):
        path = write_slide(tmp_path / name, rgb[:512, :512])
        store = store_paths(tmp_path / "out", path).store
        segment_slide(PixelModel(), path, store, tile=TILE, margin=MARGIN)
        stores.append(open_store(store))
    assert [s.path.name for s in stores] == ["case.01.ome.zarr", "case.02.ome.zarr"]
    assert [s.stem for s in stores] == ["case.01", "case.02"]
    root = zarr.open_group(str(stores[0].path), mode="r")
    assert root.attrs["multiscales"][0]["name"] == "case.01"


def test_the_callers_slide_is_untouched(rgb, tmp_path):
    path = write_slide(tmp_path / "nompp.tif", rgb[:512, :512], mpp=None, ome=False)
    with open_slide(path) as slide:
        result = segment_slide(PixelModel(), slide, tmp_path / "a.ome.zarr", mpp=0.25, tile=TILE, margin=MARGIN)
        assert slide.mpp is None and result.n_objects > 0
    with open_slide(write_slide(tmp_path / "x20.ome.tif", rgb[:512, :512], mpp=0.5)) as slide:
        before = dict(vars(slide))
        result = segment_slide(PixelModel(), slide, tmp_path / "b.ome.zarr", mpp=0.25, tile=TILE, margin=MARGIN)
        assert slide.mpp == 0.5 and vars(slide) == before and result.shape == (512, 512)  # read at 0.25 as asked


def test_one_policy_for_existing_outputs(reference, tmp_path):
    from napari_sgdc.wholeslide import check_outputs, open_store, store_state

    store = reference[0]
    plan = open_store(store).plan
    assert check_outputs(tmp_path / "none.ome.zarr", plan) == "create"
    assert check_outputs(store, plan, resume=True) == "resume" and check_outputs(store, overwrite=True) == "replace"
    with pytest.raises(StoreExistsError, match="already exists"):
        check_outputs(store, plan)
    table = tmp_path / "t.csv"
    table.write_text("x")
    with pytest.raises(StoreExistsError, match="t.csv already exists"):
        check_outputs(tmp_path / "none.ome.zarr", others=(table,))
    assert check_outputs(tmp_path / "none.ome.zarr", others=(table,), overwrite=True) == "create"
    foreign = tmp_path / "foreign.ome.zarr"
    foreign.mkdir()
    assert store_state(foreign) == "foreign" and store_state(store) == "complete"
    with pytest.raises(StoreExistsError, match="not a napari-sgdc slide store"):
        check_outputs(foreign, overwrite=True)


def test_result_store_api(reference, slide_path):
    from napari_sgdc.wholeslide import open_store

    out, result = reference
    store = open_store(out)
    assert store.complete and store.state == "complete" and store.stem == "syn" and store.working_mpp == 0.25
    assert store.n_objects == result.n_objects and store.levels >= 3 and store.roi == (0, 0, 1280, 1536)
    plan = store.plan
    assert (plan.tile, plan.margin, plan.height, plan.width, plan.tta, plan.amp) == (TILE, MARGIN, 1280, 1536,
                                                                                    False, False)
    np.testing.assert_array_equal(store.labels(1), read_store_labels(out, 1))
    assert store.crop_box((100, 200, 300, 50)) == (200, 100, 50, 300)
    assert store.crop_box((0, 0, 1536, 1280), max_side=512) == (384, 512, 512, 512)
    with open_slide(slide_path) as slide:
        np.testing.assert_array_equal(store.read_pixels(200, 100, 50, 300), slide.read_region(100, 200, 300, 50))
    with pytest.raises(ValueError, match="not a napari-sgdc slide store"):
        open_store(slide_path.parent)


def test_stores_written_before_the_vocabulary_renames_still_resume_and_export(slide_path, tmp_path):
    """Plans recorded with ``mpp`` / ``boundary_threshold`` (before 0.2) read as working_mpp / split_level."""
    from napari_sgdc.wholeslide import open_store

    out = tmp_path / "old.ome.zarr"
    one_tile = dict(roi=(0, 0, TILE, TILE), tissue="none", tile=TILE, margin=MARGIN)
    result = segment_slide(PixelModel(), slide_path, out, **one_tile)
    with pytest.warns(DeprecationWarning):
        assert result.mpp == result.working_mpp == 0.25
    attrs = json.loads((out / ".zattrs").read_text())
    plan = attrs["napari_sgdc"]["plan"]
    plan["mpp"], plan["boundary_threshold"] = plan.pop("working_mpp"), plan.pop("split_level")
    (out / ".zattrs").write_text(json.dumps(attrs))
    assert open_store(out).working_mpp == 0.25
    assert segment_slide(PixelModel(), slide_path, out, resume=True, **one_tile).tiles_resumed == 1
    assert export_objects(out, tmp_path / "old.csv") == result.n_objects


def _check_qupath_object(feature: dict) -> None:
    """QuPath's reader of one GeoJSON object (PathObjectTypeAdapters, QuPath 0.4/0.5): a Feature with an optional
    UUID ``id``, a geometry, and ``properties`` with ``objectType``, ``name``, ``classification`` ({name, color
    [r, g, b]} or the older packed ``colorRGB``) and ``measurements`` (name → number, or a list of {name, value})."""
    import uuid

    assert set(feature) <= {"type", "id", "geometry", "properties", "nucleusGeometry"} and feature["type"] == "Feature"
    uuid.UUID(feature["id"])  # a non-UUID id is ignored by QuPath
    geometry = feature["geometry"]
    assert set(geometry) == {"type", "coordinates"} and geometry["type"] == "Polygon"
    for ring in geometry["coordinates"]:
        ring = np.asarray(ring, float)
        assert ring.ndim == 2 and ring.shape[1] == 2 and len(ring) >= 4 and np.isfinite(ring).all()
        assert np.array_equal(ring[0], ring[-1]) and ring.min() >= 0  # closed, in pixels of the full-resolution image
    properties = feature["properties"]
    assert properties["objectType"] in {"detection", "annotation", "cell", "tile", "tmaCore"}
    assert isinstance(properties.get("name", ""), str)
    classification = properties["classification"]
    assert isinstance(classification["name"], str) and classification["name"]
    color = classification["color"]
    assert len(color) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in color)
    if "colorRGB" in classification:  # QuPath 0.3: packed signed ARGB
        r, g, b = color
        assert classification["colorRGB"] == int(np.array(0xFF000000 | r << 16 | g << 8 | b, np.uint32).view(np.int32))
    measurements = properties["measurements"]
    if isinstance(measurements, list):
        measurements = {m["name"]: m["value"] for m in measurements}
    assert measurements and all(isinstance(name, str) and isinstance(value, (int, float)) and np.isfinite(value)
                                for name, value in measurements.items())


def test_geojson_matches_qupaths_object_schema_and_the_table(reference, rgb, tmp_path):
    """Every exported feature is a QuPath object; its measurements are the table's row: area (µm²), the
    polygon's perimeter (µm), the mean haematoxylin OD of the object's pixels and the mean probability."""
    from napari_sgdc.wholeslide.export import QUPATH_MEASUREMENTS
    from napari_sgdc.wholeslide.tiles import haematoxylin_od

    out, result = reference
    table, geojson = tmp_path / "o.csv", tmp_path / "o.geojson"
    export_objects(out, table, geojson)

    def no_constants(token):
        raise AssertionError(f"{token} is not JSON")

    collection = json.loads(geojson.read_text(encoding="utf-8"), parse_constant=no_constants)
    assert set(collection) == {"type", "features"} and collection["type"] == "FeatureCollection"
    with open(table) as stream:
        rows = {int(row["id"]): row for row in csv.DictReader(stream)}
    features = collection["features"]
    assert len(features) == len(rows) == result.n_objects
    assert len({feature["id"] for feature in features}) == len(features)
    labels = read_store_labels(out)
    od = haematoxylin_od(rgb)
    for feature in features:
        _check_qupath_object(feature)
        assert feature["properties"]["classification"]["name"] == "Nucleus"
        row, measurements = rows[int(feature["properties"]["name"])], feature["properties"]["measurements"]
        assert set(measurements) == set(QUPATH_MEASUREMENTS.values())
        for column, name in QUPATH_MEASUREMENTS.items():
            assert measurements[name] == pytest.approx(float(row[column]), abs=1e-4), (column, row["id"])
        ring = np.asarray(feature["geometry"]["coordinates"][0])
        length = np.hypot(*np.diff(ring, axis=0).T).sum()  # level-0 pixels = working pixels (0.25 µm) here
        assert measurements["Nucleus: Perimeter µm"] == pytest.approx(length * 0.25, abs=1e-3)
        area = measurements["Nucleus: Area µm^2"]
        roundness = measurements["Nucleus: Perimeter µm"] ** 2 / (4 * np.pi * area)  # a disc gives 1
        assert roundness >= 1.0 and roundness < 2.5
    for k in list(rows)[:: max(1, len(rows) // 25)]:
        inside = labels == k
        assert float(rows[k]["mean_haematoxylin_od"]) == pytest.approx(od[inside].mean(), abs=2e-4)
        assert float(rows[k]["mean_haematoxylin_od"]) > od[(labels == 0) & (rgb.min(axis=2) < 255)].mean() + 0.1


def test_haematoxylin_od_unmixes_pure_stains():
    """Beer–Lambert: a pixel of c units of pure haematoxylin reads c; pure eosin and white read 0."""
    from napari_sgdc.wholeslide.tiles import HE_STAINS, haematoxylin_od

    h, e = (np.array(s) / np.linalg.norm(s) for s in HE_STAINS)
    pixels = np.array([[255 * 10 ** (-c * h) for c in (0.3, 0.6)] + [255 * 10 ** (-0.5 * e), [255, 255, 255]]])
    measured = haematoxylin_od(np.round(pixels).astype(np.uint8))[0]
    np.testing.assert_allclose(measured, [0.3, 0.6, 0.0, 0.0], atol=0.01)


def test_records_written_before_a_measurement_existed_export_it_empty(reference, tmp_path):
    """A store whose tile records lack the haematoxylin OD (written by 0.2) still exports: an empty
    cell in the table, the measurement left out of the GeoJSON (which stays valid JSON)."""
    import shutil

    out = tmp_path / "old.ome.zarr"
    shutil.copytree(reference[0], out)
    for record in (out / "tiles").glob("*.npz"):
        with np.load(record) as data:
            arrays = {name: data[name] for name in data.files if name != "mean_haematoxylin_od"}
        np.savez(record, **arrays)
    table, geojson = tmp_path / "old.csv", tmp_path / "old.geojson"
    assert export_objects(out, table, geojson) == reference[1].n_objects
    with open(table) as stream:
        rows = list(csv.DictReader(stream))
    assert {row["mean_haematoxylin_od"] for row in rows} == {""} and all(row["perimeter_um"] for row in rows)
    features = json.loads(geojson.read_text(encoding="utf-8"))["features"]
    for feature in features:
        _check_qupath_object(feature)
        assert "Nucleus: Hematoxylin OD mean" not in feature["properties"]["measurements"]


# --------------------------------------------------------------------------- the store lifecycle (issue 26)

LIFECYCLE = {  # state: (plain run, resume, overwrite, export) as in docs/wholeslide.md
    "absent": ("create", "create", "create", "not a finished"),
    "new": ("exists", "resume", "replace", "not a finished"),
    "running": ("exists", "being written", "being written", "not a finished"),
    "interrupted": ("exists", "resume", "replace", "not a finished"),
    "failed": ("exists", "resume", "replace", "not a finished"),
    "complete": ("exists", "nothing", "replace", "export"),
    "foreign": ("not a napari-sgdc", "not a napari-sgdc", "not a napari-sgdc", "not a finished"),
}


def _store_in_state(state, slide_path, out):
    import socket

    from napari_sgdc.wholeslide.store import update_attrs

    one_tile = dict(roi=(0, 0, TILE, TILE), tissue="none", tile=TILE, margin=MARGIN)
    if state == "foreign":
        out.mkdir()
        (out / "mine.txt").write_text("x")
    elif state != "absent":
        segment_slide(PixelModel(), slide_path, out, **one_tile)
        if state != "complete":
            owner = {"pid": os.getpid(), "host": socket.gethostname()} if state == "running" else None
            update_attrs(out, complete=False, status=state, owner=owner)
    return one_tile


@pytest.mark.parametrize("state", list(LIFECYCLE))
@pytest.mark.parametrize("command", ["plain", "resume", "overwrite", "export"])
def test_every_cell_of_the_lifecycle_table(state, command, slide_path, tmp_path):
    from napari_sgdc.wholeslide import store_status

    out = tmp_path / "s.ome.zarr"
    one_tile = _store_in_state(state, slide_path, out)
    assert store_status(out) == state
    expected = LIFECYCLE[state][["plain", "resume", "overwrite", "export"].index(command)]
    before = sorted(p.relative_to(out) for p in out.rglob("*")) if out.exists() else []
    flags = {"resume": {"resume": True}, "overwrite": {"overwrite": True}}.get(command, {})
    if command == "export":
        if expected == "export":
            assert export_objects(out, tmp_path / "t.csv") >= 0
        else:
            with pytest.raises(ValueError, match=expected):
                export_objects(out, tmp_path / "t.csv")
        return
    if expected in ("create", "resume", "replace", "nothing"):
        result = segment_slide(PixelModel(), slide_path, out, **flags, **one_tile)
        assert store_status(out) == "complete" and result.tiles_run == 1
        assert result.tiles_resumed == {"create": 0, "replace": 0}.get(expected, 1)
        if expected == "replace":
            assert not Path(f"{out}.incoming").exists() and not Path(f"{out}.outgoing").exists()
    else:
        with pytest.raises((StoreExistsError, ValueError), match=expected):
            segment_slide(PixelModel(), slide_path, out, **flags, **one_tile)
        assert (sorted(p.relative_to(out) for p in out.rglob("*")) if out.exists() else []) == before


def test_an_absurd_plan_asks_for_yes(slide_path, tmp_path):
    from napari_sgdc.predict import predict_slides

    errors = []
    model = PixelModel()
    failed = predict_slides(model, [slide_path], tmp_path, None, model_source="x", mpp=50, tile=TILE,
                            margin=MARGIN, tissue="none", on_error=errors.append)  # a 200x enlarged slide
    assert failed == 1 and "enlarges the slide 200.0x" in errors[0] and "--yes" in errors[0]
    assert "tiles" in errors[0] and " h on a CPU" in errors[0]
    assert not (tmp_path / "syn.ome.zarr").exists()
    asked = []
    predict_slides(model, [slide_path], tmp_path, None, model_source="x", mpp=2.0, tile=TILE, margin=MARGIN,
                   tissue="none", roi=(0, 0, 20, 20), on_error=errors.append, confirm=lambda q: asked.append(q))
    assert asked and not (tmp_path / "syn.ome.zarr").exists()  # answered no
    assert predict_slides(model, [slide_path], tmp_path, None, model_source="x", mpp=2.0, tile=TILE, margin=MARGIN,
                          tissue="none", roi=(0, 0, 20, 20), yes=True) == 0


def test_slide_labels_are_uint32(reference):
    """Finding 17: a slide's labels have one type, uint32, whatever the object count (was int32)."""
    out, result = reference
    root = zarr.open_group(str(out), mode="r")
    levels = len(root["labels/nuclei"].attrs["multiscales"][0]["datasets"])
    assert all(root[f"labels/nuclei/{level}"].dtype == np.uint32 for level in range(levels))
    assert read_store_labels(out).dtype == np.uint32 and read_store_labels(out).max() == result.n_objects
