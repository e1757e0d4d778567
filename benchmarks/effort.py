"""Effort against gain: a simulated user fixes the model's mistakes with the click tools (or by painting).

The user has the reference labels. The model's mistakes on an image are found by overlap
(an object "covers" another when it holds at least half of it):

* **missed**: a reference nucleus that no predicted object overlaps by IoU ≥ 0.2;
* **merged**: a predicted object covering two or more reference nuclei;
* **split**: a reference nucleus covered by two or more predicted objects;
* **false**: a predicted object of which less than 20 % lies on reference nuclei (not judged on
  partly annotated images such as GBM40, where unannotated nuclei are real);
* **outline**: a one-to-one match with IoU in [0.5, 0.7).

Each mistake belongs to a predicted object (a missed nucleus to the nearest one, by centroid):
the user finds it when they look at that object. A **strategy** is the order the user looks at
the predicted objects in; every look costs `COSTS["look"]`, every fix its actions:

| action | cost (s) |
|---|---|
| look at an object (and accept it) | 0.5 |
| click (a click tool, or pick-a-label / fill-bucket click) | 1.0 |
| stroke (Shift-drag split, Ctrl-Shift-drag merge) | 1.0 + 0.01 per px of length |
| paint | 1.0 per painted object + 0.02 per changed px (a 10-px brush covers about 50 new px a second) |

With click tools: missed → Ctrl-click add; merged → Shift-click split, else a stroke between the
nuclei, else paint; split → one merge drag per extra piece; false → Ctrl-click delete; outline →
paint (there is no outline tool yet). A tool result counts only if each reference nucleus it
should give then has an object of IoU ≥ 0.5; otherwise the edit is undone and painted (both
costs paid). Painting only: missed, merged, outline → paint the changed pixels; split → pick
the label and fill each extra piece (2 clicks a piece); false → pick 0 and fill (2 clicks).

Strategies: ``queue`` (`napari_sgdc.review.rank_objects`), ``random`` (``--seeds``),
``reading`` (rows of 64 px, left to right), ``regions`` (objects by the uncertainty rank of
their 64-px tile, `napari_sgdc.regions.rank_regions`, as Next region), ``paint`` (the queue's
order, painting only). Gain: AJI of the corrected images against the reference (on partly
annotated images, predicted objects touching no annotated nucleus are left out, as
``benchmarks/finetune.py`` scores GBM40), at each ``--budgets`` (seconds per image).

    python benchmarks/effort.py --images 2 --budgets 15,30,60,120      # the small run (about a minute)
    python benchmarks/effort.py --images 10 --seeds 0,1,2 --plot docs/images/effort_gbm40.png

``--finetune`` also fine-tunes the built-in model (``quick``, with the predictions, as the GUI
does) on each strategy's corrections at the **last** budget and scores ``--others`` other GBM40
images (as ``benchmarks/finetune.py`` does) against the base model's score. Fine-tuning after every budget, and the random strategy's other seeds, are left to
a full run (docs/results.md says what it needs).

    python benchmarks/effort.py --images 2 --budgets 60 --finetune --others 4 --strategies queue,random,paint
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

DATA = Path(os.environ.get("NAPARI_SGDC_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
COSTS = {"look": 0.5, "click": 1.0, "stroke": 1.0, "stroke_px": 0.01, "paint": 1.0, "paint_px": 0.02}
STRATEGIES = ("queue", "random", "reading", "regions", "paint")
OUTCOMES: dict[str, int] = {}
"""How each click-tool fix ended (``"<kind> by <action>"``), over the whole run."""


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
    """The model's mistakes (module docstring), each anchored to a predicted object."""
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
        elif 0.5 <= iou < 0.7 and r not in merged_refs | split_refs:
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


def _fixed(labels: np.ndarray, ref: np.ndarray, refs: list[int]) -> bool:
    """Whether every reference nucleus in `refs` now has an object of IoU ≥ 0.5."""
    for r in refs:
        target = ref == r
        ids, counts = np.unique(labels[target], return_counts=True)
        ok = False
        for i, count in zip(ids, counts):
            if i and count / ((labels == i).sum() + target.sum() - count) >= 0.5:
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
    if mistake.kind in ("merged", "split") and mistake.preds:  # the largest piece keeps its id: not repainted
        keep = mistake.preds[0]
        biggest = max(mistake.refs, key=lambda r: int(((ref == r) & (labels == keep)).sum()))
        target[ref == biggest] = keep
    changed = region & (target != labels)
    labels[changed] = target[changed]
    return COSTS["paint"] * max(1, len(mistake.refs)) + COSTS["paint_px"] * int(changed.sum())


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
            return paint(labels, ref, mistake)
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
            attempts = []
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
    """Napari's own tools: paint, or pick a label and fill (module docstring); returns the cost."""
    if mistake.kind == "false":
        labels[labels == mistake.preds[0]] = 0
        return 2 * COSTS["click"]
    if mistake.kind == "split":
        for piece in mistake.preds[1:]:
            labels[labels == piece] = mistake.preds[0]
        return 2 * COSTS["click"] * (len(mistake.preds) - 1)
    return paint(labels, image.reference, mistake)


def order(image: Image, strategy: str, seed: int) -> list[int]:
    """The predicted objects in the order the user looks at them."""
    from napari_sgdc.regions import rank_regions
    from napari_sgdc.review import rank_objects

    centres = _centroids(image.prediction)
    ids = sorted(centres)
    if strategy in ("queue", "paint"):
        return [item.label for item in rank_objects(image.prediction, image.maps.separation, image.uncertainty)]
    if strategy == "random":
        return [int(i) for i in np.random.default_rng(seed).permutation(ids)]
    if strategy == "reading":
        return sorted(ids, key=lambda i: (int(centres[i][0] // 64), centres[i][1]))
    rank = {(r.top, r.left): n for n, r in enumerate(rank_regions(image.uncertainty, 64))}
    return sorted(ids, key=lambda i: (rank[(int(centres[i][0]) // 64 * 64, int(centres[i][1]) // 64 * 64)],
                                      centres[i][0], centres[i][1]))


def score(labels: np.ndarray, image: Image) -> float:
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


def finetune_gain(model, images: list[Image], labels: list[np.ndarray], others: list) -> float:
    """AJI on the `others` (GBM40 pairs, scored as benchmarks/finetune.py does) after a ``quick``
    fine-tune on the corrected `images`; the model is restored afterwards."""
    import copy

    from finetune import partial_scores

    from napari_sgdc.train import finetune
    from napari_sgdc.train.finetune import finetune_config

    state = copy.deepcopy(model.state_dict())
    try:
        finetune(model, [i.pixels for i in images], labels, finetune_config(model, "quick"),
                 predictions=[i.prediction for i in images])
        return partial_scores(model, others)["aji"]
    finally:
        model.load_state_dict(state)


def load_images(count: int, others: int) -> tuple:
    """The built-in nuclei model, the first `count` GBM40 images segmented by it (partly
    annotated), and the next `others` GBM40 (image, annotation) pairs for the fine-tune gain."""
    from finetune import load

    from napari_sgdc.checkpoints import load_model
    from napari_sgdc.clicks import PlaneMaps
    from napari_sgdc.inference import segment
    from napari_sgdc.postprocess import PostprocessOptions

    model = load_model("nuclei", device="cpu")
    options = PostprocessOptions.for_model(model.config)
    samples = load("gbm40", "train", task="instance")
    images = []
    for sample in samples[:count]:
        result = segment(model, sample.image, options, device="cpu", uncertainty=True)
        separation = result.separation if result.separation is not None else result.boundary
        image = Image(sample.name, result.labels, np.asarray(sample.mask), PlaneMaps(result.probability, separation,
                      options), result.uncertainty, partial=True, pixels=sample.image)
        image.mistakes = find_mistakes(image.prediction, image.reference, image.partial)
        images.append(image)
    return model, images, [(s.image, s.mask) for s in samples[count:count + others]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2, help="GBM40 images (from the first)")
    parser.add_argument("--budgets", default="15,30,60,120", help="seconds of effort per image")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the random strategy")
    parser.add_argument("--plot", default=None, help="write the gain-effort curves to this PNG")
    parser.add_argument("--finetune", action="store_true",
                        help="also fine-tune (quick) on each strategy's corrections at the last budget and score "
                             "--others GBM40 images (random: its first seed only)")
    parser.add_argument("--others", type=int, default=4, help="GBM40 images scored after fine-tuning")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help=f"some of {', '.join(STRATEGIES)}")
    args = parser.parse_args(argv)
    budgets = [float(v) for v in args.budgets.split(",")]
    started = time.perf_counter()
    model, images, others = load_images(args.images, args.others if args.finetune else 0)
    kinds = {}
    for image in images:
        for mistake in image.mistakes:
            kinds[mistake.kind] = kinds.get(mistake.kind, 0) + 1
    before = np.mean([score(image.prediction, image) for image in images])
    print(f"{len(images)} GBM40 images ({', '.join(i.name for i in images)}); mistakes {kinds}; AJI before {before:.4f}")
    tuned_before = None
    if args.finetune:
        from finetune import partial_scores

        tuned_before = partial_scores(model, others)["aji"]
    rows, tuned = {}, {}
    for strategy in args.strategies.split(","):
        seeds = [int(s) for s in args.seeds.split(",")] if strategy == "random" else [0]
        runs, tuned_runs = [], []
        for seed in seeds:
            walks = [walk(image, strategy, seed, budgets) for image in images]
            runs.append(np.mean([scores for scores, _ in walks], axis=0))
            if args.finetune and seed == seeds[0]:
                tuned_runs.append(finetune_gain(model, images, [snaps[-1] for _, snaps in walks], others))
        rows[strategy] = (np.mean(runs, axis=0), np.std(runs, axis=0) if len(runs) > 1 else None)
        if tuned_runs:
            tuned[strategy] = tuned_runs[0]
    print("\n| strategy | " + " | ".join(f"AJI gain at {b:g} s" for b in budgets) + " |")
    print("|---|" + "---:|" * len(budgets))
    for strategy, (mean, std) in rows.items():
        cells = [f"{100 * (m - before):+.1f}" + (f" ± {100 * s:.1f}" if std is not None else "")
                 for m, s in zip(mean, std if std is not None else mean)]
        print(f"| {strategy} | " + " | ".join(cells) + " |")
    print(f"\n(AJI points over {before:.4f}; click-tool fixes, all strategies: {OUTCOMES}; "
          f"{time.perf_counter() - started:.0f} s)")
    if tuned:
        print(f"\nquick fine-tune on the corrections at {budgets[-1]:g} s, AJI on {len(others)} other GBM40 images "
              f"(the base model: {tuned_before:.4f}):")
        for strategy, value in tuned.items():
            print(f"| {strategy} | {value:.4f} | {100 * (value - tuned_before):+.1f} |")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(figsize=(6, 4))
        for strategy, (mean, _) in rows.items():
            axes.plot([0, *budgets], [0, *(100 * (mean - before))], marker="o", label=strategy)
        axes.set_xlabel("effort per image (s, simulated)")
        axes.set_ylabel("AJI gain (points)")
        axes.legend()
        figure.tight_layout()
        figure.savefig(args.plot, dpi=100)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
