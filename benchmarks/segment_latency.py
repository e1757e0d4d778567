"""End-to-end latency of `napari_sgdc.segment` at 512x512 (prints a markdown table).

Measures the median wall time of ``segment(model, image)`` on a random uint8 RGB image
(input conversion, padding, forward pass, sigmoid, blending and thresholding included)
for each encoder's SGDC model, on the CPU with a fixed number of threads and, when
present, on CUDA. The forward pass alone is timed too, to show the overhead of the
rest of the pipeline. Weights are random (speed does not depend on them).

Usage::

    python benchmarks/segment_latency.py                       # lite0 + resnet50, CPU (2 threads) [+ CUDA]
    python benchmarks/segment_latency.py --encoders mini --runs 3 --devices cpu   # quick check
    python benchmarks/segment_latency.py --encoders efficientnet_lite0 --instance-map hover   # a random instance model
    python benchmarks/segment_latency.py --checkpoint nuclei --sample nuclei   # a built-in model on its sample's 512² crop

With ``--checkpoint`` (a built-in name or a path) the trained weights are timed on a real
image (``--sample``: the 512² top-left crop of a shipped sample), so the post-processing
(watershed of real nuclei) costs what it costs for users; random weights on random input
make an unrepresentative instance split.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch

from napari_sgdc.config import ModelConfig
from napari_sgdc.device import forward
from napari_sgdc.inference import segment
from napari_sgdc.checkpoints import load_model
from napari_sgdc.model import build_model, tiny_config
from napari_sgdc.samples import read_sample

TARGET_S = {"efficientnet_lite0": 0.25, "nuclei": 0.3}  # issue targets on a 2-core CPU at 512^2


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


def measure(encoder: str, device: torch.device, size: int, runs: int, warmup: int, instance_map: str | None = None,
            checkpoint: str | None = None, sample: str | None = None) -> dict:
    """Median/min/max latency of segment() and of the bare forward pass for one model."""
    if checkpoint:
        model = load_model(checkpoint, device=device)
    else:
        extra = {"task": "instance", "instance_map": instance_map} if instance_map else {}
        config = tiny_config(**extra) if encoder == "mini" else ModelConfig(encoder=encoder, pretrained=False, **extra)
        model = build_model(config).to(device).eval()
    if sample:
        image = np.ascontiguousarray(read_sample(sample)[:size, :size])  # (size, size, 3) real content
    else:
        image = np.random.default_rng(0).integers(0, 256, size=(size, size, 3), dtype=np.uint8)  # (H, W, 3)
    batch = torch.rand(1, 3, size, size, device=device)  # (1, 3, H, W)

    def run_segment():
        segment(model, image, tile=size)

    def run_forward():
        with torch.inference_mode():
            forward(model, batch, device)  # as segment() runs it

    segment_times = _time(run_segment, runs, warmup, device)
    forward_times = _time(run_forward, runs, warmup, device)
    return {
        "encoder": checkpoint or encoder + (f", instance map {instance_map}" if instance_map else ""),
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
    parser.add_argument("--instance-map", choices=["boundary", "distance", "hover"],
                        help="time instance models with this instance map (random weights)")
    parser.add_argument("--checkpoint", help="time this trained model (built-in name or path) instead")
    parser.add_argument("--sample", help="segment the 512² crop of this shipped sample (dermoscopy, nuclei)")
    parser.add_argument("--devices", nargs="+", default=None,
                        help="devices to time (default: cpu, plus cuda when available)")
    args = parser.parse_args(argv)
    from napari_sgdc.device import cpu_description

    print(f"# CPU: {cpu_description()}", flush=True)
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
        for encoder in ([args.checkpoint] if args.checkpoint else args.encoders):
            row = measure(encoder, device, args.size, args.runs, args.warmup, args.instance_map,
                          args.checkpoint, args.sample)
            target = TARGET_S.get(row["encoder"] if args.checkpoint else encoder) \
                if device.type == "cpu" and args.size == 512 else None
            verdict = "–" if target is None else (f"≤ {target} s: {'met' if row['median'] <= target else 'missed'}")
            print(f"| SGDC {row['encoder']} | {label} | {row['parameters_m']:.2f} | {row['median']:.3f} | {row['min']:.3f} "
                  f"| {row['max']:.3f} | {row['forward_median']:.3f} | {verdict} |", flush=True)


if __name__ == "__main__":
    main()
