"""benchmarks/effort.py: the simulated user's outline stroke, and the fine-tune-at-every-budget bookkeeping."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import effort  # noqa: E402


def _disk(shape, centre, radius):
    rows, cols = np.ogrid[:shape[0], :shape[1]]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius ** 2


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


@pytest.mark.parametrize("case", ["dent", "bulge"])
def test_an_outline_stroke_fixes_a_dented_or_bulging_nucleus_cheaper_than_painting(case):
    shape = (64, 64)
    reference = _disk(shape, (32, 32), 12).astype(np.int32)
    if case == "dent":  # a deep bite out of the right side
        obj = (reference > 0) & ~_disk(shape, (32, 42), 12)
    else:  # a large bulge on the right
        obj = (reference > 0) | _disk(shape, (32, 46), 12)
    prediction = np.where(obj, 7, 0).astype(np.int32)
    prediction[5:12, 5:12] = 3  # another object, left alone
    mistakes = effort.find_mistakes(prediction, reference, partial=True)
    assert [m.kind for m in mistakes] == ["outline"] and 0.5 <= _iou(obj, reference > 0) < 0.7

    stroke = effort.outline_stroke(obj, reference == 1)
    assert stroke is not None and len(stroke) >= 3
    labels = prediction.copy()
    image = effort.Image("disk", prediction, reference, None, np.zeros(shape), partial=True)
    effort.OUTCOMES.clear()
    cost = effort.fix_with_clicks(labels, image, mistakes[0])
    assert effort.OUTCOMES == {"outline by stroke": 1}
    assert _iou(labels == 7, reference == 1) >= 0.7 and effort._fixed(labels, reference, [1])
    assert (labels == 3).sum() == 49
    painted = prediction.copy()
    assert cost < effort.paint(painted, reference, mistakes[0]) / 2


def test_an_outline_stroke_that_fails_is_undone_and_painted():
    shape = (64, 64)
    reference = _disk(shape, (32, 32), 12).astype(np.int32)
    prediction = np.where(_disk(shape, (32, 32), 12) & ~_disk(shape, (32, 44), 10), 7, 0).astype(np.int32)
    prediction[(reference > 0) & (prediction == 0)] = 4  # the missing part is a neighbour's: the tool cannot take it
    mistake = effort.Mistake("outline", [1], [7], 7)
    effort.OUTCOMES.clear()
    labels = prediction.copy()
    cost = effort.fix_with_clicks(labels, effort.Image("n", prediction, reference, None, None, True), mistake)
    assert set(effort.OUTCOMES) == {"outline by paint (a neighbour's pixels)"}
    assert _iou(labels == 7, reference == 1) == 1.0 and cost == effort.paint(prediction.copy(), reference, mistake)


def test_effort_to_reach_interpolates_on_the_curve():
    assert effort.effort_to_reach([10, 20], [1.0, 3.0], 2.0) == pytest.approx(15.0)
    assert effort.effort_to_reach([10, 20], [1.0, 3.0], 0.5) == pytest.approx(5.0)
    assert effort.effort_to_reach([10, 20], [1.0, 3.0], 4.0) is None
    assert effort.effort_to_reach([10, 20], [1.0, 3.0], -1.0) is None


def test_finetune_at_every_budget_counts_objects_and_restores_the_model():
    import torch

    from napari_sgdc.config import TrainConfig
    from napari_sgdc.model import build_model, tiny_config

    torch.manual_seed(0)
    model = build_model(tiny_config(task="instance")).eval()
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    reference = np.zeros((64, 64), np.int32)
    reference[_disk((64, 64), (20, 20), 8)] = 1
    reference[_disk((64, 64), (44, 44), 8)] = 2
    prediction = np.where(reference == 1, 5, 0).astype(np.int32)  # nucleus 2 missed
    image = effort.Image("toy", prediction, reference, None, None, partial=True, pixels=pixels)
    corrected = prediction.copy()
    corrected[reference == 2] = 6
    snapshots = [[prediction.copy(), corrected]]  # at the first budget nothing was corrected yet
    others = [(pixels, reference)]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    preset = TrainConfig(epochs=1, max_steps=1, steps_per_epoch=1, batch_size=1, crop_size=64, lr_encoder=0.0,
                         lr_decoder=1e-3, warmup_steps=0, val_every=0, device="cpu")
    results = effort.finetune_budgets(model, [image], snapshots, [0, 1], others, base=0.25, preset=preset)
    assert set(results) == {0, 1}
    assert results[0] == (0, 0.25, 0.0)  # no corrected object: no fine-tune, the base model's score
    objects, aji, seconds = results[1]
    assert objects == 1 and 0.0 <= aji <= 1.0 and seconds > 0
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    control = effort.self_training_control(model, [image], others, preset=preset)
    assert 0.0 <= control <= 1.0
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # restored after the control too


def test_annotated_only_keeps_every_order_to_the_objects_the_reference_can_judge():
    reference = np.zeros((64, 64), np.int32)
    reference[_disk((64, 64), (16, 16), 6)] = 1  # annotated; the nucleus at (48, 48) has no polygon
    prediction = np.zeros((64, 64), np.int32)
    prediction[_disk((64, 64), (16, 16), 6)] = 3
    prediction[_disk((64, 64), (48, 48), 6)] = 4
    image = effort.Image("toy", prediction, reference, None, None, partial=True)
    image.mistakes = effort.find_mistakes(prediction, reference, partial=True)
    assert effort.order(image, "reading", 0) == [3, 4]
    image.looked_at = effort.judged_objects(image)
    assert image.looked_at == {3}
    for strategy in ("reading", "random"):
        assert effort.order(image, strategy, 0) == [3]
