"""Exports of a finished whole-slide store: the object table (CSV or Parquet) and the QuPath GeoJSON."""

from __future__ import annotations

import csv
import json
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from ..files import CLASS_COLUMNS, atomic_write
from .plan import SlidePlan
from .store import read_store_attrs

__all__ = ["CLASS_COLUMNS", "OBJECT_COLUMNS", "QUPATH_MEASUREMENTS", "export_objects", "iter_records", "object_columns",
           "qupath_classification", "qupath_feature", "read_object_types"]

OBJECT_COLUMNS = ("id", "centroid_x_um", "centroid_y_um", "area_um2", "bbox_x0_um", "bbox_y0_um", "bbox_x1_um",
                  "bbox_y1_um", "mean_probability", "perimeter_um", "mean_haematoxylin_od")
QUPATH_MEASUREMENTS = {"area_um2": "Nucleus: Area µm^2", "perimeter_um": "Nucleus: Perimeter µm",
                       "mean_haematoxylin_od": "Nucleus: Hematoxylin OD mean",
                       "mean_probability": "Nucleus: Probability mean"}
"""Table column → the GeoJSON measurement of the same value, named as QuPath's cell detection names them."""
NUCLEUS_CLASS = {"name": "Nucleus", "color": [255, 0, 255], "colorRGB": -65281}
"""The detections' QuPath classification: ``color`` is read by QuPath >= 0.4, ``colorRGB`` (packed ARGB) by 0.3."""
CLASS_MEASUREMENT = "Nucleus: Class confidence"
"""The GeoJSON measurement of ``class_confidence`` (models with types)."""
ID_NAMESPACE = uuid.UUID("5d6c0a5e-9b8e-4f57-9a8c-2f4e0c1b7a11")


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


def _objects(store: Path, um: float, level0_um: float) -> Iterator[tuple[int, list, dict]]:
    """(id, closed polygon ring in level-0 pixels, {column: value}) of every object; the one source of the table
    and the GeoJSON. The perimeter is the polygon's; the haematoxylin OD is NaN in records written before it was."""
    for offset, record in iter_records(store):
        points, offsets = record["poly_xy"], record["poly_offsets"]
        n = record["ids"].size
        od = record.get("mean_haematoxylin_od", np.full(n, np.nan))
        class_id, class_confidence = record.get("class_id"), record.get("class_confidence")
        for k in range(n):
            ring = points[offsets[k]:offsets[k + 1]].astype(np.float64).round(2).tolist()
            if ring and ring[0] != ring[-1]:
                ring.append(ring[0])
            y0, x0, y1, x1 = record["bbox"][k]
            steps = np.diff(np.asarray(ring).reshape(-1, 2), axis=0)
            values = {"centroid_x_um": (record["centroid_x"][k] + 0.5) * um,
                      "centroid_y_um": (record["centroid_y"][k] + 0.5) * um, "area_um2": record["area"][k] * um * um,
                      "bbox_x0_um": x0 * um, "bbox_y0_um": y0 * um, "bbox_x1_um": x1 * um, "bbox_y1_um": y1 * um,
                      "mean_probability": record["mean_probability"][k],
                      "perimeter_um": float(np.hypot(steps[:, 0], steps[:, 1]).sum()) * level0_um,
                      "mean_haematoxylin_od": od[k]}
            values = {name: float(value) for name, value in values.items()}
            if class_id is not None:
                values["class_id"], values["class_confidence"] = int(class_id[k]), float(class_confidence[k])
            yield offset + k + 1, ring, values


def object_columns(plan: SlidePlan) -> tuple[str, ...]:
    """The object table's columns for a store made with `plan`: `OBJECT_COLUMNS`, then `CLASS_COLUMNS`
    when the model has nucleus types."""
    return OBJECT_COLUMNS + (CLASS_COLUMNS if plan.type_names else ())


def qupath_classification(plan: SlidePlan, class_id: int | None) -> dict:
    """The QuPath classification of an object of type `class_id` (its name and ``#rrggbb`` colour as
    [r, g, b], and the packed ``colorRGB`` of QuPath 0.3); `NUCLEUS_CLASS` without types."""
    if not plan.type_names or not class_id:
        return dict(NUCLEUS_CLASS)
    hex_colour = plan.type_colors[class_id - 1]
    r, g, b = (int(hex_colour[k:k + 2], 16) for k in (1, 3, 5))
    packed = int(np.array(0xFF000000 | r << 16 | g << 8 | b, np.uint32).view(np.int32))
    return {"name": plan.type_names[class_id - 1], "color": [r, g, b], "colorRGB": packed}


def _table_row(index: int, values: dict, columns: tuple[str, ...], plan: SlidePlan) -> list:
    """One object as table cells: the id, each value (NaN where the record lacks it), and its class name, id and
    confidence."""
    row: list = [index]
    for column in columns[1:]:
        if column == "class":
            cid = values.get("class_id", 0)
            row.append(plan.type_names[cid - 1] if cid else "")
        elif column == "class_id":
            row.append(values.get("class_id", 0))
        else:
            row.append(values.get(column, np.nan))
    return row


def read_object_types(store: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The type table of a store made by a model with types: (N + 1,) int16 type id and float32
    confidence per slide-wide object id (index 0: background), as `napari_sgdc.postprocess.assign_types`
    gives for an image; all 0 for a store without types (its records hold no classes)."""
    types, confidence = [np.zeros(1, np.int16)], [np.zeros(1, np.float32)]
    for _, record in iter_records(Path(store)):
        n = int(record["ids"].size)
        types.append(np.asarray(record.get("class_id", np.zeros(n)), np.int16))
        confidence.append(np.asarray(record.get("class_confidence", np.zeros(n)), np.float32))
    return np.concatenate(types), np.concatenate(confidence)


def qupath_feature(index: int, ring: list, values: dict, store_name: str, classification: dict | None = None) -> dict:
    """One object as a QuPath detection (QuPath >= 0.4 GeoJSON; docs/wholeslide.md, QuPath): a UUID ``id``
    (stable for the store's name and the object id), a Polygon, ``objectType``, ``classification``
    (`qupath_classification`; default `NUCLEUS_CLASS`) and the `QUPATH_MEASUREMENTS`, plus `CLASS_MEASUREMENT`
    for an object with a class (4 decimals; a missing value is left out)."""
    measurements = {label: round(values[column], 4) for column, label in QUPATH_MEASUREMENTS.items()
                    if np.isfinite(values[column])}
    if np.isfinite(values.get("class_confidence", np.nan)):
        measurements[CLASS_MEASUREMENT] = round(values["class_confidence"], 4)
    return {"type": "Feature", "id": str(uuid.uuid5(ID_NAMESPACE, f"{store_name}/{index}")),
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {"objectType": "detection", "name": str(index),
                           "classification": dict(classification or NUCLEUS_CLASS), "measurements": measurements}}


def export_objects(store: str | Path, table: str | Path | None = None, geojson: str | Path | None = None, *,
                   overwrite: bool = False) -> int:
    """Writes the object table (CSV, or Parquet for a ``.parquet`` path: needs pyarrow) and the
    QuPath GeoJSON (detections, polygons in level-0 slide pixels) of a finished store.

    Table columns: `OBJECT_COLUMNS` (µm on the slide, origin at its top-left corner; an empty cell
    for a value the store's records lack), then `CLASS_COLUMNS` for a model with nucleus types. The
    GeoJSON holds the same values as measurements (`QUPATH_MEASUREMENTS`) and each object's class as
    its QuPath classification (`qupath_classification`). Streams tile by tile; returns the number of objects.
    """
    store = Path(store)
    attrs = read_store_attrs(store)
    if attrs is None or not attrs.get("complete"):
        raise ValueError(f"{store}: not a finished napari-sgdc slide store")
    plan = SlidePlan.from_signature(attrs["plan"], store)
    um, level0_um = plan.working_mpp, plan.working_mpp / plan.to_level0
    for path in (table, geojson):
        if path is not None and Path(path).exists() and not overwrite:
            raise FileExistsError(f"{path} already exists; not replaced (use overwrite)")
    count, columns = 0, object_columns(plan)

    def rows():
        for index, _, values in _objects(store, um, level0_um):
            yield _table_row(index, values, columns, plan)

    if table is not None:
        table = Path(table)
        if table.suffix.lower() == ".parquet":
            try:
                import pandas as pd
                import pyarrow  # noqa: F401  (pandas writes Parquet with it)
            except ImportError as error:
                raise ImportError(f"a .parquet table needs {error.name}: pip install 'napari-sgdc[parquet]' "
                                  "(or write a .csv)") from None

            frame = pd.DataFrame(list(rows()), columns=columns)
            atomic_write(table, lambda tmp: frame.to_parquet(tmp, index=False))
            count = len(frame)
        else:
            def write_csv(tmp: Path) -> None:
                nonlocal count
                with open(tmp, "w", newline="") as stream:
                    writer = csv.writer(stream)
                    writer.writerow(columns)
                    for row in rows():
                        writer.writerow([v if isinstance(v, (int, str)) else f"{v:.4f}" if np.isfinite(v) else ""
                                         for v in row])
                        count += 1

            atomic_write(table, write_csv)
    if geojson is not None:
        def write_geojson(tmp: Path) -> None:
            nonlocal count
            count = 0
            with open(tmp, "w", encoding="utf-8") as stream:
                stream.write('{"type": "FeatureCollection", "features": [\n')
                for index, ring, values in _objects(store, um, level0_um):
                    if len(ring) < 4:
                        continue
                    feature = qupath_feature(index, ring, values, store.name,
                                             qupath_classification(plan, values.get("class_id")))
                    stream.write(("" if count == 0 else ",\n") + json.dumps(feature, ensure_ascii=False,
                                                                             allow_nan=False))
                    count += 1
                stream.write("\n]}\n")

        atomic_write(geojson, write_geojson)
    return count
