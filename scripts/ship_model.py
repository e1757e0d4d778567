"""Ships a trained checkpoint as a built-in model.

Writes ``src/napari_sgdc/weights/<name>.safetensors`` (float16 storage, the run's metadata
plus the measured metrics and provenance given here) and regenerates the reference
outputs of the shipped sample that `tests/test_builtin_models.py` compares against
(``tests/data/<name>_sample_mask.png``, for instance models ``_labels.png``, and for models with
nucleus types ``_classes.png``, the type map).

    python scripts/ship_model.py --checkpoint runs/dermoscopy/model.safetensors --name dermoscopy \
        --metrics runs/dermoscopy/metrics.json --wall-time 2600

`--metrics` is a JSON object of measured metrics (each entry should name the command that
measured it); it replaces the metrics stored by training.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from skimage import io as skio

from napari_sgdc.inference import segment
from napari_sgdc.checkpoints import load_checkpoint, read_metadata, save_checkpoint
from napari_sgdc.samples import read_sample

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="the run's best checkpoint")
    parser.add_argument("--name", required=True, help="built-in name (dermoscopy, nuclei)")
    parser.add_argument("--metrics", type=Path, required=True, help="JSON file of measured metrics")
    parser.add_argument("--wall-time", type=float, help="training wall time in seconds")
    parser.add_argument("--hardware", default="2-core x86_64 CPU, torch 2.13.0 CPU build, 2 threads")
    args = parser.parse_args()

    model, _ = load_checkpoint(args.checkpoint, device="cpu")
    metadata = read_metadata(args.checkpoint)
    provenance = dict(metadata.get("provenance") or {})
    provenance.update(source_checkpoint=str(args.checkpoint), storage="float16", hardware=args.hardware)
    if args.wall_time is not None:
        provenance["wall_time_s"] = args.wall_time
    target = ROOT / "src" / "napari_sgdc" / "weights" / f"{args.name}.safetensors"
    save_checkpoint(target, model, train_config=metadata.get("train_config"),
                    metrics=json.loads(args.metrics.read_text()), provenance=provenance, dtype=torch.float16)
    print(f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB)")

    shipped, _ = load_checkpoint(target, device="cpu")  # the float16 weights, as users get them
    result = segment(shipped, read_sample(args.name))
    references = ROOT / "tests" / "data"
    skio.imsave(references / f"{args.name}_sample_mask.png", (result.mask * 255).astype(np.uint8),
                check_contrast=False)
    labels = references / f"{args.name}_sample_labels.png"
    if result.labels is not None:
        skio.imsave(labels, result.labels.astype(np.uint16), check_contrast=False)
    elif labels.exists():
        labels.unlink()
    classes = references / f"{args.name}_sample_classes.png"
    if result.type_map is not None:
        skio.imsave(classes, result.type_map, check_contrast=False)
    elif classes.exists():
        classes.unlink()
    print(f"wrote the reference outputs of the {args.name} sample to {references}")


if __name__ == "__main__":
    main()
