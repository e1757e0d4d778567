"""Fine-tune benchmark: correct one 512x512 image, fine-tune with a preset, measure time and IoU.

This is what the GUI's "SGDC Fine-tune" button does (`napari_sgdc.train.finetune` on the
corrected image), measured on the CPU:

1. Start from a model trained on one dataset (default: the built-in ``dermoscopy`` model,
   trained on the PH2 train split).
2. Take one held-out image of the same dataset (PH2 test split by default), resized so its
   short side is 512 and centre-cropped to 512x512. Its ground-truth mask stands in for a
   user's perfect correction.
3. Fine-tune on it with the ``quick`` preset (CPU, ``--threads`` torch threads) and time it.
4. IoU before and after, on the corrected image and on ``--held-out`` other test images
   prepared the same way (does fine-tuning on one image help or hurt its domain?).

Usage::

    python benchmarks/finetune.py                                   # built-in dermoscopy model
    python benchmarks/finetune.py --model runs/ph2/best.safetensors --held-out 20
    python benchmarks/finetune.py --model nuclei --dataset consep    # instance model, CoNSeP test tiles

Prints a markdown table for docs/performance.md; ``--json`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

DATA = Path(os.environ.get("NAPARI_SGDC_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
TARGET_S = 30.0  # issue target: quick fine-tune of one 512^2 image on a 2-core CPU


def prepare(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Resizes so the short side is `size` (images larger than that), then centre-crops size x size."""
    from skimage.transform import resize

    height, width = mask.shape
    scale = size / min(height, width)
    if scale < 1.0:
        new_shape = (max(size, round(height * scale)), max(size, round(width * scale)))
        image = (resize(image, (*new_shape, 3), order=1, anti_aliasing=True, preserve_range=True)
                 .round().astype(np.uint8))
        mask = resize(mask, new_shape, order=0, preserve_range=True, anti_aliasing=False).astype(mask.dtype)
    height, width = mask.shape
    y0, x0 = max(0, (height - size) // 2), max(0, (width - size) // 2)
    return image[y0:y0 + size, x0:x0 + size], mask[y0:y0 + size, x0:x0 + size]


def iou_per_image(model, samples) -> list[float]:
    """IoU of the model's mask on each (image, mask) pair."""
    from napari_sgdc.inference import segment
    from napari_sgdc.metrics import iou

    return [iou(segment(model, image, device="cpu").mask, mask > 0) for image, mask in samples]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dermoscopy", help="built-in model name or checkpoint path")
    parser.add_argument("--dataset", default="ph2", choices=["ph2", "consep", "monuseg"])
    parser.add_argument("--split", default="test", help="split the corrected and held-out images come from")
    parser.add_argument("--corrected", default=None, help="name of the corrected image (default: the first)")
    parser.add_argument("--held-out", type=int, default=10, help="other images of the split to evaluate")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    import torch

    from napari_sgdc.data.datasets import load_samples
    from napari_sgdc.io import load_model
    from napari_sgdc.train import finetune

    torch.set_num_threads(args.threads)
    try:
        model = load_model(args.model, device="cpu")
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    samples = load_samples(DATA / args.dataset, args.dataset, split=args.split)  # masks or instance ids
    if not samples:
        print(f"error: no {args.split} images in {DATA / args.dataset}", file=sys.stderr)
        return 2
    names = [sample.name for sample in samples]
    corrected_index = names.index(args.corrected) if args.corrected else 0
    corrected = samples[corrected_index]
    others = [s for i, s in enumerate(samples) if i != corrected_index][: args.held_out]
    corrected_pair = prepare(corrected.image, corrected.mask, args.size)
    other_pairs = [prepare(s.image, s.mask, args.size) for s in others]

    iou_before = iou_per_image(model, [corrected_pair])[0]
    held_before = iou_per_image(model, other_pairs)

    started = time.perf_counter()
    history = finetune(model, [corrected_pair[0]], [corrected_pair[1]], preset=args.preset)
    seconds = time.perf_counter() - started

    iou_after = iou_per_image(model, [corrected_pair])[0]
    held_after = iou_per_image(model, other_pairs)

    result = {
        "model": args.model,
        "dataset": args.dataset,
        "corrected_image": corrected.name,
        "held_out_images": [s.name for s in others],
        "size": args.size,
        "preset": args.preset,
        "steps": history.steps,
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "finetune_wall_s": round(seconds, 2),
        "target_s": TARGET_S,
        "loss_first": round(history.losses[0], 4) if history.losses else None,
        "loss_last": round(history.losses[-1], 4) if history.losses else None,
        "iou_corrected_before": round(iou_before, 4),
        "iou_corrected_after": round(iou_after, 4),
        "iou_held_out_before": round(float(np.mean(held_before)), 4) if held_before else None,
        "iou_held_out_after": round(float(np.mean(held_after)), 4) if held_after else None,
    }
    print(f"Fine-tune benchmark: {args.model} on {args.dataset}/{args.split} {corrected.name} "
          f"({args.size}x{args.size}), preset {args.preset}, {history.steps} steps, CPU {args.threads} threads\n")
    print("| measure | before | after |")
    print("|---|---|---|")
    print(f"| IoU, corrected image | {iou_before:.3f} | {iou_after:.3f} |")
    if held_before:
        print(f"| mean IoU, {len(held_before)} held-out images | {np.mean(held_before):.3f} | {np.mean(held_after):.3f} |")
    print(f"| fine-tune wall time | | {seconds:.1f} s (target <= {TARGET_S:.0f} s) |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
