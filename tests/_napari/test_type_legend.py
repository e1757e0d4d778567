"""GUI tests of nucleus types (issue 23): the mask coloured by type, the legend, the features table,
the keys that change a nucleus's type (undoable), and the Fine-tune dock's count and pair."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gui

NAMES, COLORS = ("a", "b"), ("#ff0000", "#00ff00")
CENTRES = {1: (20, 20), 2: (20, 70), 3: (70, 45)}  # nuclei 1 and 2 of type a, 3 of type b


@pytest.fixture(scope="module")
def typed_checkpoint(tmp_path_factory):
    """A tiny typed model that finds every pixel foreground and calls everything type b."""
    from napari_sgdc.checkpoints import save_checkpoint
    from napari_sgdc.model import build_model, tiny_config

    torch.manual_seed(0)
    model = build_model(tiny_config(task="instance", instance_map="hover", type_names=NAMES,
                                    type_colors=COLORS)).eval()
    with torch.no_grad():
        model.mask_head.bias.fill_(20.0)
        model.type_head[1].weight.zero_()
        model.type_head[1].bias.copy_(torch.tensor([0.0, 5.0]))
    return save_checkpoint(tmp_path_factory.mktemp("models") / "typed.safetensors", model)


@pytest.fixture
def typed(make_napari_viewer):
    """Both docks and an image whose cached result holds three typed nuclei; its mask layer."""
    from napari_sgdc._napari._runner import show_segmentation
    from napari_sgdc._napari._session import get_session
    from napari_sgdc.session import PlaneInput
    from napari_sgdc.session.results import CachedResult

    viewer = make_napari_viewer()
    _, seg = viewer.window.add_plugin_dock_widget("napari-sgdc", "SGDC Segment")
    _, ft = viewer.window.add_plugin_dock_widget("napari-sgdc", "SGDC Fine-tune")
    shape = (96, 96)
    rows, cols = np.indices(shape)
    labels = np.zeros(shape, np.int32)
    for label, (row, col) in CENTRES.items():
        labels[np.hypot(rows - row, cols - col) < 9] = label
    type_probability = np.zeros((*shape, 2), np.float32)
    type_probability[:50] = (0.9, 0.1)
    type_probability[50:] = (0.2, 0.8)
    image = viewer.add_image((labels > 0).astype(np.float32), name="he")
    session = get_session(viewer)
    cache = CachedResult(
        probability=(labels > 0).astype(np.float32)[None], boundary=np.zeros((1, *shape), np.float32),
        segmented=np.ones(1, bool), lead_shape=(), instances=True, written_mask=labels[None].copy(),
        model_source="synthetic", type_probability=type_probability[None], type_names=NAMES, type_colors=COLORS)
    cache.retype()
    session.results[image] = cache
    seg.image_layer.value = image
    show_segmentation(viewer, session, image, PlaneInput(np.zeros((1, *shape)), [0], (), shape), cache, None)
    mask = viewer.layers["he mask"]
    ft.reset_choices()
    ft.image_layer.value, ft.labels_layer.value = image, mask
    return viewer, seg, ft, mask


def _color(layer, label):
    return tuple(np.round(layer.colormap.map(label)[:3], 2))


def test_the_mask_is_coloured_by_type_with_a_legend_and_features(typed):
    viewer, seg, _, mask = typed
    legend = seg.types
    assert not legend.container.native.isHidden() and [row.radio.text() for row in legend.rows] == ["1 a", "2 b"]
    assert [row.count.text() for row in legend.rows] == ["2", "1"]
    assert _color(mask, 1) == (1.0, 0.0, 0.0) and _color(mask, 3) == (0.0, 1.0, 0.0)
    assert mask.features["class"].tolist() == ["", "a", "a", "b"]
    assert mask.features["area"][3] == int((mask.data == 3).sum())
    assert mask.features["class_confidence"][3] == pytest.approx(0.8)
    assert legend.summary(seg.image_layer.value) == "; 2 a, 1 b"

    legend.rows[0].show.setChecked(False)  # hide type a: transparent, no data change
    before = np.asarray(mask.data).copy()
    assert mask.colormap.map(1)[3] == 0 and _color(mask, 3) == (0.0, 1.0, 0.0)
    assert np.array_equal(mask.data, before)
    legend.rows[0].show.setChecked(True)
    assert mask.colormap.map(1)[3] == 1


def _key(viewer, key):
    [callback] = [callback for bound, callback in viewer.keymap.items() if str(bound) == key]
    return callback


def test_t_sets_the_active_type_under_the_mouse_undoably_and_counts_as_an_edit(typed, qtbot):
    viewer, seg, ft, mask = typed
    legend = seg.types
    _key(viewer, "Alt+2")(viewer)
    assert legend.active == 2 and legend.rows[1].radio.isChecked()
    viewer.cursor.position = CENTRES[1]
    _key(viewer, "T")(viewer)
    assert viewer.status == "object 1: a → b" == seg.status.value
    assert _color(mask, 1) == (0.0, 1.0, 0.0) and mask.features["class"][1] == "b"
    assert [row.count.text() for row in legend.rows] == ["1", "2"]
    qtbot.waitUntil(lambda: "retyped" in ft.edits.value, timeout=5_000)
    assert ft.edits.value.startswith(f"{int((mask.data == 1).sum())} px")

    viewer.cursor.position = (90, 5)  # background
    _key(viewer, "T")(viewer)
    assert viewer.status == "Type: no nucleus under the mouse"

    [undo] = [callback for bound, callback in mask.keymap.items() if str(bound) == "Ctrl+Z"]
    mask.data_setitem((np.array([50]), np.array([90])), np.array([3], np.int32))  # a paint step after the change
    undo(mask)  # takes the paint step back first
    assert mask.data[50, 90] == 0 and mask.features["class"][1] == "b"
    undo(mask)  # then the type change
    assert _color(mask, 1) == (1.0, 0.0, 0.0) and viewer.status == "undone: object 1: a → b"
    qtbot.waitUntil(lambda: ft.edits.value.startswith("no edits yet"), timeout=5_000)


def test_shift_t_retypes_the_review_queue_object_and_the_pair_keeps_the_types(typed):
    viewer, seg, ft, mask = typed
    seg.types.set_active(1)
    assert seg.types.retype_queue_object() is None and "Review objects" in viewer.status
    assert seg.objects.build() == 3
    _, label = seg.objects.current_object()
    old = mask.features["class"][label]
    seg.types.set_active(2 if old == "a" else 1)
    _key(viewer, "Shift+T")(viewer)
    assert mask.features["class"][label] != old
    assert ft.add_pair()
    [pair] = ft.pairs
    assert pair.types[0][label] == seg.types.active and pair.predicted_types[0][label] == NAMES.index(old) + 1


def test_a_typed_checkpoint_segments_into_coloured_nuclei_and_an_untyped_one_restores_napari_colours(
        make_napari_viewer, typed_checkpoint, tiny_instance_checkpoint, wait_segment):
    from napari.utils.colormaps import CyclicLabelColormap, DirectLabelColormap

    viewer = make_napari_viewer()
    _, seg = viewer.window.add_plugin_dock_widget("napari-sgdc", "SGDC Segment")
    image = viewer.add_image(np.zeros((64, 64, 3), np.uint8), name="he", rgb=True)
    seg.image_layer.value = image
    assert seg.load_checkpoint(str(typed_checkpoint))
    assert wait_segment(seg.run_segment()).value is not None
    mask = viewer.layers["he mask"]
    n = int(mask.data.max())
    assert n >= 1 and isinstance(mask.colormap, DirectLabelColormap)
    assert set(mask.features["class"][1:]) == {"b"} and not seg.types.container.native.isHidden()
    assert seg.status.value.endswith(f"; 0 a, {n} b")
    seg.split_level.value = 0.9  # re-post-processing re-assigns the types
    assert set(mask.features["class"][1:]) == {"b"} and isinstance(mask.colormap, DirectLabelColormap)

    assert seg.load_checkpoint(str(tiny_instance_checkpoint))
    assert wait_segment(seg.run_segment()).value is not None
    assert isinstance(mask.colormap, CyclicLabelColormap) and "class" not in mask.features
    assert seg.types.container.native.isHidden()
