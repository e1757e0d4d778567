"""Tiled inference on large synthetic RGB images: throughput, peak RSS, linear scaling.

Each image size runs in a fresh subprocess so that its peak resident memory (Linux
``VmHWM``) is its own. "Input" is the resident memory just before `segment()` is
called (interpreter, torch, model and the uint8 image); the table reports the peak
during `segment()` above it. The time ratio of the smallest to the largest size is
compared with the ratio of their pixel counts (1/4 for 4096² vs 8192²), which is what
linear cost predicts.

Usage::

    python benchmarks/tiled_inference.py                                  # 4096² and 8192², lite0, 2 threads
    python benchmarks/tiled_inference.py --sizes 512 1024 --encoder mini  # quick check
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

GIB = 1024 ** 3
TARGET_EXTRA_GB = 3.0


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as stream:
        for line in stream:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(args) -> None:
    """Runs one size and prints a JSON line with its measurements."""
    import numpy as np
    import torch

    from napari_sgdc.config import ModelConfig
    from napari_sgdc.inference import segment
    from napari_sgdc.model import build_model, tiny_config

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = tiny_config() if args.encoder == "mini" else ModelConfig(encoder=args.encoder, pretrained=False)
    model = build_model(config).to(device).eval()
    # warm-up on one tile so that one-time allocations are not counted as per-size cost
    segment(model, np.zeros((args.tile, args.tile, 3), np.uint8), tile=args.tile)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(args.worker, args.worker, 3), dtype=np.uint8)  # (H, W, 3)
    rss_before = _status_bytes("VmRSS")
    tiles = []
    started = time.perf_counter()
    result = segment(model, image, tile=args.tile, overlap=args.overlap,
                     progress=lambda done, total: tiles.append(total))
    elapsed = time.perf_counter() - started
    peak = _status_bytes("VmHWM")
    print(json.dumps({
        "size": args.worker, "seconds": elapsed, "tiles": tiles[-1] if tiles else 0,
        "rss_before": rss_before, "peak": peak, "input_bytes": image.nbytes,
        "foreground": float(result.mask.mean()),
    }))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[4096, 8192])
    parser.add_argument("--encoder", default="efficientnet_lite0")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from napari_sgdc.device import cpu_description

    print(f"# CPU: {cpu_description()}", flush=True)
    if args.worker:
        worker(args)
        return

    rows = []
    for size in args.sizes:
        command = [sys.executable, __file__, "--worker", str(size), "--encoder", args.encoder, "--tile",
                   str(args.tile), "--overlap", str(args.overlap), "--threads", str(args.threads),
                   "--device", args.device]
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
        if completed.returncode != 0:
            raise SystemExit(f"size {size} failed:\n{completed.stderr}")
        rows.append(json.loads(completed.stdout.strip().splitlines()[-1]))

    print(f"Tiled `segment()` on synthetic uint8 RGB images: SGDC {args.encoder}, tile {args.tile}, "
          f"overlap {args.overlap}, device {args.device}, {args.threads} CPU threads.\n")
    print("| image | tiles | time (s) | throughput (Mpx/s) | input (GB) | RSS before (GB) | peak RSS (GB) "
          "| peak above input (GB) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        megapixels = row["size"] ** 2 / 1e6
        extra = (row["peak"] - row["rss_before"]) / GIB
        print(f"| {row['size']}² | {row['tiles']} | {row['seconds']:.1f} | {megapixels / row['seconds']:.2f} "
              f"| {row['input_bytes'] / GIB:.2f} | {row['rss_before'] / GIB:.2f} | {row['peak'] / GIB:.2f} "
              f"| {extra:.2f} |")
    if len(rows) >= 2:
        small, large = rows[0], rows[-1]
        time_ratio = small["seconds"] / large["seconds"]
        pixel_ratio = small["size"] ** 2 / large["size"] ** 2
        print(f"\nTime ratio {small['size']}² / {large['size']}²: {time_ratio:.3f} "
              f"(pixel ratio {pixel_ratio:.3f}; linear cost predicts equal ratios).")
    largest = rows[-1]
    extra = (largest["peak"] - largest["rss_before"]) / GIB
    print(f"Peak RSS above input at {largest['size']}²: {extra:.2f} GB "
          f"(target ≤ {TARGET_EXTRA_GB:.0f} GB: {'met' if extra <= TARGET_EXTRA_GB else 'missed'}).")


if __name__ == "__main__":
    main()
