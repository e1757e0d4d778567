"""End-to-end latency of `napari_sgdc.segment` at 512x512 (prints a markdown table).

Measures the median wall time of ``segment(model, image)`` on a random uint8 RGB image
(input conversion, padding, forward pass, sigmoid, blending and thresholding included)
for each encoder's SGDC model, on the CPU with a fixed number of threads and, when
present, on CUDA. The forward pass alone is timed too, to show the overhead of the
rest of the pipeline. Weights are random (speed does not depend on them).

Usage::

    python benchmarks/segment_latency.py                       # lite0 + resnet50, CPU (2 threads) [+ CUDA]
    python benchmarks/segment_latency.py --encoders mini --runs 3 --devices cpu   # quick check
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch

from napari_sgdc.config import ModelConfig
from napari_sgdc.inference import segment
from napari_sgdc.model import build_model, tiny_config

TARGET_S = {"efficientnet_lite0": 0.25}  # issue target on a 2-core CPU at 512^2


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(function, runs: int, warmup: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        function()
    _sync(device)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        function()
        _sync(device)
        times.append(time.perf_counter() - started)
    return times


def measure(encoder: str, device: torch.device, size: int, runs: int, warmup: int) -> dict:
    """Median/min/max latency of segment() and of the bare forward pass for one model."""
    config = tiny_config() if encoder == "mini" else ModelConfig(encoder=encoder, pretrained=False)
    model = build_model(config).to(device).eval()
    image = np.random.default_rng(0).integers(0, 256, size=(size, size, 3), dtype=np.uint8)  # (H, W, 3)
    batch = torch.rand(1, 3, size, size, device=device)  # (1, 3, H, W)
    if device.type in ("cpu", "cuda"):
        batch = batch.contiguous(memory_format=torch.channels_last)  # as segment() feeds the model

    def run_segment():
        segment(model, image, tile=size)

    def run_forward():
        with torch.inference_mode():
            model(batch)

    segment_times = _time(run_segment, runs, warmup, device)
    forward_times = _time(run_forward, runs, warmup, device)
    return {
        "encoder": encoder,
        "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "median": statistics.median(segment_times),
        "min": min(segment_times),
        "max": max(segment_times),
        "forward_median": statistics.median(forward_times),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoders", nargs="+", default=["efficientnet_lite0", "resnet50"])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--devices", nargs="+", default=None,
                        help="devices to time (default: cpu, plus cuda when available)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])

    print(f"`segment()` latency at {args.size}x{args.size}, median of {args.runs} runs after {args.warmup} warm-up; "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} CPU threads.\n")
    print("| model | device | params (M) | segment median (s) | min (s) | max (s) | forward only (s) | target |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for device_name in devices:
        device = torch.device(device_name)
        label = device_name if device.type != "cuda" else f"cuda ({torch.cuda.get_device_name(device)})"
        if device.type == "cpu":
            label = f"cpu, {args.threads} threads"
        for encoder in args.encoders:
            row = measure(encoder, device, args.size, args.runs, args.warmup)
            target = TARGET_S.get(encoder) if device.type == "cpu" and args.size == 512 else None
            verdict = "–" if target is None else (f"≤ {target} s: {'met' if row['median'] <= target else 'missed'}")
            print(f"| SGDC {encoder} | {label} | {row['parameters_m']:.2f} | {row['median']:.3f} | {row['min']:.3f} "
                  f"| {row['max']:.3f} | {row['forward_median']:.3f} | {verdict} |", flush=True)


if __name__ == "__main__":
    main()
