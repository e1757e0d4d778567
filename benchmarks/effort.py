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
| stroke (Shift-drag split, Ctrl-Shift-drag merge, outline stroke) | 1.0 + 0.01 per px of length |
| paint | 1.0 per painted object + 0.02 per changed px (a 10-px brush covers about 50 new px a second) |

With click tools: missed → Ctrl-click add; merged → Shift-click split, else a stroke between the
nuclei, else paint; split → one merge drag per extra piece; false → Ctrl-click delete; outline →
outline strokes (`clicks.reshape_object`): the user redraws the longest stretch of the reference
nucleus's contour that lies more than 1.5 px off the object's outline, from the object's edge
and back to it (the whole closed contour when most of it is off), at most 2 strokes (a second
only if the first helped), until the object matches the nucleus by IoU ≥ 0.7; the user paints at
once where most of the missing pixels belong to a neighbour (the tool never takes them). Other tool results count if each reference nucleus
they should give then has an object of IoU ≥ 0.5. A failed edit is undone and the nucleus
painted (both costs paid). Painting only: missed, merged, outline → paint the changed pixels
(an existing object keeps its label: only the difference is painted); split → pick the label
and fill each extra piece (2 clicks a piece); false → pick 0 and fill (2 clicks). The rules
live in ``benchmarks/_effort_user.py`` (re-exported here: `COSTS`, `Mistake`, `_fixed`,
`paint`, `score`, ...).

Strategies: ``queue`` (`napari_sgdc.review.rank_objects`), ``random`` (``--seeds``),
``reading`` (rows of 64 px, left to right), ``regions`` (objects by the uncertainty rank of
their 64-px tile, `napari_sgdc.regions.rank_regions`, as Next region), ``paint`` (the queue's
order, painting only). Gain: AJI of the corrected images against the reference (on partly
annotated images, predicted objects touching no annotated nucleus are left out, as
``benchmarks/finetune.py`` scores GBM40), at each ``--budgets`` (seconds per image). The
images are the first ``--images`` GBM40 images (corrected as annotated), segmented by
``--model`` (a built-in name or a checkpoint; use one that did not train on GBM40).

``--finetune`` also fine-tunes the base model (``quick``, with the predictions, as the GUI
does) on the corrections of every strategy, random seed and budget (``--finetune-budgets``
to restrict the budgets), scores the ``--others`` GBM40 images after the corrected ones (as
``benchmarks/finetune.py`` does) and restores the model. It prints a table of the corrected
objects (as the Fine-tune dock counts them) and the gain over the base model. ``--control``
adds the gain that needs no correction: the same fine-tune on the corrected images' own
predictions, nothing edited (self-training on the new domain). ``--annotated-only``: every
strategy looks only at the predicted objects the partial annotation can judge
(`_effort_user.judged_objects`); without it, looks at unannotated nuclei (GBM40 leaves mostly
faint and out-of-focus ones without a polygon, the ones the queue ranks first) cost time that
the score cannot reward.

Printed: the AJI gain at every budget; the effort each strategy needs to reach random's
gain (linear interpolation on the curves, as a ratio to random's effort: the target is
≤ 0.5 for the queue) and clicks' effort to reach painting's gain (target ≤ ⅓); a table at
``--table-budgets`` (default: the 2nd and the last budget) with the direct and the
fine-tune gain. ``--plot`` draws both curves (random: mean ± std over seeds).

    python benchmarks/effort.py --images 2 --budgets 15,30,60,120      # the small run (about a minute)
    python benchmarks/effort.py --images 2 --budgets 15,60 --finetune --others 2 --strategies queue,random,paint --seeds 0,1
    python benchmarks/effort.py --model /work/main/runs/nuclei_heldout/model.safetensors --images 10 \\
        --budgets 15,30,60,120,240 --finetune --others 8 --plot docs/images/effort_gbm40.png
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
# OpenMP threads that spin while waiting make a fine-tune 10x slower on a busy CPU (docs/performance.md);
# must be set before torch is imported
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from _effort_user import (  # noqa: E402  (re-exported for benchmarks/effort_lesions.py and the tests)
    COSTS,
    OUTCOMES,
    Image,
    Mistake,
    _fixed,
    find_mistakes,
    fix_by_painting,
    fix_with_clicks,
    judged_objects,
    order,
    outline_stroke,
    paint,
    score,
    walk,
)

__all__ = ["COSTS", "OUTCOMES", "Image", "Mistake", "_fixed", "effort_to_reach", "find_mistakes", "finetune_budgets",
           "fix_by_painting", "fix_with_clicks", "judged_objects", "order", "outline_stroke", "paint", "score",
           "self_training_control", "walk"]

DATA = Path(os.environ.get("NAPARI_SGDC_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
STRATEGIES = ("queue", "random", "reading", "regions", "paint")
NAMES = {"queue": "review queue", "random": "random", "reading": "reading order", "regions": "uncertainty regions",
         "paint": "painting only (queue order)"}


def finetune_budgets(model, images: list[Image], snapshots: list[list[np.ndarray]], indices: list[int], others: list,
                     base: float, preset="quick") -> dict[int, tuple[int, float, float]]:
    """For each budget index in `indices`: fine-tune `model` (`preset`, with the predictions) on
    the `images` corrected as ``snapshots[image][index]``, score the `others` (GBM40 pairs, as
    benchmarks/finetune.py does) and restore the model.

    Returns:
        {index: (corrected objects, AJI of the others, seconds)}; with no corrected object the
        model is not fine-tuned and the AJI is `base`.
    """
    import copy

    from finetune import partial_scores

    from napari_sgdc.train import finetune
    from napari_sgdc.train.corrections import edit_summary

    results = {}
    for index in indices:
        labels = [snaps[index] for snaps in snapshots]
        counts = [edit_summary(lab, image.prediction, instance=True).objects for lab, image in zip(labels, images)]
        edited = [n for n, count in enumerate(counts) if count]
        if not edited:
            results[index] = (0, base, 0.0)
            continue
        started = time.perf_counter()
        state = copy.deepcopy(model.state_dict())
        try:
            finetune(model, [images[n].pixels for n in edited], [labels[n] for n in edited], preset,
                     predictions=[images[n].prediction for n in edited])
            value = partial_scores(model, others)["aji"]
        finally:
            model.load_state_dict(state)
        results[index] = (sum(counts), value, time.perf_counter() - started)
    return results


def self_training_control(model, images: list[Image], others: list, preset="quick") -> float:
    """The gain that needs no correction: fine-tune `model` (`preset`) on the `images` with their
    own predicted labels as the labels (nothing edited, so every pixel weighs the same), score the
    `others`, restore the model.
    What fine-tuning on corrections gains beyond this is what the corrections taught."""
    import copy

    from finetune import partial_scores

    from napari_sgdc.train import finetune

    state = copy.deepcopy(model.state_dict())
    try:
        # no `predictions=`: with nothing edited there is no edit to weigh (finetune refuses that case)
        finetune(model, [image.pixels for image in images], [image.prediction for image in images], preset)
        return partial_scores(model, others)["aji"]
    finally:
        model.load_state_dict(state)


def load_images(source: str, count: int, others: int, annotated_only: bool = False) -> tuple:
    """The base model, the first `count` GBM40 images segmented by it (partly annotated), and
    the next `others` GBM40 (image, annotation) pairs for the fine-tune gain. `annotated_only`:
    the user looks only at the objects the annotation can judge (`judged_objects`)."""
    from finetune import load

    from napari_sgdc.checkpoints import load_model
    from napari_sgdc.clicks import PlaneMaps
    from napari_sgdc.inference import segment
    from napari_sgdc.postprocess import PostprocessOptions

    model = load_model(source, device="cpu")
    options = PostprocessOptions.for_model(model.config)
    samples = load("gbm40", "train", task="instance")
    images = []
    for sample in samples[:count]:
        result = segment(model, sample.image, options, device="cpu", uncertainty=True)
        separation = result.separation if result.separation is not None else result.boundary
        image = Image(sample.name, result.labels, np.asarray(sample.mask), PlaneMaps(result.probability, separation,
                      options), result.uncertainty, partial=True, pixels=sample.image)
        image.mistakes = find_mistakes(image.prediction, image.reference, image.partial)
        if annotated_only:
            image.looked_at = judged_objects(image)
        images.append(image)
    return model, images, [(s.image, s.mask) for s in samples[count:count + others]]


def effort_to_reach(budgets: list[float], gains, target: float) -> float | None:
    """The effort at which the curve (0, 0), (budget, gain)... first reaches `target` (linear
    interpolation), or None: never (or a target ≤ 0)."""
    xs, ys = [0.0, *budgets], [0.0, *gains]
    if target <= 0:
        return None
    for x0, y0, x1, y1 in zip(xs, ys, xs[1:], ys[1:]):
        if y1 >= target:
            return x0 + (target - y0) / (y1 - y0) * (x1 - x0) if y1 > y0 else x0
    return None


def _cell(mean: float, std: float | None, digits: int = 1, sign: bool = True) -> str:
    text = f"{mean:+.{digits}f}" if sign else f"{mean:.{digits}f}"
    return text + (f" ± {std:.{digits}f}" if std is not None else "")


def _stats(values: list) -> tuple[np.ndarray, np.ndarray | None]:
    values = np.asarray(values, float)
    return values.mean(axis=0), values.std(axis=0) if len(values) > 1 else None


def plot(path: str, budgets: list[float], direct: dict, tuned: dict, tuned_budgets: list[float]) -> None:
    """Two panels: direct AJI gain and fine-tuned AJI (others) gain against effort."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, panels = plt.subplots(1, 2 if tuned else 1, figsize=(11 if tuned else 6, 4), squeeze=False)
    curves = [(panels[0, 0], budgets, direct, "AJI gain, corrected images (points)")]
    if tuned:
        curves.append((panels[0, 1], tuned_budgets, tuned, "AJI gain, other images after fine-tune (points)"))
    for axes, xs, rows, title in curves:
        for strategy, (mean, std) in rows.items():
            line, = axes.plot([0, *xs], [0, *mean], marker="o", label=NAMES[strategy])
            if std is not None:
                axes.fill_between([0, *xs], [0, *(mean - std)], [0, *(mean + std)], color=line.get_color(), alpha=0.2)
        axes.axhline(0, color="grey", linewidth=0.5)
        axes.set_xlabel("effort per image (s, simulated)")
        axes.set_ylabel(title)
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="nuclei", help="base model: a built-in name or a checkpoint path")
    parser.add_argument("--images", type=int, default=2, help="GBM40 images corrected (from the first)")
    parser.add_argument("--budgets", default="15,30,60,120", help="seconds of effort per image")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the random strategy")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help=f"some of {', '.join(STRATEGIES)}")
    parser.add_argument("--finetune", action="store_true",
                        help="fine-tune (quick) on the corrections of every strategy, seed and budget and score "
                             "--others GBM40 images")
    parser.add_argument("--annotated-only", action="store_true",
                        help="every strategy looks only at predicted objects touching an annotated nucleus (GBM40 "
                             "is partly annotated: looks elsewhere cost time the score cannot see)")
    parser.add_argument("--control", action="store_true",
                        help="with --finetune: also fine-tune on the images' own predictions, uncorrected (the gain "
                             "without any correction)")
    parser.add_argument("--finetune-budgets", default=None, help="only these budgets get a fine-tune (default: all)")
    parser.add_argument("--others", type=int, default=4, help="GBM40 images after the corrected ones, scored after "
                                                              "fine-tuning")
    parser.add_argument("--table-budgets", default=None, help="two budgets for the summary table "
                                                              "(default: the 2nd and the last; with two budgets, both)")
    parser.add_argument("--plot", default=None, help="write the gain-effort curves to this PNG")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    budgets = [float(v) for v in args.budgets.split(",")]
    strategies = args.strategies.split(",")
    unknown = [s for s in strategies if s not in STRATEGIES]
    tuned_budgets = budgets if args.finetune_budgets is None else [float(v) for v in args.finetune_budgets.split(",")]
    table_budgets = (sorted({budgets[1 if len(budgets) > 2 else 0], budgets[-1]}) if args.table_budgets is None
                     else [float(v) for v in args.table_budgets.split(",")])
    if unknown or any(b not in budgets for b in tuned_budgets + table_budgets):
        parser.error(f"unknown strategies {unknown}, or --finetune-budgets/--table-budgets not among --budgets")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from napari_sgdc.checkpoints import model_path

    started = time.perf_counter()
    model, images, others = load_images(args.model, args.images, args.others if args.finetune else 0,
                                         args.annotated_only)
    kinds = {}
    for image in images:
        for mistake in image.mistakes:
            kinds[mistake.kind] = kinds.get(mistake.kind, 0) + 1
    before = np.mean([score(image.prediction, image) for image in images])
    print(f"model {args.model} ({model_path(args.model)}); {len(images)} GBM40 images "
          f"({', '.join(i.name for i in images)}); mistakes {kinds}; AJI before {before:.4f}", flush=True)
    base = None
    if args.finetune:
        from finetune import partial_scores

        base = partial_scores(model, others)["aji"]
        print(f"fine-tune: quick at {', '.join(f'{b:g}' for b in tuned_budgets)} s; AJI of the {len(others)} other "
              f"GBM40 images by the base model {base:.4f}", flush=True)
        if args.control:
            control = self_training_control(model, images, others)
            print(f"control, no correction: quick fine-tune on the model's own labels of the {len(images)} images: "
                  f"AJI of the others {control:.4f} ({100 * (control - base):+.1f} points)", flush=True)
    indices = [budgets.index(b) for b in tuned_budgets]
    direct, tuned, objects, tune_seconds = {}, {}, {}, []
    for strategy in strategies:
        seeds = [int(s) for s in args.seeds.split(",")] if strategy == "random" else [0]
        runs, tuned_runs, object_runs = [], [], []
        for seed in seeds:
            walks = [walk(image, strategy, seed, budgets) for image in images]
            runs.append(100 * (np.mean([scores for scores, _ in walks], axis=0) - before))
            if args.finetune:
                result = finetune_budgets(model, images, [snaps for _, snaps in walks], indices, others, base)
                tuned_runs.append([100 * (result[i][1] - base) for i in indices])
                object_runs.append([result[i][0] for i in indices])
                for i in indices:
                    print(f"  {strategy} seed {seed} at {budgets[i]:g} s: {result[i][0]} corrected objects, AJI "
                          f"(others) {result[i][1]:.4f}, {result[i][2]:.0f} s", flush=True)
                    if result[i][2]:
                        tune_seconds.append(result[i][2])
        direct[strategy] = _stats(runs)
        if args.finetune:
            tuned[strategy], objects[strategy] = _stats(tuned_runs), _stats(object_runs)

    label = {s: NAMES[s] + (f" ({len(args.seeds.split(','))} seeds)" if s == "random" else "") for s in strategies}
    print("\n| strategy | " + " | ".join(f"AJI gain at {b:g} s" for b in budgets) + " |")
    print("|---|" + "---:|" * len(budgets))
    for strategy, (mean, std) in direct.items():
        print(f"| {label[strategy]} | " + " | ".join(_cell(m, None if std is None else s)
                                                     for m, s in zip(mean, mean if std is None else std)) + " |")
    print(f"\n(AJI points over {before:.4f}; click-tool fixes, all strategies: {OUTCOMES}; "
          f"{time.perf_counter() - started:.0f} s)")

    if "random" in direct:
        others_ = [s for s in direct if s != "random"]
        print("\neffort to reach random's gain, as a fraction of random's effort (target for the queue: ≤ 0.5):\n")
        print("| budget | random's gain | " + " | ".join(NAMES[s] for s in others_) + " |")
        print("|---:|---:|" + "---:|" * len(others_))
        for b, g in zip(budgets, direct["random"][0]):
            cells = [effort_to_reach(budgets, direct[s][0], g) for s in others_]
            print(f"| {b:g} s | {g:+.1f} | " + " | ".join("—" if g <= 0 else "not reached" if e is None
                                                          else f"{e / b:.2f}" for e in cells) + " |")
    if "queue" in direct and "paint" in direct:
        print("\nclicks (queue order) against painting (queue order): effort to the same gain (target ≤ 0.33):\n")
        print("| painting's budget | painting's gain | clicks' effort | ratio |\n|---:|---:|---:|---:|")
        for b, g in zip(budgets, direct["paint"][0]):
            e = effort_to_reach(budgets, direct["queue"][0], g)
            print(f"| {b:g} s | {g:+.1f} | " + ("— | —" if g <= 0 else "not reached | —" if e is None
                                                else f"{e:.1f} s | {e / b:.2f}") + " |")

    if tuned:
        print(f"\nquick fine-tune on the corrections, AJI of {len(others)} other GBM40 images (base model "
              f"{base:.4f}; random: mean ± std over seeds):\n")
        print("| strategy | budget | corrected objects | AJI (others) after fine-tune | gain |\n|---|---:|---:|---:|---:|")
        for strategy in tuned:
            (gain, gain_std), (count, count_std) = tuned[strategy], objects[strategy]
            for k, b in enumerate(tuned_budgets):
                sd = None if gain_std is None else gain_std[k]
                print(f"| {label[strategy]} | {b:g} s | {_cell(count[k], None if count_std is None else count_std[k], 1, False)}"
                      f" | {_cell(base + gain[k] / 100, None if sd is None else sd / 100, 4, False)} | {_cell(gain[k], sd)} |")
        if tune_seconds:
            print(f"\n({len(tune_seconds)} fine-tunes, {np.mean(tune_seconds):.0f} s each with scoring on average)")

    print(f"\n| strategy | " + " | ".join(f"direct gain at {b:g} s | fine-tune gain at {b:g} s" for b in table_budgets)
          + " |\n|---|" + "---:|---:|" * len(table_budgets))
    for strategy, (mean, std) in direct.items():
        cells = []
        for b in table_budgets:
            i = budgets.index(b)
            cells.append(_cell(mean[i], None if std is None else std[i]))
            if strategy in tuned and b in tuned_budgets:
                k, (gain, gain_std) = tuned_budgets.index(b), tuned[strategy]
                cells.append(_cell(gain[k], None if gain_std is None else gain_std[k]))
            else:
                cells.append("—")
        print(f"| {label[strategy]} | " + " | ".join(cells) + " |")
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    if args.plot:
        plot(args.plot, budgets, direct, tuned, tuned_budgets)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
