"""Training speed (and, optionally, accuracy) in float32 against bf16 autocast on this CPU.

Times optimiser steps of `fit` (data loading included, as a real run does it) on CoNSeP
crops with the recipe of `configs/nuclei.yaml` (batch 8, 256², stain jitter, the type
head), first in float32, then under bf16 autocast (`TrainConfig.amp`). Prints the CPU model
and its vector flags: bf16 autocast only speeds up CPUs with AVX512-BF16 or AMX; elsewhere
it runs float32 (`napari_sgdc.device.bf16_supported`).

With ``--accuracy-steps N`` each precision also continues training the starting model for N
steps from the same state and seed, and the two results are validated on CoNSeP val parents
19-20 (AJI, Dice, type accuracy): the accuracy cost of training in bf16 over a short run.

Usage::

    python benchmarks/train_step.py                           # 3 warm-up + 12 timed steps each
    python benchmarks/train_step.py --steps 4 --warmup 1       # quick
    python benchmarks/train_step.py --accuracy-steps 200       # + paired 200-step runs, validated
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from napari_sgdc.checkpoints import load_model
from napari_sgdc.config import TrainConfig
from napari_sgdc.data import load_samples
from napari_sgdc.data.datasets import SegmentationDataset, validation_dataset
from napari_sgdc.device import bf16_supported
from napari_sgdc.engines import cpu_key
from napari_sgdc.train import fit, validate
from napari_sgdc.train.recipe import load_config_sections


def _config(amp: bool, steps: int) -> TrainConfig:
    _, values = load_config_sections("configs/nuclei.yaml")
    values = {key: value for key, value in values.items() if key != "init"}
    return dataclasses.replace(TrainConfig.from_dict(values), amp=amp, epochs=1, steps_per_epoch=steps,
                               max_steps=steps, val_every=0, warmup_steps=min(10, steps))


def time_steps(model_source: str, data, amp: bool, warmup: int, steps: int) -> list[float]:
    """Seconds of each timed step (after `warmup` steps) for a fresh copy of the model."""
    model = load_model(model_source, device="cpu")
    stamps = []
    fit(model, data, None, _config(amp, warmup + steps),
        callbacks=[lambda event: stamps.append(time.perf_counter()) if event["kind"] == "step" else None])
    return [b - a for a, b in zip(stamps[warmup - 1:], stamps[warmup:])]  # a step ends at its stamp


def accuracy_after(model_source: str, data, val, amp: bool, steps: int) -> dict[str, float]:
    model = load_model(model_source, device="cpu")
    fit(model, data, None, _config(amp, steps))
    scores = validate(model, val)
    return {key: scores[key] for key in ("aji", "dice", "type_accuracy") if key in scores}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="nuclei", help="the model to train on (default: the built-in nuclei)")
    parser.add_argument("--data", default="../shared/data/consep", help="CoNSeP folder")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--accuracy-steps", type=int, default=0, help="also run paired runs of N steps and validate")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1")
    torch.set_num_threads(args.threads)
    model = load_model(args.model, device="cpu")
    print(f"CPU: {cpu_key()}; torch {torch.__version__}, {args.threads} threads; "
          f"bf16 native: {bf16_supported(torch.device('cpu'))}")
    samples = load_samples(args.data, "consep", "train")
    data = SegmentationDataset(samples, crop_size=256, stain_jitter=True, instance_map=model.config.instance_map,
                               types=model.config.has_types)
    print("| precision | s/step (median) | min | max | steps |")
    print("|---|---|---|---|---|")
    medians = {}
    for amp in (False, True):
        times = time_steps(args.model, data, amp, args.warmup, args.steps)
        medians[amp] = statistics.median(times)
        print(f"| {'bf16 autocast' if amp else 'float32'} | {medians[amp]:.3f} | {min(times):.3f} | "
              f"{max(times):.3f} | {len(times)} |")
    print(f"bf16 speed-up: {medians[False] / medians[True]:.2f}x")
    if args.accuracy_steps:
        val = validation_dataset(load_samples(args.data, "consep", "val"), model.config, boundary_width=2)
        for amp in (False, True):
            scores = accuracy_after(args.model, data, val, amp, args.accuracy_steps)
            print(f"after {args.accuracy_steps} steps in {'bf16' if amp else 'float32'}: "
                  + ", ".join(f"{key} {value:.4f}" for key, value in scores.items()))


if __name__ == "__main__":
    main()
