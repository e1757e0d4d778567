"""The GPU check (run by benchmarks/gpu_check.sh): CUDA checks, segment latency, tiled and
whole-slide throughput in fp32 and bf16, and a training-throughput run; one table last.

Needs only python3 with torch, numpy, scipy, scikit-image, tifffile and safetensors, plus
``.gpu_wheels/site`` (benchmarks/gpu_prepare.sh) on PYTHONPATH; no pytest, no network.

    PYTHONPATH=src:.gpu_wheels/site python3 benchmarks/gpu_check.py            # on a CUDA machine
    PYTHONPATH=src:.gpu_wheels/site python3 benchmarks/gpu_check.py --cpu      # dry run: CPU, tiny sizes

Without CUDA (or with ``--cpu``) it runs every part on the CPU at tiny sizes (the CUDA checks are
imported but not run), so a dry run proves nothing it imports is missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import statistics
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CONSEP = ROOT / ".." / "shared" / "data" / "consep"
FULL = {"latency": 512, "runs": 20, "tiled": 4096, "tile": 512, "slide": 8192, "train_s": 120.0, "batch": 8}
DRY = {"latency": 64, "runs": 1, "tiled": 256, "tile": 128, "slide": 512, "train_s": 3.0, "batch": 2}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def cuda_checks(run: bool) -> tuple[str, str]:
    """Runs every test function of benchmarks/cuda_checks.py (no pytest needed) when `run`."""
    spec = importlib.util.spec_from_file_location("cuda_checks", ROOT / "benchmarks" / "cuda_checks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tests = [(n, f) for n, f in vars(module).items() if n.startswith("test_") and callable(f)]
    if not run:
        return "CUDA checks", f"imported {len(tests)}, not run (no CUDA)"
    failed = []
    for name, function in tests:
        wants_tmp = "tmp_path" in inspect.signature(function).parameters
        kwargs = {"tmp_path": Path(tempfile.mkdtemp())} if wants_tmp else {}
        try:
            function(**kwargs)
        except Exception:  # noqa: BLE001 - reported, the other checks still run
            failed.append(name)
            traceback.print_exc()
    return "CUDA checks", f"{len(tests) - len(failed)} of {len(tests)} passed" + (f"; failed: {failed}" if failed else "")


def segment_latency(model, device, size: int, runs: int, amp: bool) -> float:
    from napari_sgdc.inference import segment
    from napari_sgdc.samples import read_sample

    image = np.ascontiguousarray(np.resize(read_sample("nuclei"), (size, size, 3)))
    for _ in range(2):
        segment(model, image, tile=size, device=device, amp=amp)
    times = []
    for _ in range(runs):
        sync(device)
        start = time.perf_counter()
        segment(model, image, tile=size, device=device, amp=amp)
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def tiled_throughput(model, device, size: int, tile: int, amp: bool) -> float:
    """Mpx/s of `segment` on a size² image of tiled H&E texture."""
    from napari_sgdc.inference import segment
    from napari_sgdc.samples import read_sample

    sample = read_sample("nuclei")
    reps = (size // sample.shape[0] + 1, size // sample.shape[1] + 1, 1)
    image = np.ascontiguousarray(np.tile(sample, reps)[:size, :size])
    sync(device)
    start = time.perf_counter()
    segment(model, image, tile=tile, device=device, amp=amp)
    sync(device)
    return size * size / 1e6 / (time.perf_counter() - start)


def synthetic_slide(folder: Path, size: int) -> Path:
    """A pyramidal OME-TIFF (0.25 µm/px, 256² zlib tiles) of H&E sample texture, written with tifffile."""
    import tifffile

    from napari_sgdc.samples import read_sample

    sample = read_sample("nuclei")
    image = np.tile(sample, (size // sample.shape[0] + 1, size // sample.shape[1] + 1, 1))[:size, :size]
    path = folder / f"synthetic_{size}.ome.tif"
    levels = max(1, int(np.log2(size / 512)) + 1)
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        options = dict(tile=(256, 256), compression="zlib", photometric="rgb")
        tif.write(image, subifds=levels - 1, resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER",
                  metadata={"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25}, **options)
        for level in range(1, levels):
            tif.write(image[:: 2 ** level, :: 2 ** level], subfiletype=1, **options)
    return path


def slide_throughput(model, slide: Path, folder: Path, amp: bool, tile: int) -> tuple[float, int]:
    """(Mpx/s of `segment_slide` over the whole slide, objects found)."""
    from napari_sgdc.wholeslide import segment_slide

    out = folder / f"run_{'bf16' if amp else 'fp32'}.ome.zarr"
    start = time.perf_counter()
    result = segment_slide(model, slide, out, tissue="none", amp=amp, tile=tile, margin=min(64, tile // 2))
    seconds = time.perf_counter() - start
    height, width = result.shape
    return height * width / 1e6 / seconds, int(result.n_objects)


def training_throughput(device, seconds: float, batch: int, amp: bool) -> tuple[float, str]:
    """Optimiser steps per second of `fit` on CoNSeP train crops (synthetic when CoNSeP is absent)."""
    from napari_sgdc.config import ModelConfig, TrainConfig
    from napari_sgdc.data import SegmentationDataset, load_samples
    from napari_sgdc.data.datasets import Sample
    from napari_sgdc.model import build_model
    from napari_sgdc.train.fit import fit

    if CONSEP.exists():
        samples, source = load_samples(CONSEP, "consep", "train", max_images=8), "CoNSeP train crops"
    else:
        rng = np.random.default_rng(0)
        samples = [Sample(f"s{i}", rng.integers(0, 256, (512, 512, 3), dtype=np.uint8),
                          (rng.random((512, 512)) > 0.7).astype(np.int32)) for i in range(4)]
        source = "synthetic crops"
    model = build_model(ModelConfig(task="instance", instance_map="hover", pretrained=False))
    crop = 256 if device.type == "cuda" else 64
    data = SegmentationDataset(samples, crop_size=crop, task="instance", instance_map="hover")
    cfg = TrainConfig(epochs=1000, batch_size=batch, crop_size=crop, val_every=0, amp=amp, device=str(device))
    cancel, steps, started = threading.Event(), [0], [0.0]

    def on_event(event: dict) -> None:
        if event.get("kind") == "step":
            steps[0] += 1
            if steps[0] == 2:
                started[0] = time.perf_counter()  # the first steps build the optimiser and warm up
            if started[0] and time.perf_counter() - started[0] > seconds:
                cancel.set()

    fit(model, data, None, cfg, callbacks=[on_event], cancel=cancel, device=device)
    elapsed = time.perf_counter() - started[0] if started[0] else float("nan")
    return (steps[0] - 2) / elapsed, f"{source}, batch {batch}, {crop}², {elapsed:.0f} s"


def log(row: tuple[str, str]) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {row[0]}: {row[1]}", flush=True)


def run(args) -> list[tuple[str, str]]:
    from napari_sgdc.checkpoints import load_model

    use_cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if use_cuda else "cpu")
    sizes = FULL if use_cuda else DRY
    rows = [("device", torch.cuda.get_device_name(0) if use_cuda else f"CPU ({os.cpu_count()} cores), dry run"),
            ("torch", f"{torch.__version__}, CUDA {torch.version.cuda}"), cuda_checks(use_cuda)]
    log(rows[-1])
    precisions = [False, True]
    for name in ("nuclei", "dermoscopy") if use_cuda else ("nuclei",):  # dry run: one model, the import check
        model = load_model(name, device=device)
        for amp in precisions:
            seconds = segment_latency(model, device, sizes["latency"], sizes["runs"], amp)
            rows.append((f"segment {sizes['latency']}² {name} {'bf16' if amp else 'fp32'}", f"{seconds:.4f} s median"))
            log(rows[-1])
    model = load_model("nuclei", device=device)
    for amp in precisions:
        rate = tiled_throughput(model, device, sizes["tiled"], sizes["tile"], amp)
        rows.append((f"tiled {sizes['tiled']}² nuclei tile {sizes['tile']} {'bf16' if amp else 'fp32'}",
                     f"{rate:.3g} Mpx/s"))
        log(rows[-1])
    with tempfile.TemporaryDirectory() as tmp:
        slide = synthetic_slide(Path(tmp), sizes["slide"])
        for amp in precisions:
            rate, objects = slide_throughput(model, slide, Path(tmp), amp, 1024 if use_cuda else 256)
            rows.append((f"whole slide {sizes['slide']}² nuclei {'bf16' if amp else 'fp32'}",
                         f"{rate:.3g} Mpx/s, {objects} objects"))
            log(rows[-1])
    for amp in precisions:
        rate, how = training_throughput(device, sizes["train_s"], sizes["batch"], amp)
        rows.append((f"training {'bf16' if amp else 'fp32'}", f"{rate:.3g} steps/s ({how})"))
        log(rows[-1])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="dry run on the CPU at tiny sizes")
    args = parser.parse_args(argv)
    rows = run(args)
    print("\n== GPU check summary ==\n| check | result |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    return 1 if any(name == "CUDA checks" and "failed" in value for name, value in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
