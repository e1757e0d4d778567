"""The simulated user of ``benchmarks/effort.py``: finds the model's mistakes by overlap with the
reference labels and fixes them with the click tools or by painting, each action costed
(``COSTS``, in seconds). The rules are in effort.py's docstring; this module holds them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

COSTS = {"look": 0.5, "click": 1.0, "stroke": 1.0, "stroke_px": 0.01, "paint": 1.0, "paint_px": 0.02}
OUTCOMES: dict[str, int] = {}
"""How each click-tool fix ended (``"<kind> by <action>"``), over the whole run."""
OFF_OUTLINE = 1.5
"""A reference contour point farther than this (px) from the predicted outline is *off* it: the stroke redraws it."""
MAX_STROKES = 2
"""Outline strokes tried on one object before the user reverts them and paints."""
OUTLINE_IOU = 0.7
"""An outline mistake is fixed when the object matches its nucleus by this IoU (the outline mistake's upper bound)."""


def _count(outcome: str) -> None:
    OUTCOMES[outcome] = OUTCOMES.get(outcome, 0) + 1


@dataclass
class Mistake:
    kind: str
    refs: list[int]
    preds: list[int]
    anchor: int = 0


@dataclass
class Image:
    """One image of the run: the prediction, its maps and the reference."""

    name: str
    prediction: np.ndarray
    reference: np.ndarray
    maps: object
    uncertainty: np.ndarray
    partial: bool
    pixels: np.ndarray | None = None
    mistakes: list = field(default_factory=list)
    looked_at: set | None = None
    """When set, the only predicted objects the user looks at (`judged_objects`); None: all."""


def judged_objects(image: Image) -> set[int]:
    """The predicted objects the reference can judge: those touching an annotated nucleus, and
    the objects that mistakes are anchored to. On a partly annotated image (GBM40: mostly faint,
    out-of-focus and border nuclei lack a polygon) a look at any other object costs time but can
    fix nothing the score sees; restricting every strategy to these objects simulates an image
    annotated in full, so that orders are compared on what the reference can tell apart."""
    touching = np.unique(image.prediction[(image.reference > 0) & (image.prediction > 0)])
    return {int(i) for i in touching} | {m.anchor for m in image.mistakes if m.anchor}


def _overlaps(pred: np.ndarray, ref: np.ndarray) -> tuple[dict, np.ndarray, np.ndarray]:
    """{(pred id, ref id): pixels} of overlapping objects, and the areas of each."""
    both = (pred > 0) & (ref > 0)
    pairs, counts = np.unique(np.stack([pred[both], ref[both]]), axis=1, return_counts=True)
    table = {(int(p), int(r)): int(c) for (p, r), c in zip(pairs.T, counts)}
    return table, np.bincount(pred.ravel()), np.bincount(ref.ravel())


def _centroids(labels: np.ndarray) -> dict[int, np.ndarray]:
    from scipy import ndimage

    ids = np.unique(labels[labels > 0])
    return {int(i): np.asarray(c) for i, c in zip(ids, ndimage.center_of_mass(labels > 0, labels, ids))}


def find_mistakes(pred: np.ndarray, ref: np.ndarray, partial: bool) -> list[Mistake]:
    """The model's mistakes (effort.py's docstring), each anchored to a predicted object."""
    table, pred_area, ref_area = _overlaps(pred, ref)
    pred_refs, ref_preds, best = {}, {}, {}  # refs a pred holds half of; preds a ref holds half of; best IoU
    for (p, r), count in table.items():
        if count >= 0.5 * ref_area[r]:
            pred_refs.setdefault(p, []).append(r)
        if count >= 0.5 * pred_area[p]:
            ref_preds.setdefault(r, []).append(p)
        iou = count / (pred_area[p] + ref_area[r] - count)
        if iou > best.get(r, (0.0, 0))[0]:
            best[r] = (iou, p)
    mistakes = [Mistake("merged", refs, [p]) for p, refs in pred_refs.items() if len(refs) >= 2]
    merged_refs = {r for m in mistakes for r in m.refs}
    mistakes += [Mistake("split", [r], preds) for r, preds in ref_preds.items() if len(preds) >= 2]
    split_refs = {m.refs[0] for m in mistakes if m.kind == "split"}
    for r in np.flatnonzero(ref_area)[1:]:
        iou, p = best.get(int(r), (0.0, 0))
        if iou < 0.2 and r not in merged_refs:
            mistakes.append(Mistake("missed", [int(r)], []))
        elif 0.5 <= iou < OUTLINE_IOU and r not in merged_refs | split_refs:
            mistakes.append(Mistake("outline", [int(r)], [p]))
    if not partial:
        on_ref = {}
        for (p, _), count in table.items():
            on_ref[p] = on_ref.get(p, 0) + count
        mistakes += [Mistake("false", [], [int(p)]) for p in np.flatnonzero(pred_area)[1:]
                     if on_ref.get(int(p), 0) < 0.2 * pred_area[p]]
    pred_centres, ref_centres = _centroids(pred), _centroids(ref)
    ids = np.array(sorted(pred_centres))
    points = np.array([pred_centres[i] for i in ids]) if len(ids) else np.zeros((0, 2))
    for mistake in mistakes:
        if mistake.preds:
            mistake.anchor = mistake.preds[0]
        elif len(ids):
            mistake.anchor = int(ids[np.argmin(np.linalg.norm(points - ref_centres[mistake.refs[0]], axis=1))])
    return mistakes


def _inside(mask: np.ndarray) -> tuple[int, int]:
    """The pixel of `mask` farthest from its edge."""
    from scipy import ndimage

    distance = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    return tuple(int(v) for v in np.unravel_index(np.argmax(distance), mask.shape))


def _fixed(labels: np.ndarray, ref: np.ndarray, refs: list[int], min_iou: float = 0.5) -> bool:
    """Whether every reference nucleus in `refs` now has an object of IoU ≥ `min_iou`."""
    for r in refs:
        target = ref == r
        ids, counts = np.unique(labels[target], return_counts=True)
        ok = False
        for i, count in zip(ids, counts):
            if i and count / ((labels == i).sum() + target.sum() - count) >= min_iou:
                ok = True
        if not ok:
            return False
    return True


def paint(labels: np.ndarray, ref: np.ndarray, mistake: Mistake) -> float:
    """Paints the reference nuclei of `mistake` over its predicted objects; returns the cost."""
    region = np.isin(ref, mistake.refs) | np.isin(labels, mistake.preds) if mistake.preds else np.isin(ref, mistake.refs)
    target = np.where(np.isin(labels, mistake.preds), 0, labels)
    next_id = int(labels.max()) + 1
    for offset, r in enumerate(mistake.refs):
        target[ref == r] = next_id + offset
    if mistake.kind in ("merged", "split", "outline") and mistake.preds:  # the largest piece keeps its id
        keep = mistake.preds[0]
        biggest = max(mistake.refs, key=lambda r: int(((ref == r) & (labels == keep)).sum()))
        target[ref == biggest] = keep
    changed = region & (target != labels)
    labels[changed] = target[changed]
    return COSTS["paint"] * max(1, len(mistake.refs)) + COSTS["paint_px"] * int(changed.sum())


# ----------------------------------------------------------------------------- outline strokes


def _contour(mask: np.ndarray) -> np.ndarray:
    """The longest closed contour of `mask` ((N, 2) rows, columns at half-pixel steps), its
    repeated last point dropped."""
    from skimage.measure import find_contours

    contours = find_contours(np.pad(mask, 1).astype(np.float32), 0.5)
    if not contours:
        return np.zeros((0, 2))
    contour = max(contours, key=len) - 1.0
    return contour[:-1] if len(contour) > 1 and np.allclose(contour[0], contour[-1]) else contour


def _longest_run(off: np.ndarray) -> tuple[int, int]:
    """(first, last) index of the longest circular run of True in `off` (not all True); last may
    exceed ``len(off) - 1`` (wrapping)."""
    n = len(off)
    shift = int(np.flatnonzero(~off)[0])  # start the scan on an on-point: no run wraps
    rolled = np.roll(off, -shift)
    best, start = (0, -1, -1), None
    for i, value in enumerate([*rolled, False]):
        if value and start is None:
            start = i
        elif not value and start is not None:
            if i - start > best[0]:
                best = (i - start, start, i - 1)
            start = None
    return (best[1] + shift) % n, (best[1] + shift) % n + best[2] - best[1]


def outline_stroke(obj: np.ndarray, target: np.ndarray) -> np.ndarray | None:
    """The outline stroke a user draws to bring object `obj` (bool) to the nucleus `target` (bool):
    the longest stretch of the target's contour lying off the object's outline (farther than
    `OFF_OUTLINE` px), from and back to the object's nearest edge pixels, so both ends lie
    within `napari_sgdc.clicks.OUTLINE_REACH` of it (and the start on it); the whole closed
    contour when most of it is off. None when nothing is off.

    Returns:
        (N, 2) float points (rows, columns), or None.
    """
    from scipy import ndimage
    from scipy.spatial.distance import cdist

    contour, outline = _contour(target), _contour(obj)
    if len(contour) < 3 or not len(outline):
        return None
    off = cdist(contour, outline).min(axis=1) > OFF_OUTLINE
    if not off.any():
        return None
    edge = np.argwhere(obj & ~ndimage.binary_erosion(obj, border_value=0)).astype(float)
    n = len(contour)
    if off.mean() > 0.5:
        start = int(np.argmin(cdist(contour, edge).min(axis=1)))
        points = contour[np.arange(start, start + n + 1) % n]
    else:
        first, last = _longest_run(off)
        points = contour[np.arange(first - 1, last + 2) % n]  # and the on-points either side
    ends = edge[np.argmin(cdist(points[[0, -1]], edge), axis=1)]
    return np.vstack([ends[:1], points, ends[1:]])


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def stroke_cost(stroke: np.ndarray) -> float:
    """A stroke's cost: one gesture plus its length."""
    return COSTS["stroke"] + COSTS["stroke_px"] * float(np.linalg.norm(np.diff(stroke, axis=0), axis=1).sum())


def fix_outline(labels: np.ndarray, ref: np.ndarray, mistake: Mistake) -> float:
    """Fixes an outline mistake with up to `MAX_STROKES` outline strokes (`clicks.reshape_object`),
    a second one only if the first raised the IoU by 0.02 or more; when they do not bring the
    object to IoU ≥ `OUTLINE_IOU` they are undone and the nucleus is painted (both paid). A
    user who knows the tool never takes a neighbour's pixels paints at once when more of the
    nucleus's missing pixels lie in other objects than the stroke could change. Returns the cost."""
    from napari_sgdc import clicks

    label, target = mistake.preds[0], ref == mistake.refs[0]
    obj = labels == label
    blocked = int((target & ~obj & (labels > 0)).sum())  # the tool never takes a neighbour's pixels
    if not obj.any() or blocked > int(((target ^ obj) & ((labels == 0) | obj)).sum()):
        _count("outline by paint (a neighbour's pixels)")
        return paint(labels, ref, mistake)
    cost, edits, iou = 0.0, [], _iou(obj, target)
    try:
        for _ in range(MAX_STROKES):
            stroke = outline_stroke(labels == label, target)
            if stroke is None:
                break
            cost += stroke_cost(stroke)
            edit = clicks.reshape_object(labels, stroke)
            edit.apply(labels)
            edits.append(edit)
            if _fixed(labels, ref, mistake.refs, OUTLINE_IOU):
                _count("outline by stroke")
                return cost
            iou, before = _iou(labels == label, target), iou
            if iou < before + 0.02:  # the stroke did not help: no second one
                break
    except clicks.ClickError:
        pass
    for edit in reversed(edits):
        edit.revert(labels)
    _count("outline by paint")
    return cost + paint(labels, ref, mistake)


# ----------------------------------------------------------------------------- fixes


def fix_with_clicks(labels: np.ndarray, image: Image, mistake: Mistake) -> float:
    """Fixes `mistake` with the click tools (painting where they fail); returns the cost."""
    from napari_sgdc import clicks

    ref, maps = image.reference, image.maps
    cost = 0.0
    try:
        if mistake.kind == "false":
            clicks.delete_object(labels, _inside(labels == mistake.preds[0])).apply(labels)
            _count("false by click")
            return COSTS["click"]
        if mistake.kind == "outline":
            return fix_outline(labels, ref, mistake)
        attempts = []
        if mistake.kind == "missed":
            attempts = [("click", lambda: clicks.add_object(labels, maps, _inside(ref == mistake.refs[0])))]
        elif mistake.kind == "merged":
            obj = labels == mistake.preds[0]
            centres = [np.asarray(_inside(ref == r), float) for r in mistake.refs[:2]]
            middle, along = (centres[0] + centres[1]) / 2, centres[1] - centres[0]
            across = np.array([-along[1], along[0]]) / max(np.linalg.norm(along), 1e-9)
            half = float(np.sqrt(obj.sum()))
            stroke = [middle - half * across, middle + half * across]
            attempts = [("click", lambda: clicks.split_object(labels, maps, [_inside(obj)])),
                        ("stroke", lambda: clicks.split_object(labels, maps, stroke=stroke))]
        elif mistake.kind == "split":
            for piece in mistake.preds[1:]:
                a, b = _inside(labels == mistake.preds[0]), _inside(labels == piece)
                cost += COSTS["stroke"] + COSTS["stroke_px"] * float(np.hypot(a[0] - b[0], a[1] - b[1]))
                clicks.merge_objects(labels, a, b).apply(labels)
        for action, make in attempts:
            edit = make()
            edit.apply(labels)
            cost += COSTS["click"] if action == "click" else COSTS["stroke"] + COSTS["stroke_px"] * 2 * half
            if _fixed(labels, ref, mistake.refs):
                _count(f"{mistake.kind} by {action}")
                return cost
            edit.revert(labels)
        if mistake.kind == "split" and _fixed(labels, ref, mistake.refs):
            _count("split by stroke")
            return cost
    except clicks.ClickError:
        cost += COSTS["click"]
    _count(f"{mistake.kind} by paint")
    return cost + paint(labels, ref, mistake)


def fix_by_painting(labels: np.ndarray, image: Image, mistake: Mistake) -> float:
    """Napari's own tools: paint, or pick a label and fill (effort.py's docstring); returns the cost."""
    if mistake.kind == "false":
        labels[labels == mistake.preds[0]] = 0
        return 2 * COSTS["click"]
    if mistake.kind == "split":
        for piece in mistake.preds[1:]:
            labels[labels == piece] = mistake.preds[0]
        return 2 * COSTS["click"] * (len(mistake.preds) - 1)
    return paint(labels, image.reference, mistake)


# ----------------------------------------------------------------------------- strategies


def order(image: Image, strategy: str, seed: int) -> list[int]:
    """The predicted objects in the order the user looks at them."""
    from napari_sgdc.regions import rank_regions
    from napari_sgdc.review import rank_objects

    centres = _centroids(image.prediction)
    ids = sorted(centres)
    if strategy in ("queue", "paint"):
        ordered = [item.label for item in rank_objects(image.prediction, image.maps.separation, image.uncertainty)]
    elif strategy == "random":
        ordered = [int(i) for i in np.random.default_rng(seed).permutation(ids)]
    elif strategy == "reading":
        ordered = sorted(ids, key=lambda i: (int(centres[i][0] // 64), centres[i][1]))
    else:
        rank = {(r.top, r.left): n for n, r in enumerate(rank_regions(image.uncertainty, 64))}
        ordered = sorted(ids, key=lambda i: (rank[(int(centres[i][0]) // 64 * 64, int(centres[i][1]) // 64 * 64)],
                                             centres[i][0], centres[i][1]))
    return ordered if image.looked_at is None else [i for i in ordered if i in image.looked_at]


def score(labels: np.ndarray, image: Image) -> float:
    """AJI of `labels` against the image's reference (partly annotated: objects touching no
    annotated nucleus left out)."""
    from napari_sgdc.metrics import aji

    if image.partial:
        touching = np.unique(labels[(image.reference > 0) & (labels > 0)])
        labels = np.where(np.isin(labels, touching), labels, 0)
    return float(aji(labels, image.reference.astype(np.int64)))


def walk(image: Image, strategy: str, seed: int, budgets: list[float]) -> tuple[list[float], list[np.ndarray]]:
    """The image corrected along `strategy` at each budget (seconds): its AJI and its labels."""
    labels = image.prediction.astype(np.int32).copy()
    by_anchor = {}
    for mistake in image.mistakes:
        by_anchor.setdefault(mistake.anchor, []).append(mistake)
    fix = fix_by_painting if strategy == "paint" else fix_with_clicks
    spent, scores, snapshots, pending = 0.0, [], [], list(budgets)
    for anchor in order(image, strategy, seed):
        step = COSTS["look"]
        trial = labels.copy()
        for mistake in by_anchor.get(anchor, []):
            step += fix(trial, image, mistake)
        while pending and spent + step > pending[0]:
            scores.append(score(labels, image))
            snapshots.append(labels.copy())
            pending.pop(0)
        if not pending:
            break
        spent, labels = spent + step, trial
    while pending:  # every object looked at within the budget
        scores.append(score(labels, image))
        snapshots.append(labels.copy())
        pending.pop(0)
    return scores, snapshots
