"""Nucleus types in the outputs (issue 23): ``predict``'s S_classes.tif and S_objects.csv, and whole slides
(the object table's class columns, the QuPath classification, the store's classes, old stores)."""

from __future__ import annotations

import csv
import json
import sys
import types

import numpy as np
import pytest
import tifffile
import torch
from skimage import io as skio

from _slides import PixelModel, TypedPixelModel, synthetic_rgb, write_slide
from napari_sgdc.files import CLASS_COLUMNS, OBJECT_COLUMNS_PX
from napari_sgdc.inference import predict_maps
from napari_sgdc.model import build_model, tiny_config
from napari_sgdc.postprocess import assign_types
from napari_sgdc.predict import check_outputs, predict_files, segment_file
from napari_sgdc.wholeslide import OBJECT_COLUMNS, export_objects, open_store, read_store_labels, segment_slide

torch.set_num_threads(1)
TILE, MARGIN = 256, 32
NAMES, COLORS = TypedPixelModel.TYPES["type_names"], TypedPixelModel.TYPES["type_colors"]
RGB = {"#1e90ff": [30, 144, 255], "#ff8000": [255, 128, 0]}


def _rows(path) -> list[dict]:
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


@pytest.fixture(scope="module")
def image_rgb():
    return synthetic_rgb(size=(256, 320), seed=3, n_nuclei=40)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory, image_rgb):
    path = tmp_path_factory.mktemp("images") / "cells.png"
    skio.imsave(str(path), image_rgb, check_contrast=False)
    return path


# --------------------------------------------------------------------------- predict on images


def test_predict_writes_the_class_map_and_one_csv_row_per_object(image_path, tmp_path):
    model = TypedPixelModel()
    summary = predict_files(model, [image_path], tmp_path, tile=0)
    assert summary.done == 1 and not summary.failures
    result = segment_file(model, image_path, tile=0)
    classes = tifffile.imread(str(tmp_path / "cells_classes.tif"))
    labels = tifffile.imread(str(tmp_path / "cells_labels.tif"))
    assert classes.dtype == np.uint8 and classes.shape == labels.shape == (256, 320)
    np.testing.assert_array_equal(classes, result.type_map)
    np.testing.assert_array_equal(classes, result.object_types[labels])  # each object's pixels carry its class
    rows = _rows(tmp_path / "cells_objects.csv")
    assert tuple(rows[0]) == OBJECT_COLUMNS_PX + CLASS_COLUMNS
    ids = np.unique(labels[labels > 0])
    assert [int(row["id"]) for row in rows] == ids.tolist() and len(ids) > 20
    assert {row["class"] for row in rows} == set(NAMES)  # both types occur
    rows_grid, cols_grid = np.indices(labels.shape)
    for row in rows:
        k, inside = int(row["id"]), labels == int(row["id"])
        assert int(row["class_id"]) == result.object_types[k] and row["class"] == NAMES[int(row["class_id"]) - 1]
        assert float(row["class_confidence"]) == pytest.approx(result.type_confidence[k], abs=1e-4)
        assert int(row["area_px"]) == inside.sum()
        assert float(row["centroid_y_px"]) == pytest.approx(rows_grid[inside].mean(), abs=1e-4)
        assert float(row["centroid_x_px"]) == pytest.approx(cols_grid[inside].mean(), abs=1e-4)
        assert float(row["mean_probability"]) == pytest.approx(result.probability[inside].mean(), abs=1e-4)


def test_an_untyped_model_writes_no_class_map_and_a_table_without_classes(image_path, tmp_path):
    assert predict_files(PixelModel(), [image_path], tmp_path / "plain", tile=0, uncertainty=True).done == 1
    assert not (tmp_path / "plain" / "cells_classes.tif").exists()
    rows = _rows(tmp_path / "plain" / "cells_objects.csv")
    assert tuple(rows[0]) == OBJECT_COLUMNS_PX + ("confidence",)  # the object confidence of --uncertainty
    labels = tifffile.imread(str(tmp_path / "plain" / "cells_labels.tif"))
    assert len(rows) == len(np.unique(labels[labels > 0])) > 20
    semantic = build_model(tiny_config()).eval()
    assert predict_files(semantic, [image_path], tmp_path / "semantic", tile=0).done == 1
    assert sorted(p.name for p in (tmp_path / "semantic").iterdir()) == ["cells_boundary.tif", "cells_mask.png",
                                                                         "cells_prob.tif"]


def test_an_existing_class_map_is_refused_before_any_work_unless_overwrite(image_path, tmp_path):
    (tmp_path / "cells_classes.tif").write_bytes(b"the user's file")
    with pytest.raises(ValueError, match="cells_classes.tif already exists"):
        predict_files(TypedPixelModel(), [image_path], tmp_path, tile=0)
    assert (tmp_path / "cells_classes.tif").read_bytes() == b"the user's file" and not any(tmp_path.glob("*.png"))
    predict_files(PixelModel(), [image_path], tmp_path, tile=0)  # no class map: the file is not in the way
    assert (tmp_path / "cells_classes.tif").read_bytes() == b"the user's file"
    assert predict_files(TypedPixelModel(), [image_path], tmp_path, tile=0, overwrite=True).done == 1
    assert tifffile.imread(str(tmp_path / "cells_classes.tif")).max() == 2


def test_an_image_and_a_slide_of_one_stem_are_refused_together(tmp_path):
    image = tmp_path / "case.png"
    with pytest.raises(ValueError, match="would both write case_objects.csv"):
        check_outputs([image], tmp_path / "out", instances=True, uncertainty=False, overwrite=True,
                      slides=[tmp_path / "case.svs"])
    check_outputs([image], tmp_path / "out", instances=False, uncertainty=False, overwrite=False,
                  slides=[tmp_path / "case.svs"])  # a semantic model writes no object table


def test_a_typed_network_gives_its_classes_through_predict(tmp_path):
    torch.manual_seed(0)
    model = build_model(tiny_config(task="instance", instance_map="hover", type_names=("a", "b"),
                                    type_colors=("#ff0000", "#00ff00"))).eval()
    with torch.no_grad():  # every pixel foreground, type "b"
        model.mask_head.bias.fill_(20.0)
        model.type_head[1].weight.zero_()
        model.type_head[1].bias.copy_(torch.tensor([0.0, 5.0]))
    path = tmp_path / "flat.png"
    skio.imsave(str(path), np.zeros((64, 64, 3), np.uint8), check_contrast=False)
    assert predict_files(model, [path], tmp_path / "out", tile=0).done == 1
    labels = tifffile.imread(str(tmp_path / "out" / "flat_labels.tif"))
    classes = tifffile.imread(str(tmp_path / "out" / "flat_classes.tif"))
    assert labels.max() >= 1 and np.array_equal(classes, np.where(labels > 0, 2, 0))
    rows = _rows(tmp_path / "out" / "flat_objects.csv")
    assert rows and {row["class"] for row in rows} == {"b"} and all(float(r["class_confidence"]) > 0.9 for r in rows)


# --------------------------------------------------------------------------- whole slides


@pytest.fixture(scope="module")
def slide_rgb():
    return synthetic_rgb(size=(512, 640), seed=1, n_nuclei=70)


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory, slide_rgb):
    return write_slide(tmp_path_factory.mktemp("slide") / "typed.ome.tif", slide_rgb)


@pytest.fixture(scope="module")
def typed_store(slide_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("typed") / "typed.ome.zarr"
    return out, segment_slide(TypedPixelModel(), slide_path, out, tile=TILE, margin=MARGIN)


def test_predict_maps_gives_type_probabilities_for_typed_models_only(slide_rgb):
    window = slide_rgb[:128, :160]
    probability, separation, typed = predict_maps(TypedPixelModel(), window, types=True)
    assert typed.shape == (128, 160, 2) and typed.dtype == np.float32
    np.testing.assert_allclose(typed.sum(axis=-1), 1.0, atol=1e-5)
    assert predict_maps(PixelModel(), window, types=True)[2] is None
    assert len(predict_maps(TypedPixelModel(), window)) == 2  # the old call is unchanged


def test_slide_objects_carry_the_class_of_their_pixels(typed_store, slide_rgb, tmp_path):
    """Each object's class is the type of highest mean probability over its pixels: as `assign_types` gives on
    the whole slide in one piece (a pixel-wise model: tiling cannot change the maps)."""
    out, result = typed_store
    table = tmp_path / "typed_objects.csv"
    assert export_objects(out, table) == result.n_objects > 40
    rows = _rows(table)
    assert tuple(rows[0]) == OBJECT_COLUMNS + CLASS_COLUMNS
    labels = read_store_labels(out)
    _, _, typed = predict_maps(TypedPixelModel(), slide_rgb, types=True)
    expected, confidence = assign_types(labels, typed)
    assert {row["class"] for row in rows} == set(NAMES)
    for row in rows:
        k = int(row["id"])
        assert int(row["class_id"]) == expected[k] and row["class"] == NAMES[expected[k] - 1], k
        assert float(row["class_confidence"]) == pytest.approx(confidence[k], abs=1e-4)
    store = open_store(out)  # the store reopens with its types and each object's class
    assert store.type_names == NAMES and store.type_colors == COLORS
    types_table, confidence_table = store.object_types()
    assert types_table.dtype == np.int16 and types_table.shape == (result.n_objects + 1,)
    np.testing.assert_array_equal(types_table, expected)
    np.testing.assert_allclose(confidence_table, confidence, atol=1e-5)


def test_geojson_classifies_each_nucleus_by_its_type(typed_store, tmp_path):
    from test_wholeslide import _check_qupath_object

    out, result = typed_store
    table, geojson = tmp_path / "o.csv", tmp_path / "o.geojson"
    export_objects(out, table, geojson)
    rows = {int(row["id"]): row for row in _rows(table)}
    features = json.loads(geojson.read_text(encoding="utf-8"))["features"]
    assert len(features) == len(rows) == result.n_objects
    for feature in features:
        _check_qupath_object(feature)  # QuPath's schema, the packed colorRGB included
        row = rows[int(feature["properties"]["name"])]
        classification = feature["properties"]["classification"]
        assert classification["name"] == row["class"]
        assert classification["color"] == RGB[COLORS[int(row["class_id"]) - 1]]
        assert feature["properties"]["measurements"]["Nucleus: Class confidence"] == \
            pytest.approx(float(row["class_confidence"]), abs=1e-4)


def test_a_parquet_table_carries_the_class_columns(typed_store, tmp_path, monkeypatch):
    import pandas as pd

    written = {}
    monkeypatch.setitem(sys.modules, "pyarrow", types.ModuleType("pyarrow"))  # not installed here: the frame is caught
    monkeypatch.setattr(pd.DataFrame, "to_parquet", lambda frame, path, index: written.update(frame=frame))
    out, result = typed_store
    assert export_objects(out, tmp_path / "o.parquet") == result.n_objects
    frame = written["frame"]
    assert tuple(frame.columns) == OBJECT_COLUMNS + CLASS_COLUMNS
    assert set(frame["class"]) == set(NAMES) and frame["class_id"].dtype.kind == "i"
    assert frame["class_confidence"].between(0.5, 1.0).all()


def test_a_typed_run_resumes_only_with_a_typed_model(typed_store, slide_path, tmp_path):
    one_tile = dict(roi=(0, 0, TILE, TILE), tissue="none", tile=TILE, margin=MARGIN)
    out = tmp_path / "t.ome.zarr"
    segment_slide(TypedPixelModel(), slide_path, out, **one_tile)
    with pytest.raises(ValueError, match="other settings"):  # same weights (none), but no types: refused
        segment_slide(PixelModel(), slide_path, out, resume=True, **one_tile)
    assert segment_slide(TypedPixelModel(), slide_path, out, resume=True, **one_tile).tiles_resumed == 1


def test_a_store_written_before_types_existed_opens_resumes_and_exports(slide_path, tmp_path):
    """An untyped store whose plan and records have no class fields (written before types): it opens without
    types, resumes with the same untyped model, and exports the old columns and the class ``Nucleus``."""
    out = tmp_path / "old.ome.zarr"
    one_tile = dict(roi=(0, 0, TILE, TILE), tissue="none", tile=TILE, margin=MARGIN)
    segment_slide(PixelModel(), slide_path, out, **one_tile)
    attrs = json.loads((out / ".zattrs").read_text())
    del attrs["napari_sgdc"]["plan"]["type_names"], attrs["napari_sgdc"]["plan"]["type_colors"]
    (out / ".zattrs").write_text(json.dumps(attrs))
    for record in (out / "tiles").glob("*.npz"):
        with np.load(record) as data:
            assert "class_id" not in data.files
    store = open_store(out)
    assert store.type_names == () and not store.object_types()[0].any()
    assert segment_slide(PixelModel(), slide_path, out, resume=True, **one_tile).tiles_resumed == 1
    with pytest.raises(ValueError, match="other settings"):
        segment_slide(TypedPixelModel(), slide_path, out, resume=True, **one_tile)
    table, geojson = tmp_path / "old.csv", tmp_path / "old.geojson"
    count = export_objects(out, table, geojson)
    rows = _rows(table)
    assert count == len(rows) > 0 and tuple(rows[0]) == OBJECT_COLUMNS
    features = json.loads(geojson.read_text(encoding="utf-8"))["features"]
    assert {f["properties"]["classification"]["name"] for f in features} == {"Nucleus"}
    assert all("Nucleus: Class confidence" not in f["properties"]["measurements"] for f in features)


def test_cli_predict_with_a_typed_checkpoint(slide_path, tmp_path, capsys):
    """``napari-sgdc predict`` with a typed checkpoint writes the class map; an image and a slide of one stem
    in one --out folder are refused in one line before any work (both would write S_objects.csv)."""
    from napari_sgdc.checkpoints import save_checkpoint
    from napari_sgdc.cli import main

    torch.manual_seed(0)
    model = build_model(tiny_config(task="instance", instance_map="hover", type_names=("a", "b"),
                                    type_colors=("#ff0000", "#00ff00"))).eval()
    with torch.no_grad():
        model.mask_head.bias.fill_(20.0)
        model.type_head[1].weight.zero_()
        model.type_head[1].bias.copy_(torch.tensor([5.0, 0.0]))  # every nucleus type "a"
    checkpoint = save_checkpoint(tmp_path / "typed.safetensors", model)
    image = tmp_path / "in" / "typed.png"
    image.parent.mkdir()
    skio.imsave(str(image), np.zeros((64, 64, 3), np.uint8), check_contrast=False)
    out = tmp_path / "out"
    args = ["predict", "--model", str(checkpoint), "--out", str(out), "--device", "cpu", "--tile", "64"]
    assert main([*args, str(image), str(slide_path)]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "would both write typed_objects.csv" in errors[0]
    assert not out.exists() or not any(out.iterdir())
    assert main([*args, str(image)]) == 0
    labels = tifffile.imread(str(out / "typed_labels.tif"))
    classes = tifffile.imread(str(out / "typed_classes.tif"))
    assert labels.max() >= 1 and np.array_equal(classes, np.where(labels > 0, 1, 0))
    assert {row["class"] for row in _rows(out / "typed_objects.csv")} == {"a"}
