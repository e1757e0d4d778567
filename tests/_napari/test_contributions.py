"""The manifest's sample data and writer contributions."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gui


def test_manifest_commands_resolve():
    from npe2 import PluginManager

    manager = PluginManager.instance()
    manager.discover()
    manifest = manager.get_manifest("napari-sgdc")
    titles = {widget.display_name for widget in manifest.contributions.widgets}
    assert titles == {"SGDC Segment", "SGDC Fine-tune"}
    for command in manifest.contributions.commands:
        assert command.python_name.startswith("napari_sgdc._napari.")
        assert callable(manager.commands.get(command.id))


@pytest.mark.parametrize(("key", "name", "shape"), [
    ("dermoscopy", "dermoscopy IMD019", (385, 512, 3)),
    ("nuclei", "H&E nuclei TCGA-21-5784", (512, 512, 3)),
])
def test_open_sample(make_napari_viewer, key, name, shape):
    viewer = make_napari_viewer()
    layers = viewer.open_sample("napari-sgdc", key)
    assert [layer.name for layer in layers] == [name]
    layer = viewer.layers[name]
    assert layer.rgb and layer.data.shape == shape and layer.data.dtype == np.uint8
    assert layer.data.std() > 10  # a real picture, not a blank


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_writer_keeps_label_values(make_napari_viewer, tmp_path, suffix):
    from PIL import Image as PILImage

    viewer = make_napari_viewer()
    labels = np.zeros((40, 60), np.int32)
    labels[5:15, 5:20] = 1
    labels[20:30, 30:50] = 700  # needs 16 bits
    viewer.add_labels(labels, name="nuclei mask")
    target = tmp_path / f"mask{suffix}"
    written = viewer.layers.save(str(target), selected=False, plugin="napari-sgdc")
    assert written == [str(target)]
    if suffix == ".png":
        with PILImage.open(target) as image:
            back = np.asarray(image)
    else:
        import tifffile

        back = tifffile.imread(target)
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, labels)


def test_writer_rejects_stacks_as_png_and_writes_them_as_tiff(tmp_path):
    import tifffile

    from napari_sgdc._napari._writer import write_labels

    stack = np.zeros((2, 8, 8), np.uint8)
    stack[1, 2:4, 2:4] = 3
    with pytest.raises(ValueError, match="save as .tif"):
        write_labels(str(tmp_path / "s.png"), stack, {})
    assert write_labels(str(tmp_path / "s.tif"), stack, {}) == [str(tmp_path / "s.tif")]
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "s.tif"), stack)
    assert write_labels(str(tmp_path / "s.bmp"), stack, {}) == []


def test_main_job_opens_the_sample_with_both_widgets_docked(make_napari_viewer):
    from napari_sgdc.demo import setup_viewer

    viewer = make_napari_viewer()
    setup_viewer(viewer, "dermoscopy")
    assert [layer.name for layer in viewer.layers] == ["dermoscopy IMD019"]
    docked = set(viewer.window.dock_widgets)
    assert any("SGDC Segment" in name for name in docked) and any("SGDC Fine-tune" in name for name in docked)


def test_main_job_shows_the_whole_sample_after_docking(make_napari_viewer, qtbot):
    from napari_sgdc.demo import setup_viewer

    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1200, 800)
    setup_viewer(viewer, "dermoscopy")
    image = viewer.layers["dermoscopy IMD019"]
    height, width = image.data.shape[:2]
    np.testing.assert_allclose(viewer.camera.center[-2:], ((height - 1) / 2, (width - 1) / 2), atol=1.0)
    qtbot.wait(50)
    center, zoom = tuple(viewer.camera.center), viewer.camera.zoom
    viewer.reset_view()  # the view setup_viewer left is already the reset one (docks accounted for)
    np.testing.assert_allclose(viewer.camera.center, center, atol=1e-6)
    assert abs(viewer.camera.zoom - zoom) <= 1e-6 * zoom
    canvas_width = viewer.window._qt_viewer.canvas.native.width()
    assert width * zoom <= canvas_width + 1  # the whole width is on screen
