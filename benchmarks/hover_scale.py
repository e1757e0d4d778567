"""Calibrates the HoVer separation map (`postprocess.HOVER_GRADIENT_SCALE`) on validation images.

A HoVer model's separation map is clip(max(−∂x/∂x, −∂y/∂y) / scale, 0, 1): the scale
says how steep a fall of the x/y offset maps counts as a full border, and the marker level
(`PostprocessOptions.boundary_threshold`) then picks the seeds. This script runs a
trained HoVer checkpoint once over the validation images (CoNSeP parents 19-20 by
default, the set training selects checkpoints on) and prints the mean AJI for every
(scale, level) pair, so the scale can be set where the best level sits inside the grid,
not at its edge. No test image is used.

    python benchmarks/hover_scale.py runs/ablation/nuclei/sgdc-hover-s0/model.safetensors
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from napari_sgdc import metrics
from napari_sgdc.data import SegmentationDataset, load_samples
from napari_sgdc.device import eval_mode, forward
from napari_sgdc.inference import head_maps
from napari_sgdc.checkpoints import load_model
from napari_sgdc.postprocess import PostprocessOptions, postprocess, separation_map

ROOT = Path(__file__).resolve().parents[1]
SCALES = (0.01, 0.015, 0.02, 0.03, 0.045, 0.06, 0.09)
LEVELS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a HoVer model (ModelConfig.instance_map == 'hover')")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "consep")
    parser.add_argument("--layout", default="consep")
    parser.add_argument("--split", default="val")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from napari_sgdc.device import cpu_description

    print(f"# CPU: {cpu_description()}", flush=True)
    torch.set_num_threads(args.threads)

    model = load_model(args.checkpoint, device="cpu")
    if model.config.instance_map != "hover":
        raise SystemExit(f"{args.checkpoint} is not a HoVer model (instance_map {model.config.instance_map!r})")
    samples = load_samples(args.data, args.layout, args.split, task="instance")
    data = SegmentationDataset(samples, crop_size=None, augment=False, task="instance", instance_map="hover")
    aji = np.zeros((len(data), len(SCALES), len(LEVELS)))  # (images, scales, levels)
    with torch.no_grad(), eval_mode(model):
        for index in range(len(data)):
            item = data[index]
            outputs = forward(model, item["image"][None], "cpu")  # (1, 3, H, W) in, as segment() runs it
            maps = {name: value.numpy() for name, value in head_maps(outputs).items()}  # (H, W) each
            probability = torch.sigmoid(outputs["mask"][0, 0]).numpy()  # (H, W)
            reference = item["instances"][0].numpy()  # (H, W)
            for i, scale in enumerate(SCALES):
                separation = separation_map(maps, hover_scale=scale)  # (H, W)
                for j, level in enumerate(LEVELS):
                    _, labels = postprocess(probability, separation, PostprocessOptions(boundary_threshold=level),
                                            instances=True)
                    aji[index, i, j] = metrics.aji(labels, reference)
    means = aji.mean(axis=0)  # (scales, levels)
    print(f"{args.checkpoint}: mean AJI over {len(data)} {args.layout} {args.split} images\n")
    print("| scale | " + " | ".join(f"{level:g}" for level in LEVELS) + " |")
    print("|---" * (len(LEVELS) + 1) + "|")
    for i, scale in enumerate(SCALES):
        print(f"| {scale:g} | " + " | ".join(f"{value:.4f}" for value in means[i]) + " |")
    i, j = np.unravel_index(int(np.argmax(means)), means.shape)
    print(f"\nbest: scale {SCALES[i]:g}, level {LEVELS[j]:g}, AJI {means[i, j]:.4f}")


if __name__ == "__main__":
    main()
