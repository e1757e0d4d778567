"""GUI tests of reviewing a result: the uncertainty layer, Next region (Shift-N), per-object
confidence, the out-of-memory notification and the model picker following a sample."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gui


def _entropy(probability: np.ndarray) -> np.ndarray:
    p = np.clip(probability.astype(np.float64), 1e-6, 1 - 1e-6)
    return -(p * np.log2(p) + (1 - p) * np.log2(1 - p))


def _shortcut(viewer, key: str):
    [callback] = [callback for bound, callback in viewer.keymap.items() if str(bound) == key]
    return callback


def test_uncertainty_layer_is_aligned_hidden_and_hot(sgdc, wait_segment, notes):
    viewer, seg, _, image, _ = sgdc
    image.scale = (0.5, 2.0)
    image.translate = (10.0, -5.0)
    assert seg.uncertainty.value is True  # on by default: it is free
    assert wait_segment(seg.run_segment()).error is None, notes.messages
    layer = viewer.layers["lesion uncertainty"]
    assert type(layer).__name__ == "Image" and layer.data.shape == (192, 192)
    np.testing.assert_allclose(layer.scale, image.scale)
    np.testing.assert_allclose(layer.translate, image.translate)
    probability = np.asarray(viewer.layers["lesion probability"].data)
    np.testing.assert_allclose(layer.data, _entropy(probability), atol=1e-4)
    assert layer.colormap.name == "sgdc unsure" and layer.blending == "translucent" and not layer.visible
    colors = layer.colormap.map([0.0, 0.5, 1.0])
    assert colors[0, 3] == 0 and colors[1, 3] > 0.5 and tuple(colors[2, :3]) == (1, 1, 0)  # sure: see-through
    assert tuple(layer.contrast_limits) == (0.0, 1.0)
    assert layer.metadata["sgdc"]["image"] == "lesion"
    assert viewer.layers.selection.active is viewer.layers["lesion mask"]  # still ready for painting

    seg.uncertainty.value = False  # off: no map, and the stale layer goes
    assert wait_segment(seg.run_segment()).error is None
    assert "lesion uncertainty" not in viewer.layers
    assert seg._session.results[image].uncertainty is None
    assert seg.next_region() is None and notes.matching("segment first")


def test_next_region_before_segmenting_says_segment_first(sgdc, notes):
    viewer, seg, _, _, _ = sgdc
    zoom = viewer.camera.zoom
    assert seg.next_region() is None
    assert notes.matching("no uncertainty for 'lesion' yet. Segment first"), notes.messages
    assert viewer.camera.zoom == zoom and "lesion next region" not in viewer.layers


def _expected_view(viewer, image, region):
    centre = np.asarray(image.data_to_world(region.center))
    size = np.abs(np.asarray(image.scale)) * (region.bottom - region.top, region.right - region.left)
    zoom = 0.8 * np.min(np.asarray(viewer.canvas.viewbox_size(viewer.layers), float) / size)
    return centre, zoom


def test_next_region_visits_the_most_uncertain_regions_in_order(sgdc, wait_segment, notes):
    from napari_sgdc._napari._segment_widget import NEXT_REGION_SHORTCUT
    from napari_sgdc.regions import rank_regions

    viewer, seg, _, image, _ = sgdc
    image.scale = (0.5, 2.0)
    image.translate = (10.0, -5.0)
    assert wait_segment(seg.run_segment()).error is None
    mask = viewer.layers["lesion mask"]
    seg.region_size.value = 64
    ranked = rank_regions(np.asarray(viewer.layers["lesion uncertainty"].data), 64)
    assert len(ranked) == 9 and ranked[0].score > ranked[-1].score

    shown = []
    for press in (seg.next_region, seg.next_region, lambda: _shortcut(viewer, "Shift+N")(viewer)):
        press()
        shown.append(tuple(np.asarray(viewer.camera.center)[-2:]))
        region = ranked[len(shown) - 1]
        centre, zoom = _expected_view(viewer, image, region)
        np.testing.assert_allclose(shown[-1], centre, atol=1e-6)
        assert viewer.camera.zoom == pytest.approx(zoom)
        outline = viewer.layers["lesion next region"]
        assert type(outline).__name__ == "Shapes" and len(outline.data) == 1
        np.testing.assert_allclose(outline.scale, image.scale)
        np.testing.assert_allclose(outline.data[0].min(axis=0), (region.top - 0.5, region.left - 0.5))
        np.testing.assert_allclose(outline.data[0].max(axis=0), (region.bottom - 0.5, region.right - 0.5))
    assert NEXT_REGION_SHORTCUT == "Shift-N" and len(set(shown)) == 3
    assert viewer.layers.selection.active is mask  # the outline does not take the layer selection
    assert seg.status.value.startswith("region 3/9, uncertainty ")

    assert wait_segment(seg.run_segment()).error is None  # a new result: start from the top again
    assert seg.next_region() == rank_regions(np.asarray(viewer.layers["lesion uncertainty"].data), 64)[0]


def test_next_region_says_when_all_were_visited_then_starts_over(sgdc, wait_segment, notes):
    viewer, seg, _, image, _ = sgdc
    assert wait_segment(seg.run_segment()).error is None
    seg.region_size.value = 112  # 2 x 2 regions of a 192-px image
    first = [seg.next_region() for _ in range(4)]
    assert all(first) and len({(r.top, r.left) for r in first}) == 4
    assert seg.next_region() is None
    assert notes.matching("all 4 regions of 'lesion' (112 px) were visited"), notes.messages
    assert seg.next_region() == first[0]


def test_next_region_on_a_stack_uses_the_current_plane(make_napari_viewer, tiny_checkpoint, wait_segment, notes):
    from napari_sgdc.regions import rank_regions

    viewer = make_napari_viewer()
    _, seg = viewer.window.add_plugin_dock_widget("napari-sgdc", "SGDC Segment")
    stack = np.random.default_rng(0).integers(0, 255, (3, 64, 96), dtype=np.uint8)
    image = viewer.add_image(stack, name="stack", scale=(2.0, 0.5, 0.5))
    assert seg.load_checkpoint(str(tiny_checkpoint))
    seg.image_layer.value = image
    seg.planes.value = "current"
    seg.gates.value = False
    viewer.dims.set_point(0, 2.0)  # plane 1
    assert wait_segment(seg.run_segment()).error is None
    uncertainty = np.asarray(viewer.layers["stack uncertainty"].data)
    assert uncertainty.shape == (3, 64, 96) and uncertainty[1].any() and not uncertainty[0].any()
    seg.region_size.value = 32
    region = seg.next_region()
    assert region == rank_regions(uncertainty[1], 32)[0]
    outline = viewer.layers["stack next region"].data[0]
    assert outline.shape == (4, 3) and np.all(outline[:, 0] == 1)
    np.testing.assert_allclose(np.asarray(viewer.camera.center)[-2:],
                               np.asarray(image.data_to_world((1, *region.center)))[-2:])
    viewer.dims.set_point(0, 0.0)  # plane 0 was never segmented
    assert seg.next_region() is None and notes.matching("no uncertainty for 'stack' (this plane)")


def test_instance_confidence_features_follow_the_sliders(make_napari_viewer, tiny_instance_checkpoint,
                                                         wait_segment):
    from napari_sgdc.postprocess import object_confidence

    viewer = make_napari_viewer()
    _, seg = viewer.window.add_plugin_dock_widget("napari-sgdc", "SGDC Segment")
    rng = np.random.default_rng(1)
    image = viewer.add_image(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8), name="tile", rgb=True)
    assert seg.load_checkpoint(str(tiny_instance_checkpoint))
    seg.image_layer.value = image
    assert wait_segment(seg.run_segment()).error is None
    mask = viewer.layers["tile mask"]
    uncertainty = np.asarray(viewer.layers["tile uncertainty"].data)

    def check() -> np.ndarray:
        labels = np.asarray(mask.data)
        expected = object_confidence(labels, uncertainty)
        features = mask.features
        assert list(features.columns) == ["index", "confidence"]
        np.testing.assert_array_equal(features["index"], np.arange(len(expected)))
        assert np.isnan(features["confidence"][0])  # background: no confidence shown
        np.testing.assert_allclose(features["confidence"][1:], expected[1:], rtol=1e-6)
        return expected

    probability = np.asarray(viewer.layers["tile probability"].data)
    boundary = np.asarray(viewer.layers["tile SGE boundary"].data)
    seg.threshold.value = round(float(np.quantile(probability, 0.4)), 3)  # the random model: more objects
    seg.split_level.value = round(float(np.quantile(boundary, 0.7)), 3)
    before = check()
    assert len(before) > 2
    label = int(np.asarray(mask.data).max())
    position = np.argwhere(np.asarray(mask.data) == label)[0]
    assert "confidence: " in mask.get_status(tuple(position))["coordinates"]  # shown on hover
    seg.threshold.value = round(float(np.quantile(probability, 0.6)), 3)
    seg.min_size.value = 5
    after = check()
    assert len(after) != len(before) or not np.allclose(after, before)


def test_out_of_memory_fallback_is_a_warning_notification(sgdc, wait_segment, notes):
    from napari.utils.notifications import NotificationSeverity, notification_manager

    viewer, seg, _, image, _ = sgdc
    model = seg._session.get_model(seg.model.value).model
    raised = []

    def out_of_memory_once(*_):
        if not raised:
            raised.append(1)
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    severities = []
    record = lambda notification: severities.append((notification.severity, str(notification.message)))  # noqa: E731
    notification_manager.notification_ready.connect(record)
    handle = model.register_forward_pre_hook(out_of_memory_once)
    try:
        seg.tile.value = 512
        outcome = wait_segment(seg.run_segment())
    finally:
        handle.remove()
        notification_manager.notification_ready.disconnect(record)
    assert outcome.error is None and raised and "lesion mask" in viewer.layers
    [message] = notes.matching("out of memory")  # one notification, not one from napari as well
    assert message == ("Segmenting 'lesion': out of memory on cpu with 512-px tiles; retrying on cpu with "
                       "256-px tiles. The result is the same; a smaller tile size avoids the retry."), message
    assert (NotificationSeverity.WARNING, message) in severities
    assert seg.job.fallbacks == ["out of memory on cpu with 512-px tiles; retrying on cpu with 256-px tiles"]


def test_model_picker_follows_the_opened_sample_until_the_user_picks(make_napari_viewer):
    from napari_sgdc._napari._segment_widget import available_builtins

    assert {"dermoscopy", "nuclei"} <= set(available_builtins())  # shipped in the package
    viewer = make_napari_viewer()
    _, seg = viewer.window.add_plugin_dock_widget("napari-sgdc", "SGDC Segment")
    viewer.open_sample("napari-sgdc", "nuclei")
    assert seg.model.value == "built-in: nuclei"
    viewer.open_sample("napari-sgdc", "dermoscopy")
    assert seg.model.value == "built-in: dermoscopy"
    viewer.layers.selection.active = viewer.layers["H&E nuclei TCGA-21-5784"]
    assert seg.model.value == "built-in: nuclei"
    seg.model.value = "built-in: dermoscopy"  # the user's own choice wins from now on
    viewer.open_sample("napari-sgdc", "nuclei")
    assert seg.image_layer.value.name.startswith("H&E nuclei") and seg.model.value == "built-in: dermoscopy"


def test_model_picker_follows_a_sample_opened_before_docking(make_napari_viewer):
    from napari_sgdc._napari._segment_widget import available_builtins

    assert "nuclei" in available_builtins()  # shipped in the package
    viewer = make_napari_viewer()
    viewer.open_sample("napari-sgdc", "nuclei")
    _, seg = viewer.window.add_plugin_dock_widget("napari-sgdc", "SGDC Segment")
    assert seg.model.value == "built-in: nuclei"
