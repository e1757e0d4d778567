"""Exports of a finished whole-slide store: the object table (CSV or Parquet) and the QuPath GeoJSON."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..files import atomic_write
from .plan import SlidePlan
from .store import read_store_attrs

__all__ = ["OBJECT_COLUMNS", "export_objects", "iter_records"]

OBJECT_COLUMNS = ("id", "centroid_x_um", "centroid_y_um", "area_um2", "bbox_x0_um", "bbox_y0_um", "bbox_x1_um",
                  "bbox_y1_um", "mean_probability")


def iter_records(store: Path) -> Iterable[tuple[int, dict]]:
    """(id offset, record) of every tile in row-major order."""
    keys = []
    for path in (store / "tiles").glob("*.npz"):
        i, j = path.stem.split("_")
        keys.append((int(i), int(j), path))
    offset = 0
    for _, _, path in sorted(keys):
        with np.load(path) as data:
            record = {name: data[name] for name in data.files}
        yield offset, record
        offset += int(record["ids"].size)


def export_objects(store: str | Path, table: str | Path | None = None, geojson: str | Path | None = None, *,
                   overwrite: bool = False) -> int:
    """Writes the object table (CSV, or Parquet for a ``.parquet`` path: needs pyarrow) and the
    QuPath GeoJSON (detections, polygons in level-0 slide pixels) of a finished store.

    Table columns: `OBJECT_COLUMNS` (µm on the slide, origin at its top-left corner).
    Streams tile by tile; returns the number of objects.
    """
    store = Path(store)
    attrs = read_store_attrs(store)
    if attrs is None or not attrs.get("complete"):
        raise ValueError(f"{store}: not a finished napari-sgdc slide store")
    um = SlidePlan.from_signature(attrs["plan"], store).working_mpp
    for path in (table, geojson):
        if path is not None and Path(path).exists() and not overwrite:
            raise FileExistsError(f"{path} already exists; not replaced (use overwrite)")
    count = 0

    def rows():
        for offset, record in iter_records(store):
            for k in range(record["ids"].size):
                y0, x0, y1, x1 = record["bbox"][k]
                yield (offset + k + 1, (record["centroid_x"][k] + 0.5) * um, (record["centroid_y"][k] + 0.5) * um,
                       record["area"][k] * um * um, x0 * um, y0 * um, x1 * um, y1 * um,
                       record["mean_probability"][k])

    if table is not None:
        table = Path(table)
        if table.suffix.lower() == ".parquet":
            import pandas as pd

            frame = pd.DataFrame(list(rows()), columns=OBJECT_COLUMNS)
            atomic_write(table, lambda tmp: frame.to_parquet(tmp, index=False))
            count = len(frame)
        else:
            def write_csv(tmp: Path) -> None:
                nonlocal count
                with open(tmp, "w", newline="") as stream:
                    writer = csv.writer(stream)
                    writer.writerow(OBJECT_COLUMNS)
                    for row in rows():
                        writer.writerow([row[0]] + [f"{v:.4f}" for v in row[1:]])
                        count += 1

            atomic_write(table, write_csv)
    if geojson is not None:
        def write_geojson(tmp: Path) -> None:
            nonlocal count
            count = 0
            with open(tmp, "w") as stream:
                stream.write('{"type": "FeatureCollection", "features": [\n')
                first = True
                for offset, record in iter_records(store):
                    points, offsets = record["poly_xy"], record["poly_offsets"]
                    for k in range(record["ids"].size):
                        ring = points[offsets[k]:offsets[k + 1]].astype(np.float64).round(2).tolist()
                        if len(ring) < 3:
                            continue
                        if ring[0] != ring[-1]:
                            ring.append(ring[0])
                        feature = {"type": "Feature", "id": f"nucleus-{offset + k + 1}",
                                   "geometry": {"type": "Polygon", "coordinates": [ring]},
                                   "properties": {"objectType": "detection", "name": str(offset + k + 1),
                                                  "classification": {"name": "Nucleus", "color": [255, 0, 255]},
                                                  "measurements": {
                                                      "area_um2": round(float(record["area"][k]) * um * um, 3),
                                                      "mean_probability": round(
                                                          float(record["mean_probability"][k]), 4)}}}
                        stream.write(("" if first else ",\n") + json.dumps(feature))
                        first = False
                        count += 1
                stream.write("\n]}\n")

        atomic_write(geojson, write_geojson)
    return count
