"""Uncertainty benchmark: does the uncertainty map point at the model's mistakes, and does
correcting the most uncertain regions help the correct-and-retrain loop more than random ones?

Part ``auroc``: for every test image, the built-in model's mask (one forward pass, as the
widget shows it) is compared with the reference; a pixel is *wrong* where they differ.
Each uncertainty signal ranks the pixels; AUROC (pooled over all pixels of all images) says
how well it separates wrong from right pixels (0.5 = chance, 1 = perfect):

* ``entropy``: binary entropy of the one-pass probability (free);
* ``tta``: 2 × std of the probability over the 8 flips and rotations (8 forward passes);
* ``tta-entropy``: entropy of the TTA mean probability (8 forward passes).

Part ``loop``: on images of the corrected domain, the user corrects K regions (tiles of
``--region`` px; the reference stands in for the correction) chosen either as the K most
uncertain (`napari_sgdc.regions.rank_regions`) or at random (same count, same total area),
then the model is fine-tuned with the ``quick`` preset on those corrections only
(`finetune(..., predictions=...)` weights and crops to the edited pixels), and scored on the
other images of that domain.

Usage::

    python benchmarks/uncertainty.py auroc --dataset ph2          # built-in dermoscopy model, PH2 test
    python benchmarks/uncertainty.py auroc --dataset consep --max-images 60
    python benchmarks/uncertainty.py loop --dataset consep --corrected 2 --regions 4

Prints markdown tables for docs/results.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

DATA = Path(os.environ.get("NAPARI_SGDC_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
MODELS = {"ph2": "dermoscopy", "isic2018": "dermoscopy", "consep": "nuclei", "monuseg": "nuclei"}
LAYOUT = {"isic2018": "ph2"}  # ISIC 2018 has PH2's layout (images/, masks/, splits.json)


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve of `scores` for the binary labels `positives` (ties count half)."""
    from scipy.stats import rankdata

    scores, positives = np.asarray(scores, np.float64).ravel(), np.asarray(positives, bool).ravel()
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _entropy(probability: np.ndarray) -> np.ndarray:
    p = np.clip(probability, 1e-6, 1 - 1e-6)
    return -(p * np.log2(p) + (1 - p) * np.log2(1 - p))


def run_auroc(args) -> int:
    from napari_sgdc.data.datasets import load_samples
    from napari_sgdc.inference import segment
    from napari_sgdc.checkpoints import load_model

    model = load_model(args.model or MODELS[args.dataset], device="cpu")
    samples = load_samples(DATA / args.dataset, LAYOUT.get(args.dataset, args.dataset), split=args.split,
                           max_images=args.max_images)
    signals: dict[str, list[np.ndarray]] = {"entropy": [], "tta": [], "tta-entropy": []}
    wrong: list[np.ndarray] = []
    seconds = {"one pass": 0.0, "tta": 0.0}
    for sample in samples:
        started = time.perf_counter()
        plain = segment(model, sample.image, uncertainty="entropy")
        seconds["one pass"] += time.perf_counter() - started
        started = time.perf_counter()
        augmented = segment(model, sample.image, uncertainty="tta")
        seconds["tta"] += time.perf_counter() - started
        wrong.append((plain.mask != (sample.mask > 0)).ravel())
        signals["entropy"].append(plain.uncertainty.ravel())
        signals["tta"].append(augmented.uncertainty.ravel())
        signals["tta-entropy"].append(_entropy(augmented.probability).ravel())
    errors = np.concatenate(wrong)
    print(f"Uncertainty vs error, {args.model or MODELS[args.dataset]} on {args.dataset}/{args.split}, "
          f"{len(samples)} images, {errors.size / 1e6:.2f} Mpx, {errors.mean() * 100:.2f} % wrong pixels "
          f"(load {os.getloadavg()[0]:.1f})\n")
    print("| signal | AUROC (pixels, pooled) | mean per-image AUROC | forward passes | segment time per image (s) |")
    print("|---|---:|---:|---:|---:|")
    for name, values in signals.items():
        per_image = [auroc(v, w) for v, w in zip(values, wrong)]
        cost = "1" if name == "entropy" else "8"
        time_per_image = seconds["one pass" if name == "entropy" else "tta"] / len(samples)
        print(f"| {name} | {auroc(np.concatenate(values), errors):.3f} | {np.nanmean(per_image):.3f} | {cost} "
              f"| {time_per_image:.2f} |")
    return 0


def _corrected_labels(prediction: np.ndarray, reference: np.ndarray, regions, instance: bool) -> np.ndarray:
    """The prediction with the reference pasted into `regions` (what a perfect user would paint)."""
    labels = prediction.astype(np.int32).copy()
    for region in regions:
        window = region.slices
        if instance:
            patch = reference[window].astype(np.int32)
            labels[window] = np.where(patch > 0, patch + labels.max() + 1, 0)
        else:
            labels[window] = reference[window] > 0
    return labels


def _scores(model, samples, instance: bool) -> dict[str, float]:
    from napari_sgdc import metrics
    from napari_sgdc.inference import segment

    rows = []
    for sample in samples:
        result = segment(model, sample.image)
        row = {"dice": metrics.dice(result.mask, sample.mask > 0), "iou": metrics.iou(result.mask, sample.mask > 0)}
        if instance:
            row["aji"] = metrics.aji(result.labels, sample.mask)
        rows.append(row)
    return {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}


def run_loop(args) -> int:
    import torch

    from napari_sgdc.data.datasets import load_samples
    from napari_sgdc.inference import segment
    from napari_sgdc.checkpoints import load_model
    from napari_sgdc.regions import rank_regions
    from napari_sgdc.train import finetune
    from napari_sgdc.train.corrections import edited_pixels

    name = args.model or MODELS[args.dataset]
    base = load_model(name, device="cpu")
    instance = base.config.is_instance
    samples = load_samples(DATA / args.dataset, LAYOUT.get(args.dataset, args.dataset), split=args.split,
                           max_images=args.max_images)
    corrected, others = samples[: args.corrected], samples[args.corrected:]
    before = _scores(base, others, instance)
    rows = []
    for strategy in ("uncertain", "random"):
        for seed in range(args.seeds):
            model = load_model(name, device="cpu")
            rng = np.random.default_rng(seed)
            images, labels, predictions, area, edited = [], [], [], 0, 0
            for sample in corrected:
                result = segment(model, sample.image, uncertainty=True)
                prediction = result.labels if instance else result.mask
                ranked = rank_regions(result.uncertainty, args.region)
                chosen = ranked[: args.regions] if strategy == "uncertain" else \
                    [ranked[i] for i in rng.choice(len(ranked), size=min(args.regions, len(ranked)), replace=False)]
                area += sum((r.bottom - r.top) * (r.right - r.left) for r in chosen)
                corrected_labels = _corrected_labels(prediction, sample.mask, chosen, instance)
                changed = edited_pixels(corrected_labels, prediction, instance=instance)
                edited += int(changed.sum())
                if changed.any():  # a user leaves an image alone where the regions held no mistake
                    images.append(sample.image)
                    labels.append(corrected_labels)
                    predictions.append(prediction)
            torch.manual_seed(seed)
            started = time.perf_counter()
            if images:
                finetune(model, images, labels, args.preset, predictions=predictions)
            seconds = time.perf_counter() - started
            rows.append({"strategy": strategy, "seed": seed, "area": area, "edited": edited, "seconds": seconds,
                         **_scores(model, others, instance)})
    keys = ["dice", "iou"] + (["aji"] if instance else [])
    print(f"Correct K={args.regions} regions of {args.region} px on each of {len(corrected)} {args.dataset}/{args.split} "
          f"images, fine-tune ({args.preset}), score the other {len(others)} images; model {name}; "
          f"{args.seeds} seed(s); load {os.getloadavg()[0]:.1f}\n")
    print("| regions | region px | pixels the correction changed | " + " | ".join(keys) + " | fine-tune (s) |")
    print("|---|---:|---:|" + "---:|" * len(keys) + "---:|")
    print("| none (base model) | 0 | 0 | " + " | ".join(f"{before[k]:.4f}" for k in keys) + " | |")
    for strategy in ("uncertain", "random"):
        chosen = [row for row in rows if row["strategy"] == strategy]
        means = {k: np.mean([row[k] for row in chosen]) for k in keys}
        stds = {k: np.std([row[k] for row in chosen]) for k in keys}
        print(f"| {strategy} | {np.mean([r['area'] for r in chosen]):.0f} | {np.mean([r['edited'] for r in chosen]):.0f} | "
              + " | ".join(f"{means[k]:.4f} ± {stds[k]:.4f}" for k in keys)
              + f" | {np.mean([r['seconds'] for r in chosen]):.1f} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("auroc", "loop"))
    parser.add_argument("--dataset", default="ph2", choices=sorted(MODELS))
    parser.add_argument("--split", default="test")
    parser.add_argument("--model", help="built-in name or checkpoint (default: the dataset's built-in model)")
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--corrected", type=int, default=2, help="loop: images the user corrects")
    parser.add_argument("--regions", type=int, default=4, help="loop: regions corrected per image (K)")
    parser.add_argument("--region", type=int, default=64, help="loop: region size in pixels")
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--seeds", type=int, default=3, help="loop: seeds of the random choice and fine-tune")
    args = parser.parse_args(argv)
    from napari_sgdc.device import cpu_description

    print(f"# CPU: {cpu_description()}", flush=True)
    import torch

    torch.set_num_threads(args.threads)
    return run_auroc(args) if args.part == "auroc" else run_loop(args)


if __name__ == "__main__":
    sys.exit(main())
