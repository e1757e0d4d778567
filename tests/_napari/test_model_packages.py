"""The Segment dock's model picker loads bioimage.io packages made by napari-sgdc."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest


@pytest.mark.gui
def test_model_picker_loads_a_package_and_its_folder(make_napari_viewer, tiny_checkpoint, tmp_path):
    pytest.importorskip("bioimageio.spec")
    pytest.importorskip("onnx")
    from napari_sgdc import export, load_model

    package = export(tiny_checkpoint, tmp_path / "tiny.zip")
    folder = tmp_path / "unpacked"
    zipfile.ZipFile(package).extractall(folder)
    viewer = make_napari_viewer()
    _, segment_widget = viewer.window.add_plugin_dock_widget("napari-sgdc", "SGDC Segment")
    for source in (package, folder):
        assert segment_widget.load_checkpoint(str(source))
    reference = load_model(tiny_checkpoint, device="cpu").state_dict()
    loaded = load_model(folder, device="cpu").state_dict()
    assert all(np.array_equal(reference[k].float().numpy(), loaded[k].float().numpy()) for k in reference)
