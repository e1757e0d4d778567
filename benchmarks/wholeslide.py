"""Whole-slide benchmark: memory, time and throughput of segment_slide on synthetic slides.

Slides are built in /tmp (never committed) from the real MoNuSeg H&E images in
../shared/data: a pyramidal, tiled OME-TIFF at 0.25 µm/px whose 2048-px-wide columns of
blocks alternate between H&E mosaic and blank background (50 % tissue). (A checkerboard
was used before: tissue detection's 50 µm closing bridges the touching corners of
diagonal blocks, so every blank block's tiles met the tissue mask.)

    python benchmarks/wholeslide.py --sizes 8192 16384 32768 [--workers 1 2] [--no-skip] [--precision fp32 bf16]
        [--profile] [--compare-pipeline]

It first prints the CPU (model and SIMD flags) and torch's version and threads. Each run happens in a
fresh interpreter; it prints one JSON line per run: size, tissue Mpx, seconds, Mpx/s of tissue,
baseline RSS (interpreter + model) and peak RSS, and /proc/loadavg before and after.
``--precision fp32 bf16`` runs each configuration in float32 and with bf16 autocast (``amp``).
Single-process runs go through the tile pipeline (`napari_sgdc.wholeslide.pipeline`: reading, the
network and decoding overlap); ``--compare-pipeline`` runs each configuration also sequentially
(``segment_slide(pipeline=False)``) and prints the speed-up. ``--profile`` (single process) adds
the seconds per stage that `segment_slide` records (`SlideResult.stages`: tissue detection, read,
network, decode, of which post-processing and polygons, write, the tile phase's wall time, the
label and pyramid phases), the sum of the four tile stages (with the pipeline it exceeds the tile
phase's wall time: the stages overlap) and the network's share of the wall time (of the tile phase
and of the whole run).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "monuseg" / "train" / "images"
BLOCK = 2048


def build_slide(size: int, path: Path, mpp: float = 0.25) -> Path:
    """A (size, size) pyramidal OME-TIFF, written tile by tile (never whole in memory)."""
    import tifffile
    from skimage import io

    if path.exists():
        return path
    sources = [io.imread(str(p))[:, :, :3] for p in sorted(DATA.glob("*.jpg"))[:8]]

    def block(by: int, bx: int, level: int) -> np.ndarray:
        s = BLOCK >> level
        if bx % 2:  # blank columns of blocks: contiguous background, as beside real tissue sections
            return np.full((s, s, 3), 255, np.uint8)
        out = np.empty((BLOCK, BLOCK, 3), np.uint8)
        for k, (y, x) in enumerate([(0, 0), (0, 1000), (1000, 0), (1000, 1000)]):
            img = sources[(by * 7 + bx * 3 + k) % len(sources)]
            h, w = min(1000, BLOCK - y), min(1000, BLOCK - x)
            out[y:y + h, x:x + w] = img[:h, :w]
        out[2000:, :] = out[1900:1948]
        out[:, 2000:] = out[:, 1900:1948]
        return out[:: 2 ** level, :: 2 ** level]

    def tiles(level: int, tile: int = 512):
        s = BLOCK >> level  # block side at this level; coarse levels fit several blocks in one tile
        step = min(s, tile)
        for ty in range(0, size >> level, tile):
            for tx in range(0, size >> level, tile):
                out = np.empty((tile, tile, 3), np.uint8)
                for y in range(ty, ty + tile, step):
                    for x in range(tx, tx + tile, step):
                        b = block(y // s, x // s, level)
                        out[y - ty:y - ty + step, x - tx:x - tx + step] = b[y % s:y % s + step, x % s:x % s + step]
                yield out

    levels = 4
    tmp = path.with_suffix(".part")
    with tifffile.TiffWriter(str(tmp), bigtiff=True) as tw:
        meta = {"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp,
                "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"}
        tw.write(tiles(0), shape=(size, size, 3), dtype=np.uint8, tile=(512, 512), compression="zlib",
                 photometric="rgb", subifds=levels - 1, metadata=meta)
        for level in range(1, levels):
            tw.write(tiles(level), shape=(size >> level, size >> level, 3), dtype=np.uint8, tile=(512, 512),
                     compression="zlib", photometric="rgb", subfiletype=1)
    tmp.rename(path)
    return path


CHILD = r"""
import json, resource, sys, time, shutil, threading
import torch
torch.set_num_threads({threads})
from napari_sgdc.checkpoints import load_model
from napari_sgdc.wholeslide import segment_slide
model = load_model("nuclei", device="cpu")
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
shutil.rmtree("{out}", ignore_errors=True)
client = None
if {workers} > 1:
    from distributed import Client, LocalCluster
    client = Client(LocalCluster(n_workers={workers}, threads_per_worker=1, processes=True, dashboard_address=None))
start = time.perf_counter()
result = segment_slide("nuclei" if client else model, "{slide}", "{out}", tissue="{tissue}", tile={tile},
                       margin={margin}, client=client, threads={threads} if client else 0, amp={amp},
                       pipeline={pipeline})
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
row = dict(n_objects=result.n_objects, tiles_run=result.tiles_run, tiles_total=result.tiles_total,
           seconds=round(seconds, 1), baseline_gb=round(baseline, 3), peak_gb=round(peak, 3))
if {profile} and client is None:
    stages = result.stages
    tile_sum = sum(stages.get(k, 0.0) for k in ("read", "network", "decode", "write"))
    row.update(stages_s={{k: round(v, 2) for k, v in stages.items()}}, tile_stage_sum_s=round(tile_sum, 2),
               network_share_of_tile_wall=round(stages["network"] / stages["tiles_wall"], 3),
               network_share_of_wall=round(stages["network"] / seconds, 3))
print(json.dumps(row))
"""


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split(" ")[0:3].__str__()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--workers", type=int, nargs="+", default=[1])
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--margin", type=int, default=64)
    parser.add_argument("--no-skip", action="store_true", help="also run with tissue detection off")
    parser.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32"],
                        help="network precision(s) to run: float32 and/or bf16 autocast")
    parser.add_argument("--profile", action="store_true",
                        help="add the seconds per stage and the network's share of the wall time (1 worker)")
    parser.add_argument("--compare-pipeline", action="store_true",
                        help="single process: run each configuration with the tile pipeline and sequentially")
    args = parser.parse_args()
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from resample import cpu_line  # the benchmarks' one CPU description

    print(f"# CPU: {cpu_line()}; torch {torch.__version__}; 2 torch threads in one process; "
          f"load before: {loadavg()}", flush=True)
    for size in args.sizes:
        slide = build_slide(size, Path(f"/tmp/napari_sgdc_bench_{size}.ome.tif"))
        for workers in args.workers:
            for tissue, amp in [(t, a) for t in (["auto", "none"] if args.no_skip else ["auto"])
                                for a in [name == "bf16" for name in args.precision]]:
                threads = 2 if workers <= 1 else max(1, 2 // workers)
                modes = [True, False] if args.compare_pipeline and workers <= 1 else [True]
                seconds = {}
                for pipeline in modes:
                    code = CHILD.format(threads=threads, out=f"/tmp/napari_sgdc_bench_{size}.ome.zarr",
                                        workers=workers, slide=slide, tissue=tissue, tile=args.tile,
                                        margin=args.margin, amp=amp, profile=args.profile, pipeline=pipeline)
                    before = loadavg()
                    line = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                          cwd=ROOT).stdout.strip().splitlines()[-1]
                    row = json.loads(line)
                    row.update(size=size, workers=workers, tissue=tissue, amp=amp,
                               pipeline=pipeline if workers <= 1 else None, load_before=before,
                               load_after=loadavg(), tissue_mpx=size * size / 2e6,
                               mpx_per_s_tissue=round(size * size / 2e6 / row["seconds"], 3),
                               mpx_per_s_processed=round(row["tiles_run"] * args.tile ** 2 / 1e6 / row["seconds"], 3))
                    print(json.dumps(row), flush=True)
                    seconds[pipeline] = row["seconds"]
                if len(seconds) == 2:
                    print(f"# {size}² {'bf16' if amp else 'fp32'} tissue {tissue}: pipeline {seconds[True]} s, "
                          f"sequential {seconds[False]} s, speed-up {seconds[False] / seconds[True]:.2f}x", flush=True)


if __name__ == "__main__":
    main()
