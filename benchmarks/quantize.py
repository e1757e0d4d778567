"""Int8 post-training quantization: fp32 against int8 on a test split (the `INT8_ALLOWED` decision).

Calibrates `napari_sgdc.engines.quantize_model` (ONNX Runtime static quantization, QDQ format,
per-channel int8 weights, int8 activations) on ``--calibration`` patches of ``--patch`` pixels cut
at random from the training split, at the model's working scale (what the network sees), then
scores the test split with `napari_sgdc.evaluation.evaluate` twice: eager torch fp32 (the
reference) and the int8 graph. Prints the main score of each (AJI for instance models such as
nuclei on CoNSeP, IoU for dermoscopy on PH²), their difference in points, and the line to add to
`napari_sgdc.engines.INT8_ALLOWED` when the loss is at most 0.5 points.

    python benchmarks/quantize.py --model nuclei                   # CoNSeP test, layout consep
    python benchmarks/quantize.py --model dermoscopy               # PH² test, layout ph2
    python benchmarks/quantize.py --model nuclei --max-images 2 --calibration 4   # a quick check
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from napari_sgdc import engines
from napari_sgdc.checkpoints import load_model
from napari_sgdc.data import load_samples
from napari_sgdc.data.transforms import to_float_rgb
from napari_sgdc.evaluation import evaluate, layout_items, summarize
from napari_sgdc.grid import resample_image, working_shape

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
DEFAULTS = {"nuclei": ("consep", DATA / "consep"), "dermoscopy": ("ph2", DATA / "ph2")}
ALLOWED_LOSS = 0.5  # points of the main score


def calibration_patches(model, data: Path, layout: str, count: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """`count` random (h, w, 3) float32 patches of the training split at the model's working scale,
    h and w = `size` or the image's side, rounded down to a multiple of 32."""
    samples = load_samples(data, layout, "train")
    if not samples:
        raise ValueError(f"no training images in {data} (layout {layout})")
    rng = np.random.default_rng(seed)
    patches = []
    for index in range(count):
        sample = samples[int(rng.integers(len(samples)))] if index >= len(samples) else samples[index]
        rgb = to_float_rgb(sample.image)
        working = working_shape(*rgb.shape[:2], model.config, None)
        if tuple(working) != rgb.shape[:2]:
            rgb = resample_image(rgb, working)
        h, w = (min(size, side) // 32 * 32 for side in rgb.shape[:2])
        y0, x0 = int(rng.integers(rgb.shape[0] - h + 1)), int(rng.integers(rgb.shape[1] - w + 1))
        patches.append(np.ascontiguousarray(rgb[y0:y0 + h, x0:x0 + w], np.float32))
    return patches


def score(model, items, engine, tile: int) -> tuple[dict, float]:
    started = time.perf_counter()
    result = evaluate(model, items, tile=tile, engine=engine, on_error=lambda line: print(f"  failed: {line}"))
    return summarize(result.rows, result.keys), time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="nuclei", help="built-in name or checkpoint path")
    parser.add_argument("--layout", help="dataset layout (default: consep for nuclei, ph2 for dermoscopy)")
    parser.add_argument("--data", type=Path, help="dataset folder (default: ../shared/data/<layout>)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--calibration", type=int, default=64, help="training patches to calibrate on")
    parser.add_argument("--patch", type=int, default=256)
    parser.add_argument("--max-images", type=int, default=0, help="score the first N test images only (0: all)")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--out", type=Path, help="where to keep the int8 graph (default: the engines' cache, "
                                                 "where `--engine onnxruntime-int8` finds it)")
    args = parser.parse_args(argv)
    from napari_sgdc.device import cpu_description

    print(f"# CPU: {cpu_description()}", flush=True)
    layout, data = DEFAULTS.get(args.model, (None, None))
    layout, data = args.layout or layout, args.data or data
    if layout is None or data is None:
        parser.error("give --layout and --data for a model other than nuclei or dermoscopy")
    torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    model = load_model(args.model, device="cpu").eval()
    items = layout_items(data, layout, args.split, args.max_images)
    key = "aji" if model.config.is_instance else "iou"
    print(f"# model {args.model}, {layout} {args.split}: {len(items)} image(s); calibration: {args.calibration} "
          f"patches of ≤ {args.patch}² from train; load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    out = args.out or engines.int8_path(model)  # where the onnxruntime-int8 engine looks for it
    started = time.perf_counter()
    patches = calibration_patches(model, data, layout, args.calibration, args.patch)
    path = engines.quantize_model(model, patches, out)
    print(f"# calibrated and quantized in {time.perf_counter() - started:.1f} s: {path}")
    fp32, fp32_s = score(model, items, "torch", args.tile)
    int8, int8_s = score(model, items, engines.Int8Engine(path), args.tile)
    print(f"| precision | {key.upper()} | time (s) |\n|---|---:|---:|")
    print(f"| fp32 (torch) | {fp32[key][0]:.4f} | {fp32_s:.1f} |\n| int8 (onnxruntime QDQ) | {int8[key][0]:.4f} "
          f"| {int8_s:.1f} |")
    loss = 100 * (fp32[key][0] - int8[key][0])
    print(f"difference: {loss:+.2f} points of {key.upper()} (fp32 − int8; allowed ≤ {ALLOWED_LOSS})")
    if loss <= ALLOWED_LOSS and not args.max_images:
        print(f"allow-list line: INT8_ALLOWED[{args.model!r}] = {engines.weights_sha256(model)!r}")
    elif args.max_images:
        print("a subset (--max-images): not a decision for INT8_ALLOWED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
