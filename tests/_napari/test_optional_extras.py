"""Base dependencies open both docks: each optional library hidden in turn, the docks still open through
napari's plugin machinery, and the feature that needs the library says so in one line. (onnxruntime only
runs exported packages in the tests: no feature of the plugin needs it.)"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/_slides.py

from _slides import PixelModel, synthetic_rgb, write_slide  # noqa: E402

pytestmark = pytest.mark.gui

OPTIONAL = ("matplotlib", "distributed", "pandas", "bioimageio.spec", "onnx", "onnxruntime")
ALSO_HIDDEN = {"distributed": ("dask.distributed",)}  # dask's own alias of the package


def hide(monkeypatch, name: str) -> None:
    """Makes `name` (and its submodules, loaded or not) unimportable for this test: ``sys.modules[m] = None``."""
    for module in (name, *ALSO_HIDDEN.get(name, ())):
        for key in [key for key in sys.modules if key.startswith(module + ".")]:
            monkeypatch.setitem(sys.modules, key, None)
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError):
        __import__(name)


def one_line(error: BaseException, hint: str) -> str:
    text = str(error)
    assert "\n" not in text and hint in text, text
    return text


@pytest.fixture(scope="module")
def finished_store(tmp_path_factory):
    """A small finished slide store (one tile) to export."""
    from napari_sgdc.wholeslide import segment_slide

    folder = tmp_path_factory.mktemp("store")
    slide = write_slide(folder / "s.ome.tif", synthetic_rgb((256, 256), n_nuclei=12))
    segment_slide(PixelModel(), slide, folder / "s.ome.zarr", tile=256, margin=32, tissue="none")
    return folder / "s.ome.zarr"


@pytest.mark.parametrize("name", OPTIONAL)
def test_both_docks_open_without_each_optional_library(make_napari_viewer, monkeypatch, name):
    hide(monkeypatch, name)
    viewer = make_napari_viewer()
    opened = {}
    for title in ("SGDC Segment", "SGDC Fine-tune"):
        _, widget = viewer.window.add_plugin_dock_widget("napari-sgdc", title)
        opened[title] = widget
    assert type(opened["SGDC Segment"]).__name__ == "SegmentWidget"
    assert type(opened["SGDC Fine-tune"]).__name__ == "FinetuneWidget"
    if name == "matplotlib":  # the loss as one line of text, the plot's extra named on it
        from qtpy.QtWidgets import QLabel

        label = opened["SGDC Fine-tune"].native.findChild(QLabel, "loss_text")
        assert label is not None and label.text() == "fine-tune loss: no run yet"
        one_line(Exception(label.toolTip()), "pip install 'napari-sgdc[plot]'")


@pytest.mark.parametrize("name", ["bioimageio.spec", "onnx"])
def test_export_without_the_export_extra_says_so_in_one_line(monkeypatch, tmp_path, tiny_checkpoint, name):
    import napari_sgdc

    hide(monkeypatch, name)
    with pytest.raises(ImportError) as error:
        napari_sgdc.export(tiny_checkpoint, tmp_path / "m.zip")
    assert name in one_line(error.value, "pip install 'napari-sgdc[export]'")
    assert not (tmp_path / "m.zip").exists()


def test_parquet_without_pandas_says_so_in_one_line(monkeypatch, tmp_path, finished_store):
    from napari_sgdc.wholeslide import export_objects

    hide(monkeypatch, "pandas")
    with pytest.raises(ImportError) as error:
        export_objects(finished_store, tmp_path / "t.parquet")
    one_line(error.value, "pip install 'napari-sgdc[parquet]'")
    assert not (tmp_path / "t.parquet").exists()
    assert export_objects(finished_store, tmp_path / "t.csv") >= 0  # the CSV table needs no extra


def test_a_slide_cluster_without_distributed_says_so_in_one_line(monkeypatch, tmp_path):
    from napari_sgdc.postprocess import PostprocessOptions
    from napari_sgdc.predict import predict_slides

    hide(monkeypatch, "distributed")
    with pytest.raises(ValueError) as error:
        predict_slides(PixelModel(), [], tmp_path / "out", PostprocessOptions(), model_source="nuclei", workers=2)
    one_line(error.value, "pip install 'napari-sgdc[cluster]'")
