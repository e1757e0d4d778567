"""benchmarks/effort_lesions.py: the simulated lesion user on synthetic masks (no model)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_sgdc.clicks import PlaneMaps

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def effort_lesions():
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("effort_lesions", BENCHMARKS / "effort_lesions.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["effort_lesions"] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("effort_lesions", None)
        sys.path.remove(str(BENCHMARKS))


def _disc(shape, center, radius):
    rows, cols = np.ogrid[:shape[0], :shape[1]]
    return (rows - center[0]) ** 2 + (cols - center[1]) ** 2 <= radius ** 2


def _first_reaching(rows: np.ndarray, grid: list[float], iou: float) -> float:
    reached = np.flatnonzero(rows[:, 0] >= iou)
    return grid[reached[0]] if reached.size else float("inf")


def test_outline_stroke_fixes_a_dent_cheaper_than_painting(effort_lesions):
    shape = (160, 160)
    reference = _disc(shape, (80, 80), 50)
    prediction = reference & ~_disc(shape, (80, 130), 20)  # a dent 20 px deep on the right
    rows, cols = np.indices(shape)
    uncertainty = np.where((cols > 100) & (np.abs(np.hypot(rows - 80, cols - 80) - 50) < 25), 0.8, 0.05)
    image = effort_lesions.prepare("dent", prediction, reference, PlaneMaps(np.where(reference, 0.9, 0.1)),
                                   uncertainty.astype(np.float32), tolerance=3.0)
    assert sum(unit.kind == "stretch" for unit in image.units) > 5
    before = effort_lesions._iou(image.prediction, reference)
    grid = [float(v) for v in range(1, 41)]
    effort_lesions.OUTCOMES.clear()
    clicks, _ = effort_lesions.walk(image, "queue", 0, grid)
    assert effort_lesions.OUTCOMES.get("outline by stroke", 0) >= 1
    painting, _ = effort_lesions.walk(image, "paint", 0, grid)
    assert clicks[-1, 0] > 0.99 and painting[-1, 0] > 0.99 > before  # both fix the dent
    assert _first_reaching(clicks, grid, 0.99) < _first_reaching(painting, grid, 0.99)
    # the queue looks at the dent first: it fixes it sooner than reading order
    reading, _ = effort_lesions.walk(image, "reading", 0, grid)
    assert _first_reaching(clicks, grid, 0.99) <= _first_reaching(reading, grid, 0.99)
    # a correct stretch costs one look and changes nothing
    unit = next(u for u in image.units if u.kind == "stretch" and u.center[1] < 60)
    mask = image.prediction.copy()
    assert effort_lesions.look(mask, image, unit, True) == (effort_lesions.COSTS["look"], False)
    assert (mask == image.prediction).all()


def test_missed_and_false_components(effort_lesions):
    shape = (128, 128)
    kept, missed, false = _disc(shape, (40, 40), 20), _disc(shape, (90, 90), 15), _disc(shape, (30, 100), 12)
    reference = kept | missed
    prediction = kept | false
    probability = np.where(reference | false, 0.8, 0.05).astype(np.float32)
    probability[missed] = 0.4  # under the 0.5 threshold: the model missed it, Add region finds it
    uncertainty = np.full(shape, 0.1, np.float32)
    image = effort_lesions.prepare("parts", prediction, reference, PlaneMaps(probability), uncertainty, tolerance=3.0)
    components = [unit for unit in image.units if unit.kind == "component"]
    assert len(components) == 2 and sum(len(unit.missed) for unit in components) == 1
    budgets = [100.0]
    effort_lesions.OUTCOMES.clear()
    scores, snapshots = effort_lesions.walk(image, "queue", 0, budgets, budgets)
    assert effort_lesions.OUTCOMES.get("missed by click") == 1
    assert effort_lesions.OUTCOMES.get("false by click") == 1
    assert scores[0, 0] > 0.97 and not snapshots[100.0][false].any()
    effort_lesions.OUTCOMES.clear()
    painted, _ = effort_lesions.walk(image, "paint", 0, budgets)
    assert set(effort_lesions.OUTCOMES) <= {"missed by paint", "false by fill", "outline by paint"}
    assert painted[0, 0] > 0.97
    for strategy in ("random", "reading", "regions"):
        assert sorted(map(id, effort_lesions.order(image, strategy, 1))) == sorted(map(id, image.units))
