"""Peak memory and time on a 12000² slide (issue 26): tissue detection on a single-level tiled TIFF,
and a whole run on an untiled (strip) TIFF.

    python benchmarks/big_tiff.py tissue     # seconds of detect_tissue on a single-level tiled 12000² TIFF
    python benchmarks/big_tiff.py untiled    # peak RSS of reading an untiled 12000² TIFF as a slide

Prints one JSON line. The TIFFs are written to /tmp (about 430 MB each, uncompressed/zlib).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import tifffile

SIDE = 12000


def _pattern(rows: int, y0: int) -> np.ndarray:
    yy, xx = np.mgrid[y0:y0 + rows, 0:SIDE]
    tissue = ((yy - SIDE / 2) ** 2 + (xx - SIDE / 2) ** 2) < (SIDE * 0.35) ** 2
    rgb = np.full((rows, SIDE, 3), 250, np.uint8)
    rgb[tissue] = (200, 120, 170)
    return rgb


def _write(path: Path, tiled: bool) -> Path:
    if path.exists():
        return path
    def strips():
        for y in range(0, SIDE, 500):
            yield _pattern(500, y)
    kwargs = dict(tile=(512, 512)) if tiled else dict(rowsperstrip=64)
    tifffile.imwrite(str(path), _pattern(SIDE, 0) if tiled else strips(), shape=(SIDE, SIDE, 3), dtype=np.uint8,
                     photometric="rgb", compression="zlib" if tiled else None,
                     resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER", **kwargs)
    return path


def main() -> None:
    from napari_sgdc.slide import detect_tissue, open_slide

    what = sys.argv[1] if len(sys.argv) > 1 else "tissue"
    path = Path(f"/tmp/big_{what}.tif")
    if len(sys.argv) > 2:  # the write, in its own process (it would dominate the peak)
        _write(path, tiled=what == "tissue")
        return
    import subprocess

    subprocess.run([sys.executable, __file__, what, "write"], check=True)
    start = time.perf_counter()
    with open_slide(path) as slide:
        mask = detect_tissue(slide)
        if what == "untiled":
            for y in range(0, SIDE, 1024):  # every pixel once, as the tiles of a run read it
                slide.read_region(0, y, SIDE, 1024)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KB → GB
    print(json.dumps({"case": what, "side": SIDE, "seconds": round(seconds, 2), "peak_rss_gb": round(peak, 3),
                      "tissue_fraction": round(float(mask.mask.mean()), 3)}))


if __name__ == "__main__":
    main()
