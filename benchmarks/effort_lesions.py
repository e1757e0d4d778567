"""Effort against gain for lesions: a simulated user fixes a semantic mask with the click tools (or by painting).

The lesion counterpart of ``benchmarks/effort.py`` (issue 27), with its action costs (`effort.COSTS`):

| action | cost (s) |
|---|---|
| look at a unit (and accept it) | 0.5 |
| click (Add region, Remove region, a fill-bucket or pick click) | 1.0 |
| outline stroke (`napari_sgdc.clicks.reshape_object`) | 1.0 + 0.01 per px of its length |
| paint | 1.0 per painted region + 0.02 per changed px |

**Base model and images.** The built-in ``dermoscopy`` model (``--model``) segments the first
``--images`` PH² *test* images (sorted by name) with ``segment(..., uncertainty=True)``; a semantic
model returns no labels, so the mask plane is ``result.mask`` (what the GUI puts into the
``<image> mask`` layer). The model trained on ISIC 2018 train + PH² train and was selected on
ISIC 2018 val + PH² val: the 60 PH² test images are its held-out lesion domain (docs/models.md).
The user works on the full-resolution image against the PH² reference mask.

**Units the user looks at** (each look costs ``look``):

* the *boundary stretches* of the predicted mask, as `napari_sgdc.review.rank_boundary` cuts them
  (32 px of outline each, the Review dock's lesion queue);
* the *connected components* of the predicted mask (8-connected), and one "whole image" unit when
  the prediction is empty.

**Mistakes**, judged on the *current* mask when the user looks at a unit (an earlier fix may have
fixed a later unit's mistake too, and then the look is all it costs):

* *outline*: a stretch where the current outline (mask pixels with a 4-neighbour outside it, the
  image border counting as outside) inside the stretch's *zone* lies more than the **tolerance**
  from the reference outline. The zone is the band between the predicted stretch and the arc of
  the reference outline it should follow (the reference points nearest the stretch's two ends,
  joined along the reference contour the way that passes its middle's nearest point), plus 2 px
  around the stretch. Fix: an outline stroke from the current edge next to the stretch's start,
  along that reference arc, back to the edge next to its end (``stroke + stroke_px × length``);
  kept only if the image's IoU improves, else undone and the zone's wrong pixels painted (both
  paid).
* *false*: a stretch or component of a predicted component of which less than 20 % lies on the
  reference. Fix: one Remove-region click (painting: pick 0 + fill bucket, 2 clicks).
* *missed*: a reference component of which less than 20 % is predicted; it belongs to the nearest
  predicted component (the user sees it when looking there), or to the whole-image unit. Fix: an
  Add-region click at its inside (the reference pixel farthest from its edge); kept if the clicked
  region then has IoU ≥ 0.5 with it, else undone and painted (both paid). Painting a missed region
  costs ``paint`` + the cheaper of its changed pixels × ``paint_px`` and its outline pixels ×
  ``paint_px`` + 2 clicks (brush the outline, fill bucket inside).

**Tolerance**: ``--tolerance`` working pixels (default 3), converted to image pixels by the model's
working resolution: the ``dermoscopy`` model sees a 767×576 PH² image at 320×240, so 3 working px
are 7.2 image px, about 1 % of the image's long side. One working pixel (2.4 image px) is below
what the model can place an edge to, and a few px is within the spread of manual PH² outlines; a
user would not redraw an edge that is within 1 % of the image of the reference, but would redraw
one 3 working px off (a visible gap at full-image zoom). The rule scales with image size.

**Strategies** (the order the units are looked at; a component unit comes just before its first
stretch in the queue-like orders):

* ``queue``: `rank_boundary` order (most uncertain stretch first);
* ``random``: a random permutation of all units (``--seeds``);
* ``reading``: unit centres in rows of 64 px, left to right;
* ``regions``: stretches by the uncertainty rank of the 64-px tile holding their middle
  (`napari_sgdc.regions.rank_regions`, as Next region), then by position;
* ``paint``: the queue's order, the same mistakes fixed with napari's brush and fill bucket only
  (a stretch: its zone's wrong pixels painted, ``paint + paint_px × pixels``).

As in ``benchmarks/effort.py`` a look and its fixes are one step: the walk stops at the first step
that would overrun the budget. **Gain**: IoU and Dice of the corrected masks against the reference,
in points (× 100) over the model's, mean over images, at each ``--budgets`` (seconds per image).
The effort ratios interpolate the curves on a 1-s grid: the effort the queue needs to reach random's
gain at a budget, and the effort the click tools (queue) need to reach painting's gain, each over
the budget.

``--finetune``: after each budget, fine-tune the model (``quick``, `finetune_config`, with the
model's masks as ``predictions``, as the Fine-tune dock does) on each strategy's corrected masks
(random: every seed) and score IoU/Dice on ``--others`` other PH² test images (the next ones after
the corrected, scored as ``benchmarks/finetune.py`` scores PH²), then restore the model. Images
whose corrections are nothing at the working resolution are left out of that fine-tune. Torch runs
on ``--threads`` (default 1: on a shared 2-core CPU two spinning OpenMP threads make each fine-tune
several times slower, docs/performance.md); a quick fine-tune is about 20 s of CPU, so the run's time
is about (budgets × (strategies + random's extra seeds)) fine-tunes plus scoring ``--others`` after each.

    python benchmarks/effort_lesions.py --images 2 --budgets 5,20 --finetune --others 2 \\
        --strategies queue,random,paint --seeds 0,1                      # the dry run (8 fine-tunes)
    python benchmarks/effort_lesions.py --images 30 --others 30 --budgets 5,10,20,40 --seeds 0,1,2 \\
        --finetune --plot docs/images/effort_ph2.png                     # a full run (28 fine-tunes)
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from effort import COSTS  # noqa: E402

DATA = Path(os.environ.get("NAPARI_SGDC_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
STRATEGIES = ("queue", "random", "reading", "regions", "paint")
TOLERANCE = 3.0
"""Working pixels a stretch's outline may lie from the reference outline (module docstring)."""
COMPONENT_SHARE = 0.2
"""A predicted component with less of it on the reference is false; a reference component with less
of it predicted is missed."""
ADD_IOU = 0.5
"""An Add-region click counts when the clicked region has at least this IoU with the missed component."""
TILE = 64
OUTCOMES: dict[str, int] = {}
"""How each fix ended (``"<kind> by <action>"``), over the whole run."""

_SQUARE = np.ones((3, 3), bool)


def _count(outcome: str) -> None:
    OUTCOMES[outcome] = OUTCOMES.get(outcome, 0) + 1


@dataclass
class Unit:
    """One thing the user looks at: a boundary stretch, a predicted component or the whole image."""

    kind: str  # "stretch", "component" or "image"
    center: tuple[float, float]
    rank: int = 0  # stretches: the position in the review queue
    component: int = 0  # the predicted component (original prediction) it belongs to
    points: np.ndarray | None = None  # stretches: (N, 2) outline points
    arc: np.ndarray | None = None  # stretches: the reference outline it should follow, (M, 2)
    window: tuple[slice, slice] | None = None  # stretches: where the zone lies
    zone: np.ndarray | None = None  # stretches: bool, the band between the stretch and the arc
    missed: list = field(default_factory=list)  # components / image: reference component ids anchored here


@dataclass
class Lesion:
    """One image of the run: the prediction, the reference and what the simulated user needs."""

    name: str
    prediction: np.ndarray  # uint8 0/1
    reference: np.ndarray  # bool
    maps: object  # napari_sgdc.clicks.PlaneMaps
    uncertainty: np.ndarray
    tolerance: float  # image px
    distance: np.ndarray  # distance of every pixel to the reference outline
    ref_components: np.ndarray  # int, 8-connected components of the reference
    units: list = field(default_factory=list)
    pixels: np.ndarray | None = None


# ----------------------------------------------------------------------------- geometry


def _edges(mask: np.ndarray, window: tuple[slice, slice] | None = None, shape: tuple[int, int] | None = None
           ) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask; the image border counts as outside. With
    `window` (the slices `mask` was cut from an image of `shape`), the window's own sides that are
    not the image border do not."""
    mask = np.asarray(mask) > 0
    padded = np.pad(mask, 1, mode="edge")
    if window is None:
        padded[0, :] = padded[-1, :] = padded[:, 0] = padded[:, -1] = False
    else:
        if window[0].start == 0:
            padded[0, :] = False
        if window[0].stop >= shape[0]:
            padded[-1, :] = False
        if window[1].start == 0:
            padded[:, 0] = False
        if window[1].stop >= shape[1]:
            padded[:, -1] = False
    height, width = mask.shape
    outside = np.zeros(mask.shape, bool)
    for dr, dc in ((0, 1), (2, 1), (1, 0), (1, 2)):
        outside |= ~padded[dr:dr + height, dc:dc + width]
    return mask & outside


def _outline(mask: np.ndarray) -> list[np.ndarray]:
    """The closed outlines of a mask as `rank_boundary` traces them (the image border included),
    without the repeated last point."""
    from skimage.measure import find_contours

    contours = []
    for contour in find_contours(np.pad(np.asarray(mask) > 0, 1).astype(np.float32), 0.5):
        contour = np.clip(contour - 1, 0, np.array(mask.shape) - 1)
        if len(contour) > 1 and np.allclose(contour[0], contour[-1]):
            contour = contour[:-1]
        if len(contour):
            contours.append(contour)
    return contours


def _inside(mask: np.ndarray) -> tuple[int, int]:
    """The pixel of `mask` farthest from its edge."""
    from scipy import ndimage

    distance = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    return tuple(int(v) for v in np.unravel_index(np.argmax(distance), mask.shape))


def _window(shape, low, high, pad: int) -> tuple[slice, slice]:
    return (slice(max(0, int(np.floor(low[0])) - pad), min(shape[0], int(np.ceil(high[0])) + pad + 1)),
            slice(max(0, int(np.floor(low[1])) - pad), min(shape[1], int(np.ceil(high[1])) + pad + 1)))


def _grow(window: tuple[slice, slice], shape, pad: int) -> tuple[slice, slice]:
    return (slice(max(0, window[0].start - pad), min(shape[0], window[0].stop + pad)),
            slice(max(0, window[1].start - pad), min(shape[1], window[1].stop + pad)))


def _line_mask(points: np.ndarray, window: tuple[slice, slice], shape) -> np.ndarray:
    """The polyline `points` (image coordinates) drawn into a bool array of the window's shape."""
    from skimage.draw import line

    out = np.zeros(shape, bool)
    pts = np.round(np.asarray(points, float)).astype(int) - [window[0].start, window[1].start]
    if len(pts) == 1:
        pts = np.vstack([pts, pts])
    for (r0, c0), (r1, c1) in zip(pts[:-1], pts[1:]):
        rr, cc = line(r0, c0, r1, c1)
        keep = (rr >= 0) & (rr < shape[0]) & (cc >= 0) & (cc < shape[1])
        out[rr[keep], cc[keep]] = True
    return out


def _arc(contour: np.ndarray, start: int, end: int, middle: int) -> np.ndarray:
    """The points of a closed contour from `start` to `end`, the way that passes `middle`."""
    n = len(contour)
    forward = (end - start) % n
    if (middle - start) % n <= forward:
        return contour[(start + np.arange(forward + 1)) % n]
    return contour[(start - np.arange((start - end) % n + 1)) % n]


def _stretch_geometry(unit: Unit, contours: list[np.ndarray], tree, owner: np.ndarray, shape) -> None:
    """The reference arc a stretch should follow, and its zone (module docstring)."""
    from skimage.draw import polygon
    from scipy import ndimage

    points = unit.points
    if contours:
        ends = points[[0, len(points) // 2, -1]]
        _, nearest = tree.query(ends)
        k = int(owner[nearest[1], 0])
        contour = contours[k]
        index = []
        for point, found in zip(ends, nearest):
            if owner[found, 0] == k:
                index.append(int(owner[found, 1]))
            else:
                index.append(int(np.argmin(np.linalg.norm(contour - point, axis=1))))
        unit.arc = _arc(contour, index[0], index[2], index[1])
        every = np.vstack([points, unit.arc])
    else:
        unit.arc = None
        every = points
    window = _window(shape, every.min(axis=0), every.max(axis=0), 3)
    size = (window[0].stop - window[0].start, window[1].stop - window[1].start)
    zone = ndimage.binary_dilation(_line_mask(points, window, size), _SQUARE, iterations=2)
    if unit.arc is not None:
        ring = np.vstack([points, unit.arc[::-1]]) - [window[0].start, window[1].start]
        rr, cc = polygon(ring[:, 0], ring[:, 1], size)
        zone[rr, cc] = True
        zone |= ndimage.binary_dilation(_line_mask(unit.arc, window, size), _SQUARE)
    unit.window, unit.zone = window, zone


def prepare(name: str, prediction: np.ndarray, reference: np.ndarray, maps, uncertainty: np.ndarray,
            tolerance: float, pixels: np.ndarray | None = None) -> Lesion:
    """A `Lesion` with its units (module docstring); `tolerance` in image pixels."""
    from scipy import ndimage
    from scipy.spatial import cKDTree

    from napari_sgdc.review import rank_boundary

    prediction = (np.asarray(prediction) > 0).astype(np.uint8)
    reference = np.asarray(reference) > 0
    shape = reference.shape
    ref_edge = _edges(reference)
    distance = (ndimage.distance_transform_edt(~ref_edge) if ref_edge.any()
                else np.full(shape, float(sum(shape))))
    ref_components, ref_count = ndimage.label(reference, structure=_SQUARE)
    image = Lesion(name, prediction, reference, maps, np.asarray(uncertainty, np.float32), float(tolerance),
                   distance, ref_components, pixels=pixels)

    contours = _outline(reference)
    tree, owner = None, np.zeros((0, 2), int)
    if contours:
        tree = cKDTree(np.vstack(contours))
        owner = np.vstack([np.stack([np.full(len(c), k), np.arange(len(c))], axis=1) for k, c in enumerate(contours)])
    components, count = ndimage.label(prediction, structure=_SQUARE)
    near = ndimage.grey_dilation(components, size=(3, 3))
    units = []
    for rank, stretch in enumerate(rank_boundary(prediction, image.uncertainty)):
        row, col = (int(round(v)) for v in stretch.center)
        unit = Unit("stretch", stretch.center, rank=rank, component=int(near[row, col]), points=stretch.points)
        _stretch_geometry(unit, contours, tree, owner, shape)
        units.append(unit)
    by_component = {}
    for c in range(1, count + 1):
        by_component[c] = Unit("component", _inside(components == c), component=c)
    if count == 0:
        by_component[0] = Unit("image", (shape[0] / 2, shape[1] / 2))
    if count:
        _, (rows, cols) = ndimage.distance_transform_edt(components == 0, return_indices=True)
    for r in range(1, ref_count + 1):
        target = ref_components == r
        if (prediction[target] > 0).sum() >= COMPONENT_SHARE * target.sum():
            continue
        row, col = _inside(target)
        anchor = int(components[rows[row, col], cols[row, col]]) if count else 0
        by_component[anchor].missed.append(r)
    image.units = units + list(by_component.values())
    return image


def tolerance_px(shape: tuple[int, int], config, working_px: float = TOLERANCE) -> float:
    """`working_px` working pixels of `config`'s working resolution, in pixels of an image of `shape`."""
    from napari_sgdc.grid import working_shape

    working = working_shape(shape[0], shape[1], config, None)
    return working_px * max(shape) / max(working)


# ----------------------------------------------------------------------------- the simulated user


def _scores(mask: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    from napari_sgdc.metrics import dice, iou

    return float(iou(mask, reference)), float(dice(mask, reference))


def _iou(mask: np.ndarray, reference: np.ndarray) -> float:
    mask = mask > 0
    union = int((mask | reference).sum())
    return 1.0 if union == 0 else int((mask & reference).sum()) / union


def _component_at(mask: np.ndarray, point) -> np.ndarray:
    from scipy import ndimage

    components, _ = ndimage.label(mask > 0, structure=_SQUARE)
    return components == components[tuple(point)]


def judge_stretch(mask: np.ndarray, image: Lesion, unit: Unit) -> tuple[str | None, tuple | None]:
    """What is wrong at a stretch now: ``("outline", None)``, ``("false", a point inside the
    false component)`` or ``(None, None)``."""
    from scipy import ndimage

    shape = mask.shape
    window = unit.window
    outer = _grow(window, shape, 1)
    edges = _edges(mask[outer], outer, shape)
    inner = (slice(window[0].start - outer[0].start, window[0].stop - outer[0].start),
             slice(window[1].start - outer[1].start, window[1].stop - outer[1].start))
    seen = edges[inner] & unit.zone
    if not seen.any():
        return None, None
    if float(image.distance[window][seen].max()) <= image.tolerance:
        return None, None
    components, _ = ndimage.label(mask > 0, structure=_SQUARE)
    ids = components[window][seen]
    label = int(np.bincount(ids[ids > 0]).argmax())
    component = components == label
    if (image.reference & component).sum() < COMPONENT_SHARE * component.sum():
        rows, cols = np.nonzero(seen)
        return "false", (int(rows[0]) + window[0].start, int(cols[0]) + window[1].start)
    return "outline", None


def _nearest_edge(mask: np.ndarray, point: np.ndarray, reach: int) -> np.ndarray:
    """The mask's edge pixel nearest `point` within `reach` px (else the point itself)."""
    shape = mask.shape
    window = _window(shape, point, point, reach)
    rows, cols = np.nonzero(_edges(mask[window], window, shape))
    if not rows.size:
        return np.asarray(point, float)
    rows, cols = rows + window[0].start, cols + window[1].start
    best = int(np.argmin((rows - point[0]) ** 2 + (cols - point[1]) ** 2))
    return np.array([rows[best], cols[best]], float)


def outline_stroke(mask: np.ndarray, unit: Unit, reach: int) -> np.ndarray:
    """The stroke a user draws for a stretch: from the current edge next to its start, along the
    reference arc, back to the edge next to its end."""
    start = _nearest_edge(mask, unit.points[0], reach)
    end = _nearest_edge(mask, unit.points[-1], reach)
    return np.vstack([start, unit.arc, end])


def _stroke_cost(stroke: np.ndarray) -> float:
    return COSTS["stroke"] + COSTS["stroke_px"] * float(np.linalg.norm(np.diff(stroke, axis=0), axis=1).sum())


def paint_zone(mask: np.ndarray, image: Lesion, unit: Unit) -> float:
    """Paints the wrong pixels of a stretch's zone to the reference; returns the cost."""
    window = unit.window
    reference = image.reference[window]
    wrong = unit.zone & ((mask[window] > 0) != reference)
    count = int(wrong.sum())
    if not count:
        return 0.0
    mask[window][wrong] = reference[wrong]
    return COSTS["paint"] + COSTS["paint_px"] * count


def paint_region(mask: np.ndarray, image: Lesion, ref_id: int) -> float:
    """Paints a missed reference component in; returns the cost (module docstring)."""
    target = image.ref_components == ref_id
    changed = int((target & (mask == 0)).sum())
    mask[target] = 1
    by_outline = COSTS["paint_px"] * int(_edges(target).sum()) + 2 * COSTS["click"]
    return COSTS["paint"] + min(COSTS["paint_px"] * changed, by_outline)


def remove_false(mask: np.ndarray, point, clicks_allowed: bool) -> float:
    from napari_sgdc import clicks

    if clicks_allowed:
        clicks.remove_region(mask, point).apply(mask)
        _count("false by click")
        return COSTS["click"]
    mask[_component_at(mask, point)] = 0
    _count("false by fill")
    return 2 * COSTS["click"]


def add_missed(mask: np.ndarray, image: Lesion, ref_id: int, clicks_allowed: bool) -> float:
    from napari_sgdc import clicks

    if not clicks_allowed:
        _count("missed by paint")
        return paint_region(mask, image, ref_id)
    target = image.ref_components == ref_id
    point = _inside(target & (mask == 0))
    cost = COSTS["click"]
    try:
        edit = clicks.add_region(mask, image.maps, point)
        edit.apply(mask)
        region = _component_at(mask, point)
        both = int((region & target).sum())
        if both / max(1, int((region | target).sum())) >= ADD_IOU:
            _count("missed by click")
            return cost
        edit.revert(mask)
    except clicks.ClickError:
        pass
    _count("missed by paint")
    return cost + paint_region(mask, image, ref_id)


def fix_outline(mask: np.ndarray, image: Lesion, unit: Unit, clicks_allowed: bool) -> float:
    """An outline stroke along the reference arc, kept if the IoU improves, else painting (module docstring)."""
    from napari_sgdc import clicks

    if not clicks_allowed or unit.arc is None:
        _count("outline by paint")
        return paint_zone(mask, image, unit)
    reach = int(np.ceil(image.tolerance)) + 4
    stroke = outline_stroke(mask, unit, reach)
    cost = _stroke_cost(stroke)
    before = _iou(mask, image.reference)
    try:
        edit = clicks.reshape_object(mask, stroke)
        edit.apply(mask)
        if _iou(mask, image.reference) > before + 1e-12:
            _count("outline by stroke")
            return cost
        edit.revert(mask)
    except clicks.ClickError:
        pass
    _count("outline by paint")
    return cost + paint_zone(mask, image, unit)


def look(mask: np.ndarray, image: Lesion, unit: Unit, clicks_allowed: bool) -> tuple[float, bool]:
    """The user looks at `unit` and fixes what is wrong there (in `mask`); returns (cost, whether fixed)."""
    cost, fixed = COSTS["look"], False
    if unit.kind == "stretch":
        kind, point = judge_stretch(mask, image, unit)
        if kind == "false":
            cost += remove_false(mask, point, clicks_allowed)
            fixed = True
        elif kind == "outline":
            cost += fix_outline(mask, image, unit, clicks_allowed)
            fixed = True
        return cost, fixed
    if unit.kind == "component":
        point = tuple(int(v) for v in unit.center)
        if mask[point]:
            component = _component_at(mask, point)
            if (image.reference & component).sum() < COMPONENT_SHARE * component.sum():
                cost += remove_false(mask, point, clicks_allowed)
                fixed = True
    for ref_id in unit.missed:
        target = image.ref_components == ref_id
        if (mask[target] > 0).sum() < COMPONENT_SHARE * target.sum():
            cost += add_missed(mask, image, ref_id, clicks_allowed)
            fixed = True
    return cost, fixed


def order(image: Lesion, strategy: str, seed: int) -> list[Unit]:
    """The units in the order the user looks at them (module docstring)."""
    from napari_sgdc.regions import rank_regions

    stretches = sorted((u for u in image.units if u.kind == "stretch"), key=lambda u: u.rank)
    others = [u for u in image.units if u.kind != "stretch"]
    if strategy == "random":
        return [image.units[i] for i in np.random.default_rng(seed).permutation(len(image.units))]
    if strategy == "reading":
        return sorted(image.units, key=lambda u: (int(u.center[0] // TILE), u.center[1], u.center[0]))
    if strategy == "regions":
        rank = {(r.top, r.left): n for n, r in enumerate(rank_regions(image.uncertainty, TILE))}
        stretches.sort(key=lambda u: (rank[(int(u.center[0]) // TILE * TILE, int(u.center[1]) // TILE * TILE)],
                                      u.center[0], u.center[1]))
    elif strategy not in ("queue", "paint"):
        raise ValueError(f"unknown strategy {strategy!r}; one of {', '.join(STRATEGIES)}")
    sequence = [u for u in others if u.kind == "image"]
    waiting = {u.component: u for u in others if u.kind == "component"}
    for unit in stretches:
        if unit.component in waiting:
            sequence.append(waiting.pop(unit.component))
        sequence.append(unit)
    return sequence + list(waiting.values())


def walk(image: Lesion, strategy: str, seed: int, grid: list[float], keep: list[float] = ()
         ) -> tuple[np.ndarray, dict]:
    """The image corrected along `strategy`: at each budget of `grid` (seconds, ascending) its
    (IoU, Dice, corrected units); and the masks at the budgets of `keep`."""
    mask = image.prediction.copy()
    clicks_allowed = strategy != "paint"
    spent, fixed_units, rows, snapshots = 0.0, 0, [], {}
    pending = list(grid)

    def record():
        budget = pending.pop(0)
        rows.append((*_scores(mask, image.reference), fixed_units))
        if budget in keep:
            snapshots[budget] = mask.copy()

    for unit in order(image, strategy, seed):
        trial = mask.copy()
        step, fixed = look(trial, image, unit, clicks_allowed)
        while pending and spent + step > pending[0]:
            record()
        if not pending:
            break
        spent, mask, fixed_units = spent + step, trial, fixed_units + int(fixed)
    while pending:  # every unit looked at within the budget
        record()
    return np.array(rows, float), snapshots


# ----------------------------------------------------------------------------- the run


def load_images(model_name: str, count: int, others: int, working_px: float) -> tuple:
    """The model, the first `count` PH² test images segmented by it, and the next `others`
    (image, mask) pairs."""
    from finetune import load

    from napari_sgdc.checkpoints import load_model
    from napari_sgdc.clicks import PlaneMaps
    from napari_sgdc.inference import segment
    from napari_sgdc.postprocess import PostprocessOptions

    model = load_model(model_name, device="cpu")
    if model.config.is_instance:
        raise SystemExit(f"error: {model_name} is an instance model; this benchmark is for lesion (semantic) models")
    options = PostprocessOptions.for_model(model.config)
    samples = load("ph2", "test", task="semantic")
    images = []
    for sample in samples[:count]:
        result = segment(model, sample.image, options, device="cpu", uncertainty=True)
        mask = result.mask if result.labels is None else result.labels > 0
        reference = np.asarray(sample.mask) > 0
        images.append(prepare(sample.name, mask, reference, PlaneMaps(result.probability, None, options),
                              result.uncertainty, tolerance_px(reference.shape, model.config, working_px),
                              pixels=sample.image))
    return model, images, [(s.image, s.mask) for s in samples[count:count + others]]


def finetune_scores(model, images: list[Lesion], masks: list[np.ndarray], others: list) -> dict | None:
    """IoU/Dice on `others` after a ``quick`` fine-tune on the corrected `masks`; the model is
    restored afterwards. None when nothing was corrected."""
    import re

    from finetune import semantic_scores

    from napari_sgdc.train import finetune
    from napari_sgdc.train.finetune import finetune_config

    pairs = [(i.pixels, m, i.prediction) for i, m in zip(images, masks) if (m != i.prediction).any()]
    state = copy.deepcopy(model.state_dict())
    try:
        while pairs:
            try:
                finetune(model, [p[0] for p in pairs], [p[1] for p in pairs], finetune_config(model, "quick"),
                         predictions=[p[2] for p in pairs])
                break
            except ValueError as error:  # corrections that vanish at the working resolution
                found = re.search(r"labels (\d+) equal the model's prediction", str(error))
                if not found:
                    raise
                pairs.pop(int(found.group(1)))
        if not pairs:
            return None
        return semantic_scores(model, others)
    finally:
        model.load_state_dict(state)


def _effort_to_reach(grid: np.ndarray, gains: np.ndarray, target: float) -> float:
    """The effort (s) at which a gain curve (0 at 0 s) first reaches `target`, interpolated; inf if never."""
    xs, ys = np.concatenate([[0.0], grid]), np.concatenate([[0.0], gains])
    if target <= 0:
        return 0.0
    for i in range(1, len(xs)):
        if ys[i] >= target:
            if ys[i] == ys[i - 1]:
                return float(xs[i])
            return float(xs[i - 1] + (target - ys[i - 1]) * (xs[i] - xs[i - 1]) / (ys[i] - ys[i - 1]))
    return float("inf")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dermoscopy", help="built-in lesion model or checkpoint")
    parser.add_argument("--images", type=int, default=2, help="PH² test images corrected (from the first)")
    parser.add_argument("--budgets", default="5,10,20,40", help="seconds of effort per image")
    parser.add_argument("--table-budgets", default=None,
                        help="the two budgets of the direct/fine-tuned table (default: the second and the last)")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the random strategy")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE, help="outline tolerance in working pixels")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help=f"some of {', '.join(STRATEGIES)}")
    parser.add_argument("--finetune", action="store_true",
                        help="after each budget, fine-tune (quick) on each strategy's corrections and score --others")
    parser.add_argument("--others", type=int, default=8, help="the next PH² test images, scored after fine-tuning")
    parser.add_argument("--plot", default=None, help="write the gain-effort curves to this PNG")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core CPU, 2 spinning threads make fine-tunes 10x slower)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    budgets = sorted(float(v) for v in args.budgets.split(","))
    table = ([float(v) for v in args.table_budgets.split(",")] if args.table_budgets
             else [budgets[min(1, len(budgets) - 1)], budgets[-1]])
    strategies = args.strategies.split(",")
    for strategy in strategies:
        if strategy not in STRATEGIES:
            parser.error(f"unknown strategy {strategy!r}; one of {', '.join(STRATEGIES)}")
    grid = sorted(set(budgets) | {float(v) for v in range(1, int(np.ceil(budgets[-1])) + 1)})
    where = [grid.index(b) for b in budgets]
    started = time.perf_counter()
    model, images, others = load_images(args.model, args.images, args.others if args.finetune else 0, args.tolerance)
    before = np.mean([_scores(i.prediction, i.reference) for i in images], axis=0)
    units = sum(len(i.units) for i in images)
    print(f"{len(images)} PH² test images ({', '.join(i.name for i in images)}), model {args.model}; {units} units "
          f"({sum(u.kind == 'stretch' for i in images for u in i.units)} stretches); tolerance {args.tolerance:g} "
          f"working px = {np.mean([i.tolerance for i in images]):.1f} image px; IoU before {before[0]:.4f}, "
          f"Dice {before[1]:.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
    base = None
    if args.finetune:
        from finetune import semantic_scores

        base = semantic_scores(model, others)
    if base:
        print(f"{len(others)} other PH² test images (fine-tune gain): IoU {base['iou']:.4f}, Dice {base['dice']:.4f}",
              flush=True)
    curves, tuned = {}, {}  # strategy: (runs, grid, 3); strategy: (runs, budgets, 2)
    for strategy in strategies:
        seeds = [int(s) for s in args.seeds.split(",")] if strategy == "random" else [0]
        runs, tuned_runs = [], []
        for seed in seeds:
            walks = [walk(image, strategy, seed, grid, budgets) for image in images]
            runs.append(np.mean([rows for rows, _ in walks], axis=0))
            runs[-1][:, 2] *= len(images)  # corrected units: the total over images
            if args.finetune:
                row = []
                for budget in budgets:
                    scores = finetune_scores(model, images, [snaps[budget] for _, snaps in walks], others) or base
                    row.append((scores["iou"] - base["iou"], scores["dice"] - base["dice"]))
                    print(f"  {strategy} seed {seed} at {budget:g} s: fine-tuned IoU gain {100 * row[-1][0]:+.2f} "
                          f"({time.perf_counter() - started:.0f} s)", flush=True)
                tuned_runs.append(row)
        curves[strategy] = np.array(runs)
        if tuned_runs:
            tuned[strategy] = np.array(tuned_runs)

    def cell(values: np.ndarray) -> str:  # values: (runs,) in points
        return f"{values.mean():+.1f}" + (f" ± {values.std():.1f}" if len(values) > 1 else "")

    names = {"queue": "review queue", "random": f"random ({len(args.seeds.split(','))} seeds)",
             "reading": "reading order", "regions": "uncertainty regions", "paint": "painting only (queue order)"}
    print("\nDirect gain, IoU / Dice points over the model's masks:\n")
    print("| strategy | " + " | ".join(f"at {b:g} s" for b in budgets) + " |")
    print("|---|" + "---:|" * len(budgets))
    for strategy, runs in curves.items():
        cells = [f"{cell(100 * (runs[:, j, 0] - before[0]))} / {cell(100 * (runs[:, j, 1] - before[1]))}"
                 for j in where]
        print(f"| {names[strategy]} | " + " | ".join(cells) + " |")
    print("\nCorrected units (all images, mean over seeds):\n")
    print("| strategy | " + " | ".join(f"at {b:g} s" for b in budgets) + " |")
    print("|---|" + "---:|" * len(budgets))
    for strategy, runs in curves.items():
        print(f"| {names[strategy]} | " + " | ".join(f"{runs[:, j, 2].mean():.1f}" for j in where) + " |")
    if tuned:
        print(f"\nIoU gain (points), direct on the {len(images)} corrected images and after a quick fine-tune on "
              f"them, on {len(others)} other PH² test images:\n")
        print("| strategy | " + " | ".join(f"direct at {b:g} s | fine-tuned at {b:g} s" for b in table) + " |")
        print("|---|" + "---:|---:|" * len(table))
        for strategy, runs in curves.items():
            cells = []
            for b in table:
                j = grid.index(b)
                cells.append(cell(100 * (runs[:, j, 0] - before[0])))
                cells.append(cell(100 * tuned[strategy][:, budgets.index(b), 0]) if strategy in tuned else "")
            print(f"| {names[strategy]} | " + " | ".join(cells) + " |")
    grid_array = np.array(grid)
    ratios = []
    if "queue" in curves and "random" in curves:
        ratios.append(("queue", "random"))
    if "queue" in curves and "paint" in curves:
        ratios.append(("queue", "paint"))
    if ratios:
        print("\nEffort ratios (IoU; the effort the first needs to reach the second's gain, over the second's budget):\n")
        for first, second in ratios:
            mine = curves[first][:, :, 0].mean(axis=0) - before[0]
            theirs = curves[second][:, :, 0].mean(axis=0) - before[0]
            parts = []
            for b, j in zip(budgets, where):
                effort = _effort_to_reach(grid_array, mine, theirs[j])
                parts.append(f"at {b:g} s ({100 * theirs[j]:+.1f}): {effort:.1f} s = {effort / b:.2f}×"
                             if np.isfinite(effort) else f"at {b:g} s ({100 * theirs[j]:+.1f}): not reached")
            label = "clicks (queue) vs painting" if second == "paint" else "queue vs random"
            print(f"- {label}: " + "; ".join(parts))
    print(f"\n(fixes, all strategies: {OUTCOMES}; {time.perf_counter() - started:.0f} s)")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = 2 if tuned else 1
        figure, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
        for strategy, runs in curves.items():
            gain = 100 * (runs[:, :, 0] - before[0])
            line, = axes[0, 0].plot([0, *grid], [0, *gain.mean(axis=0)], label=names[strategy])
            if len(runs) > 1:
                axes[0, 0].fill_between(grid, gain.mean(axis=0) - gain.std(axis=0), gain.mean(axis=0) + gain.std(axis=0),
                                        color=line.get_color(), alpha=0.2)
            if strategy in tuned:
                values = 100 * tuned[strategy][:, :, 0]
                axes[0, 1].errorbar([0, *budgets], [0, *values.mean(axis=0)], yerr=[0, *values.std(axis=0)],
                                    marker="o", capsize=3, label=names[strategy], color=line.get_color())
        axes[0, 0].set_title(f"direct: {len(images)} corrected PH² test images")
        axes[0, 0].set_xlabel("effort per image (s, simulated)")
        axes[0, 0].set_ylabel("IoU gain (points)")
        axes[0, 0].legend(fontsize=8)
        if tuned:
            axes[0, 1].set_title(f"after a quick fine-tune: {len(others)} other PH² test images")
            axes[0, 1].set_xlabel("effort per corrected image (s, simulated)")
            axes[0, 1].set_ylabel("IoU gain (points)")
            axes[0, 1].axhline(0, color="grey", lw=0.5)
        figure.tight_layout()
        figure.savefig(args.plot, dpi=100)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
