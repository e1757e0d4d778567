"""How fast each click tool answers on a 1000² plane (target: ≤ 0.2 s per click).

A synthetic 1000×1000 plane of about 1,500 nuclei (radius 5–11 px, a quarter of them in
touching pairs) gives the probability (blurred discs, plus noise), the separation map
(1 − the normalised distance to each nucleus' centre) and the labels `postprocess` makes of
them; one nucleus in ten is faint (probability 0.3, missed at threshold 0.5). Each tool is
then timed on `--clicks` clicks at different objects, as the GUI calls it (the whole plane
in, an `Edit` out), and the review queue is built once per repeat for the whole plane.

    python benchmarks/clicks.py                 # prints a markdown table: median and worst seconds
    python benchmarks/clicks.py --size 2000     # a larger plane
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from napari_sgdc import clicks
from napari_sgdc.clicks import PlaneMaps
from napari_sgdc.postprocess import PostprocessOptions, postprocess
from napari_sgdc.review import rank_objects


def synthetic_plane(size: int, seed: int = 0) -> tuple[PlaneMaps, list, list]:
    """Maps of a synthetic plane; the faint nuclei's centres and the touching pairs' centres."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    probability = np.zeros((size, size), np.float32)
    separation = np.ones((size, size), np.float32)
    rows, cols = np.ogrid[:size, :size]
    faint, pairs, taken = [], [], np.zeros((size, size), bool)
    for _ in range(int(3e-3 * size * size)):
        radius = rng.uniform(5, 11)
        center = rng.uniform(15, size - 35, 2)
        partner = center + [0, 1.9 * radius] if rng.random() < 0.25 else None
        centers = [center] if partner is None else [center, partner]
        r0, c0 = (int(v) for v in center)
        reach = int(radius) + 3
        if taken[max(0, r0 - reach):r0 + reach, max(0, c0 - reach):c0 + reach + int(2 * radius)].any():
            continue
        value = 0.3 if rng.random() < 0.1 else 0.95
        for cr, cc in centers:
            window = (slice(max(0, int(cr - radius - 2)), int(cr + radius + 3)),
                      slice(max(0, int(cc - radius - 2)), int(cc + radius + 3)))
            distance = np.hypot(rows[window[0]] - cr, cols[:, window[1]] - cc) / radius
            disc = distance <= 1
            probability[window][disc] = value
            separation[window] = np.where(disc, np.minimum(separation[window], distance), separation[window])
            taken[window] |= disc
        if value < 0.5:
            faint.append(tuple(center))
        elif partner is not None:
            pairs.append((tuple(center), tuple(partner)))
    probability = np.clip(ndimage.gaussian_filter(probability, 1.0) + rng.normal(0, 0.02, probability.shape), 0, 1)
    return PlaneMaps(probability.astype(np.float32), separation, PostprocessOptions(0.5, 0.5, 10)), faint, pairs


def time_tools(maps: PlaneMaps, faint: list, pairs: list, n_clicks: int) -> dict[str, list[float]]:
    """Seconds per call of each tool, `n_clicks` calls each."""
    _, labels = postprocess(maps.probability, maps.separation, maps.options, instances=True)
    mask = (labels > 0).astype(np.uint8)
    times: dict[str, list[float]] = {}

    def clock(name, call):
        start = time.perf_counter()
        call()
        times.setdefault(name, []).append(time.perf_counter() - start)

    pairs = [(a, b) for a, b in pairs if labels[tuple(map(int, a))] and labels[tuple(map(int, b))]
             and labels[tuple(map(int, a))] != labels[tuple(map(int, b))]][:n_clicks]
    for center in faint[:n_clicks]:
        clock("add (missed nucleus)", lambda: clicks.add_object(labels, maps, center))
        clock("add region (semantic)", lambda: clicks.add_region(mask, maps, center))
    for a, b in pairs:
        clock("delete", lambda: clicks.delete_object(labels, a))
        clock("remove region (semantic)", lambda: clicks.remove_region(mask, a))
        clock("merge", lambda: clicks.merge_objects(labels, a, b))
        merged = clicks.merge_objects(labels, a, b).apply(labels.copy())
        clock("split (two clicks)", lambda: clicks.split_object(merged, maps, [a, b]))
        clock("split (one click)", lambda: clicks.split_object(merged, maps, [a]))
        middle = (np.asarray(a) + np.asarray(b)) / 2
        stroke = [middle - [14, 0], middle + [14, 0]]
        clock("split (stroke)", lambda: clicks.split_object(merged, maps, stroke=stroke))
        row, col = (int(v) for v in a)  # out of the top edge of the object at a, and back: a bump
        edge = row - int(np.argmax(labels[row::-1, col] != labels[row, col]))
        outline = [(edge + 2, col - 3), (edge - 5, col), (edge + 2, col + 3)]
        clock("fix outline (stroke)", lambda: clicks.reshape_object(labels, outline))
    uncertainty = np.abs(maps.probability - 0.5).astype(np.float32)
    for _ in range(3):
        clock("review queue (whole plane)", lambda: rank_objects(labels, maps.separation, uncertainty))
    print(f"plane {labels.shape}, {int(labels.max())} objects, {len(faint)} faint, {len(pairs)} touching pairs timed")
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1000)
    parser.add_argument("--clicks", type=int, default=20)
    args = parser.parse_args(argv)
    maps, faint, pairs = synthetic_plane(args.size)
    times = time_tools(maps, faint, pairs, args.clicks)
    from napari_sgdc.device import cpu_description

    print(f"# CPU: {cpu_description()}")
    print("| tool | calls | median s | worst s |\n|---|---:|---:|---:|")
    for name, values in times.items():
        print(f"| {name} | {len(values)} | {statistics.median(values):.3f} | {max(values):.3f} |")


if __name__ == "__main__":
    main()
