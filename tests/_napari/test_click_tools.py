"""GUI tests of the click tools on the mask layer and of the review queue (Segment dock)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

pytestmark = pytest.mark.gui

CENTRES = {"A": (30, 30), "B": (30, 46), "C": (80, 100), "D": (90, 30), "E": (105, 135), "F": (20, 120)}
# A and B touch, D is faint


def _maps(shape=(128, 160)):
    rows, cols = np.indices(shape)
    probability = np.full(shape, 0.02, np.float32)
    separation = np.ones(shape, np.float32)
    for name, (row, col) in CENTRES.items():
        distance = np.hypot(rows - row, cols - col) / 8.0
        probability[distance <= 1] = 0.3 if name == "D" else 0.95
        separation = np.where(distance <= 1, np.minimum(separation, distance), separation)
    return probability, separation


@pytest.fixture
def nuclei(make_napari_viewer):
    """Both docks, a nuclei-like image whose cached result holds synthetic maps, its mask layer
    with A and B merged into one object (and D missed)."""
    from napari_sgdc._napari._session import get_session
    from napari_sgdc.postprocess import PostprocessOptions, postprocess
    from napari_sgdc.session.results import CachedResult

    viewer = make_napari_viewer()
    _, seg = viewer.window.add_plugin_dock_widget("napari-sgdc", "SGDC Segment")
    _, ft = viewer.window.add_plugin_dock_widget("napari-sgdc", "SGDC Fine-tune")
    probability, separation = _maps()
    image = viewer.add_image(probability, name="nuclei")
    session = get_session(viewer)
    session.options = PostprocessOptions(threshold=0.5, split_level=0.5, min_size=5)
    _, labels = postprocess(probability, separation, session.options, instances=True)
    labels[labels == labels[CENTRES["B"]]] = labels[CENTRES["A"]]  # the model merged A and B
    uncertainty = np.zeros_like(probability)
    session.results[image] = CachedResult(
        probability=probability[None], boundary=separation[None], segmented=np.ones(1, bool), lead_shape=(),
        instances=True, written_mask=labels[None].copy(), model_source="synthetic", uncertainty=uncertainty[None])
    mask = viewer.add_labels(labels.copy(), name="nuclei mask", metadata={"sgdc": {"image": "nuclei"}})
    mask.mode = "pan_zoom"
    seg.image_layer.value = image
    ft.reset_choices()
    ft.image_layer.value, ft.labels_layer.value = image, mask
    return viewer, seg, ft, mask


def _press(layer, tools, modifiers, path):
    """Drives the mouse-drag callback like napari does: press, moves, release (data = world here)."""
    event = SimpleNamespace(modifiers=modifiers, position=path[0], type="mouse_press", button=1, handled=False)
    gesture = tools.gesture(layer, event)
    if gesture is None:
        return event
    next(gesture)
    for point in path[1:]:
        event.type, event.position = "mouse_move", point
        next(gesture)
    event.type = "mouse_release"
    with pytest.raises(StopIteration):
        next(gesture)
    return event


def test_gestures_edit_the_mask_undoably_and_count_as_edits(nuclei, qtbot):
    viewer, seg, ft, mask = nuclei
    tools = seg.objects.tools
    assert tools._callback in mask.mouse_drag_callbacks
    before = np.asarray(mask.data).copy()
    merged = before[CENTRES["A"]]

    _press(mask, tools, ("Shift",), [CENTRES["A"]])  # split the merged pair at its own seeds
    assert mask.data[CENTRES["A"]] != mask.data[CENTRES["B"]]
    assert viewer.status == f"split object {merged} into 2" == seg.status.value
    piece = int((mask.data == before.max() + 1).sum())  # the new piece: edited as painting it would be
    qtbot.waitUntil(lambda: ft.edits.value.startswith(f"{piece} px"), timeout=5_000)
    assert "in 1 object;" in ft.edits.value

    _press(mask, tools, ("Control",), [CENTRES["D"]])  # add the missed faint nucleus
    new = mask.data[CENTRES["D"]]
    assert new == before.max() + 2 and 150 < (mask.data == new).sum() < 260
    assert viewer.status.startswith(f"added object {new}")

    _press(mask, tools, ("Control",), [CENTRES["C"]])  # delete C
    assert mask.data[CENTRES["C"]] == 0
    mask.undo()  # one Ctrl-Z takes one click back
    assert mask.data[CENTRES["C"]] == before[CENTRES["C"]]

    grown = (mask.data == mask.data[CENTRES["E"]]).sum()  # Ctrl-drag out of E's edge and back: a bump
    _press(mask, tools, ("Control",), [(99, 131), (88, 135), (99, 139)])
    assert (mask.data == mask.data[CENTRES["E"]]).sum() > grown and mask.data[93, 135] == mask.data[CENTRES["E"]]
    assert viewer.status.startswith(f"reshaped object {mask.data[CENTRES['E']]} (+")
    mask.undo()

    a, b = CENTRES["A"], CENTRES["B"]  # merge by a drag from A to B
    _press(mask, tools, ("Control", "Shift"), [a, (30, 38), b])
    assert mask.data[a] == mask.data[b]
    mask.undo(), mask.undo(), mask.undo()
    assert np.array_equal(mask.data, before)
    qtbot.waitUntil(lambda: ft.edits.value.startswith("no edits yet"), timeout=5_000)


def test_gestures_leave_painting_alt_and_plain_clicks_alone(nuclei):
    viewer, seg, _, mask = nuclei
    tools = seg.objects.tools
    before = np.asarray(mask.data).copy()
    for modifiers in ((), ("Alt",), ("Control", "Alt")):
        event = _press(mask, tools, modifiers, [CENTRES["C"]])
        assert not event.handled
    mask.mode = "paint"
    assert tools.gesture(mask, SimpleNamespace(modifiers=("Control",), position=(1, 1), type="mouse_press",
                                               button=1)) is None
    assert np.array_equal(mask.data, before)
    mask.mode = "pan_zoom"
    _press(mask, tools, ("Control",), [(120, 150)])  # nothing there: refused in the status, nothing written
    assert "sees nothing" in viewer.status and np.array_equal(mask.data, before)
    _press(mask, tools, ("Shift",), [(29, 10), (31, 60)])  # a stroke across the merged pair
    assert mask.data[CENTRES["A"]] != mask.data[CENTRES["B"]]


def _key(viewer, key):
    [callback] = [callback for bound, callback in viewer.keymap.items() if str(bound) == key]
    return callback


def test_review_queue_walks_the_most_suspicious_first_and_acts(nuclei):
    viewer, seg, _, mask = nuclei
    queue = seg.objects
    assert queue.build() == 4  # the merged pair, C, E and F (D was missed)
    merged = mask.data[CENTRES["A"]]
    assert queue.queue[0].label == merged  # oversized, touching nothing, a ridge inside: first
    assert np.allclose(np.asarray(viewer.camera.center)[-2:], (30, 38), atol=1.5), (seg.status.value, queue.queue)
    assert "nuclei next region" in viewer.layers
    assert f"object {merged}: 1/4" in seg.status.value and "2.0× median size" in seg.status.value

    _key(viewer, "Shift+D")(viewer)  # split it: the view stays on it
    assert mask.data[CENTRES["A"]] != mask.data[CENTRES["B"]]
    assert queue.queue[queue.position].label == merged
    _key(viewer, "Shift+K")(viewer)  # accept: it leaves the queue; the next is shown
    assert merged not in [item.label for item in queue.queue] and len(queue.queue) == 3
    current = queue.queue[queue.position]
    assert np.allclose(np.asarray(viewer.camera.center)[-2:], current.center, atol=1.5)
    _key(viewer, "Shift+Right")(viewer), _key(viewer, "Shift+Left")(viewer)
    assert queue.queue[queue.position] is current
    _key(viewer, "Shift+X")(viewer)  # delete it: it leaves the queue
    assert not (mask.data == current.label).any() and len(queue.queue) == 2
    mask.undo()
    assert (mask.data == current.label).sum() == current.area


def test_review_queue_merge_and_refusals(nuclei):
    viewer, seg, _, mask = nuclei
    queue = seg.objects
    assert queue.next() is None and "Review objects first" in seg.status.value
    _press(mask, seg.objects.tools, ("Shift",), [CENTRES["A"]])  # split: A and B now touch
    queue.build()
    order = [item.label for item in queue.queue]
    assert len(order) == 5
    while queue.queue[queue.position].label != mask.data[CENTRES["B"]]:
        queue.next()
    queue.merge()
    assert mask.data[CENTRES["A"]] == mask.data[CENTRES["B"]]
    while queue.queue[queue.position].label != mask.data[CENTRES["C"]]:
        queue.next()
    assert queue.merge() is None and "touches no other object" in seg.status.value


def test_lesion_queue_walks_uncertain_outline_stretches_and_clicks_edit_regions(make_napari_viewer):
    from napari_sgdc._napari._session import get_session
    from napari_sgdc.session.results import CachedResult

    viewer = make_napari_viewer()
    _, seg = viewer.window.add_plugin_dock_widget("napari-sgdc", "SGDC Segment")
    rows, cols = np.indices((100, 120))
    probability = np.where(np.hypot(rows - 50, cols - 60) <= 25, 0.9, 0.05).astype(np.float32)
    probability[np.hypot(rows - 85, cols - 15) <= 6] = 0.3  # a faint second region the threshold missed
    mask = (probability > 0.5).astype(np.uint8)
    uncertainty = np.zeros_like(probability)
    uncertainty[20:30, 50:70] = 0.9  # unsure about the top of the lesion
    image = viewer.add_image(probability, name="lesion")
    get_session(viewer).results[image] = CachedResult(
        probability=probability[None], boundary=np.zeros_like(probability)[None], segmented=np.ones(1, bool),
        lead_shape=(), instances=False, written_mask=mask[None].copy(), model_source="synthetic",
        uncertainty=uncertainty[None])
    layer = viewer.add_labels(mask.copy(), name="lesion mask", metadata={"sgdc": {"image": "lesion"}})
    layer.mode = "pan_zoom"
    seg.image_layer.value = image
    queue = seg.objects
    assert queue.build() > 4
    assert queue.queue[0].center[0] < 30 and seg.status.value.startswith("outline: 1/")
    assert queue.split() is None and "outline stroke" in seg.status.value
    count = len(queue.queue)
    queue.accept()
    assert len(queue.queue) == count - 1

    tools = queue.tools
    _press(layer, tools, ("Control",), [(85, 15)])  # add the faint region
    assert layer.data[85, 15] == 1 and viewer.status.startswith("added a region of")
    _press(layer, tools, ("Control",), [(85, 15)])  # and remove it again
    assert layer.data[85, 15] == 0
    _press(layer, tools, ("Control",), [(27, 55), (18, 60), (27, 65)])  # an outline stroke out of the top
    assert layer.data[22, 60] == 1 and layer.data.max() == 1
    _press(layer, tools, ("Shift",), [(50, 60)])
    assert "only for instance" in viewer.status
