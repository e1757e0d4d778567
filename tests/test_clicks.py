"""Click tools and the review queue on small synthetic maps (napari_sgdc.clicks, napari_sgdc.review)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_sgdc.clicks import (
    ClickError,
    PlaneMaps,
    add_object,
    add_region,
    delete_object,
    merge_objects,
    remove_region,
    reshape_object,
    split_object,
)
from napari_sgdc.postprocess import PostprocessOptions, postprocess
from napari_sgdc.review import rank_boundary, rank_objects


def _disc(shape, center, radius):
    rows, cols = np.ogrid[:shape[0], :shape[1]]
    return (rows - center[0]) ** 2 + (cols - center[1]) ** 2 <= radius ** 2


def _scene():
    """Three nuclei and a faint one: A and B touch (a separation ridge between them), C stands
    alone, D has probability 0.35 (missed at threshold 0.5)."""
    shape = (80, 100)
    centers = {"A": (20, 20), "B": (20, 36), "C": (55, 70), "D": (60, 20)}
    probability = np.full(shape, 0.02, np.float32)
    separation = np.ones(shape, np.float32)
    rows, cols = np.indices(shape)
    for name, center in centers.items():
        disc = _disc(shape, center, 8)
        probability[disc] = 0.35 if name == "D" else 0.95
        distance = np.hypot(rows - center[0], cols - center[1]) / 8.0
        separation = np.where(disc, np.minimum(separation, distance), separation)
    return probability, np.clip(separation, 0, 1).astype(np.float32), centers


@pytest.fixture
def scene():
    probability, separation, centers = _scene()
    options = PostprocessOptions(threshold=0.5, split_level=0.5, min_size=5)
    _, labels = postprocess(probability, separation, options, instances=True)
    return labels, PlaneMaps(probability, separation, options), centers


def test_add_decodes_a_missed_object_from_the_maps(scene):
    labels, maps, centers = scene
    assert labels[centers["D"]] == 0  # missed at the threshold
    edit = add_object(labels, maps, (61, 22))
    out = edit.apply(labels.copy())
    new = out[centers["D"]]
    assert new == labels.max() + 1
    assert abs(int((out == new).sum()) - int(_disc(labels.shape, centers["D"], 8).sum())) <= 4
    assert np.array_equal(out[labels > 0], labels[labels > 0])  # no other object touched
    assert edit.text.startswith(f"added object {new}")
    assert np.array_equal(edit.revert(out), labels)


def test_add_keeps_to_the_clicked_nucleus_when_the_region_holds_two():
    probability, separation, centers = _scene()
    options = PostprocessOptions(threshold=0.99, split_level=0.5, min_size=5)  # nothing detected
    labels = np.zeros(probability.shape, np.int32)
    out = add_object(labels, PlaneMaps(probability, separation, options), centers["A"], radius=40).apply(labels)
    assert out[centers["A"]] == 1 and out[centers["B"]] == 0
    assert 150 < (out == 1).sum() < 260


def test_add_refuses_objects_and_empty_places(scene):
    labels, maps, centers = scene
    with pytest.raises(ClickError, match="already"):
        add_object(labels, maps, centers["A"])
    with pytest.raises(ClickError, match="sees nothing"):
        add_object(labels, maps, (75, 95))
    with pytest.raises(ClickError, match="outside"):
        add_object(labels, maps, (500, 5))


def test_delete_removes_the_clicked_object_only(scene):
    labels, _, centers = scene
    label = labels[centers["C"]]
    out = delete_object(labels, centers["C"]).apply(labels.copy())
    assert not (out == label).any()
    assert np.array_equal(out[labels != label], labels[labels != label])
    with pytest.raises(ClickError, match="no object"):
        delete_object(labels, (75, 95))


def test_merge_then_split_by_two_clicks_restores_the_pair(scene):
    labels, maps, centers = scene
    a, b = labels[centers["A"]], labels[centers["B"]]
    assert a != b and a and b
    merged = merge_objects(labels, centers["A"], centers["B"]).apply(labels.copy())
    assert merged[centers["B"]] == a
    edit = split_object(merged, maps, [centers["A"], centers["B"]])
    split = edit.apply(merged.copy())
    assert split[centers["A"]] != split[centers["B"]]
    gap = int((merged == a).sum() - (labels == a).sum() - (labels == b).sum())  # background merge filled
    assert 0 <= gap < 30
    assert abs(int((split == split[centers["A"]]).sum()) - int((labels == a).sum())) <= gap
    assert edit.text == f"split object {a} into 2"


def test_merge_fills_a_small_gap_and_refuses_far_objects(scene):
    labels, _, centers = scene
    left = np.zeros((20, 30), np.int32)
    left[5:15, 3:12] = 1
    left[5:15, 13:25] = 2  # one background column between them
    out = merge_objects(left, (10, 5), (10, 20)).apply(left.copy())
    assert (out[5:15, 3:25] == 1).all()
    with pytest.raises(ClickError, match="apart"):
        merge_objects(labels, centers["A"], centers["C"])
    with pytest.raises(ClickError, match="both clicks"):
        merge_objects(labels, centers["A"], centers["A"])


def test_split_one_click_finds_the_objects_own_seeds(scene):
    labels, maps, centers = scene
    merged = merge_objects(labels, centers["A"], centers["B"]).apply(labels.copy())
    split = split_object(merged, maps, [centers["A"]]).apply(merged.copy())
    assert split[centers["A"]] != split[centers["B"]]
    assert abs(int((split == split[centers["B"]]).sum()) - int((labels == labels[centers["B"]]).sum())) <= 10


def test_split_by_a_stroke_across_the_object(scene):
    labels, _, centers = scene
    block = np.zeros((30, 40), np.int32)
    block[5:25, 5:35] = 7
    edit = split_object(block, None, stroke=[(2, 20), (28, 20)], new_id=9)
    out = edit.apply(block.copy())
    assert set(np.unique(out)) == {0, 7, 9}
    assert (out[5:25, 5:19] == out[10, 6]).all() and (out[5:25, 21:35] == out[10, 30]).all()
    with pytest.raises(ClickError, match="no two parts"):
        split_object(block, None, stroke=[(2, 8), (12, 8)])
    with pytest.raises(ClickError, match="crosses no object"):
        split_object(block, None, stroke=[(0, 0), (0, 39)])


def test_split_without_separation_uses_the_distance_peaks():
    dumbbell = (_disc((40, 60), (20, 18), 9) | _disc((40, 60), (20, 40), 9)).astype(np.int32)
    out = split_object(dumbbell, None, [(20, 18)]).apply(dumbbell.copy())
    assert out[20, 18] != out[20, 40] and out[20, 18] and out[20, 40]


def test_split_one_click_refuses_slivers():
    sliver = np.zeros((20, 40), np.int32)
    sliver[8:11, 5:13] = 3  # 24 px: its distance transform has two far-apart peaks, but the pieces are tiny
    maps = PlaneMaps(np.ones(sliver.shape, np.float32), None, PostprocessOptions(min_size=30))
    with pytest.raises(ClickError, match="no two parts"):
        split_object(sliver, maps, [(9, 8)])
    assert split_object(sliver, None, [(9, 6), (9, 12)]).pixels > 0  # two clicks: the user's call


def test_split_refuses_clicks_in_two_objects(scene):
    labels, maps, centers = scene
    with pytest.raises(ClickError, match="not in object"):
        split_object(labels, maps, [centers["A"], centers["C"]])


def _square_with_neighbour():
    labels = np.zeros((40, 50), np.int32)
    labels[10:30, 10:30] = 4
    labels[2:8, 30:40] = 9  # a neighbour the strokes pass by
    return labels


def test_outline_stroke_out_adds_what_it_encloses():
    labels = _square_with_neighbour()
    edit = reshape_object(labels, [(10, 14), (3, 20), (10, 26)])
    out = edit.apply(labels.copy())
    assert (out[labels == 4] == 4).all()  # nothing removed
    assert (out[6:10, 18:23] == 4).all() and out[2, 20] == 0  # the enclosed bump, not beyond the stroke
    assert edit.text.startswith("reshaped object 4 (+") and edit.text.endswith("-0 px)")
    assert (out == 9).sum() == (labels == 9).sum()


def test_outline_stroke_in_cuts_off_a_stretch():
    labels = _square_with_neighbour()
    out = reshape_object(labels, [(10, 14), (20, 20), (10, 26)]).apply(labels.copy())
    assert out[12, 20] == 0 and out[25, 20] == 4 and out[11, 11] == 4  # the notch is gone, the rest stays
    from scipy import ndimage

    assert ndimage.label(out == 4)[1] == 1


def test_outline_stroke_never_takes_a_neighbour_and_refuses_loose_strokes():
    labels = _square_with_neighbour()
    out = reshape_object(labels, [(10, 26), (4, 36), (10, 29)]).apply(labels.copy())
    assert (out == 9).sum() == (labels == 9).sum()
    with pytest.raises(ClickError, match="edge of object 4"):
        reshape_object(labels, [(10, 20), (0, 0)])
    with pytest.raises(ClickError, match="touches no object|start or end"):
        reshape_object(labels, [(35, 2), (35, 8)])
    mask = (labels == 4).astype(np.uint8)
    bumped = reshape_object(mask, [(10, 14), (3, 20), (10, 26)]).apply(mask.copy())
    assert set(np.unique(bumped)) == {0, 1} and bumped.sum() > mask.sum()


def test_semantic_add_and_remove_a_region():
    probability, _, centers = _scene()
    mask = (probability > 0.5).astype(np.uint8)
    maps = PlaneMaps(probability, None, PostprocessOptions(threshold=0.5))
    out = add_region(mask, maps, centers["D"]).apply(mask.copy())
    assert out[centers["D"]] == 1 and (out == 1).sum() == mask.sum() + _disc(mask.shape, centers["D"], 8).sum()
    edit = remove_region(out, centers["A"])  # A and B touch: one region
    removed = edit.apply(out.copy())
    assert removed[centers["A"]] == 0 and removed[centers["B"]] == 0 and removed[centers["C"]] == 1
    assert "removed a region" in edit.text
    with pytest.raises(ClickError, match="background"):
        remove_region(mask, (75, 95))


def test_review_queue_puts_merged_oversized_and_uncertain_objects_first(scene):
    labels, maps, centers = scene
    labels = labels.copy()
    rows, cols = np.indices(labels.shape)
    for k, center in enumerate([(8, 60), (8, 80), (35, 60), (35, 85), (70, 45)]):  # five more typical objects
        labels[_disc(labels.shape, center, 6)] = 10 + k
    merged = merge_objects(labels, centers["A"], centers["B"]).apply(labels)
    uncertainty = np.zeros(labels.shape, np.float32)
    uncertainty[merged == merged[centers["C"]]] = 0.4
    queue = rank_objects(merged, maps.separation, uncertainty)
    assert len(queue) == len(np.unique(merged)) - 1
    assert queue[0].label in (merged[centers["A"]], merged[centers["C"]])
    order = [item.label for item in queue]
    assert order.index(merged[centers["A"]]) < order.index(12)  # the merged pair before a lone typical one
    assert order.index(merged[centers["C"]]) < order.index(12)  # so is the uncertain one
    top = queue[order.index(merged[centers["A"]])]
    assert top.signs["contrast"] < 0 and top.signs["size_log"] > 0.5
    assert "contrast" in top.reason()
    assert [round(x) for x in top.center] == [20, 28]
    assert all(0.0 <= item.score <= 1.0 for item in queue)
    assert rank_objects(np.zeros((5, 5), np.int32)) == []


def test_boundary_stretches_rank_the_uncertain_stretch_first():
    mask = _disc((80, 80), (40, 40), 20)
    uncertainty = np.zeros(mask.shape, np.float32)
    uncertainty[15:25, 30:50] = 0.8  # unsure about the top of the outline only
    stretches = rank_boundary(mask, uncertainty, stretch=16)
    assert sum(len(item.points) - 1 for item in stretches) >= 110  # the whole outline (2π·20 ≈ 126 px)
    top = stretches[0]
    assert top.center[0] < 25 and top.score > 0.5 and stretches[-1].score == 0.0
    assert top.bbox[0] <= top.center[0] < top.bbox[2] and "uncertainty 0." in top.reason()
    assert rank_boundary(np.zeros((10, 10), bool), np.zeros((10, 10))) == []
    with pytest.raises(ValueError, match="one shape"):
        rank_boundary(mask, uncertainty[:10])
