"""Scoring a model against reference masks (what ``napari-sgdc evaluate`` runs).

`layout_items` and `folder_items` list what to score (a dataset layout's split, or
folders of images and masks matched by stem); `evaluate` segments each image and scores
it (IoU, Dice, HD95, boundary F1, plus AJI, object F1 and PQ with instance labels, plus
the nucleus-type scores of `napari_sgdc.type_metrics` pooled over the images when the
model has types and the items have reference types); `summarize` gives mean ± std,
`summary_lines` the printed report, and `write_csv` the per-image table through the one
atomic writer, never replacing a file unless asked.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

if TYPE_CHECKING:
    from .type_metrics import TypeScores

__all__ = [
    "Evaluation", "EvaluationItem", "SCORE_LABELS", "check_csv_target", "evaluate", "folder_items", "layout_items",
    "summarize", "summary_lines", "write_csv",
]

SEMANTIC_KEYS = ("iou", "dice", "hd95", "boundary_f1")
INSTANCE_KEYS = ("aji", "object_f1", "pq")
TYPE_KEYS = ("f_d",)
SCORE_LABELS = {"iou": "IoU", "dice": "Dice", "hd95": "HD95 (px)", "boundary_f1": "Boundary F1 (tol {tolerance:g} px)",
                "aji": "AJI", "object_f1": "Object F1 (IoU>0.5)", "pq": "PQ (panoptic quality)",
                "f_d": "F_d per image (12 px)"}
"""The printed name of each score (``{tolerance}`` is the boundary F1 tolerance)."""


@dataclass
class EvaluationItem:
    """One image to score: loaders for the image, the reference mask and (optionally) the
    reference instance labels and their types (a 1-D lookup, ``types[id]`` = the type of
    instance ``id``), or the ``problem`` that keeps it from being scored."""

    name: str
    load_image: Callable[[], np.ndarray] | None = None
    load_mask: Callable[[], np.ndarray] | None = None
    load_instances: Callable[[], np.ndarray] | None = None
    problem: str | None = None
    load_types: Callable[[], np.ndarray] | None = None


def layout_items(data: str | Path, layout: str, split: str = "test",
                 max_images: int | None = None) -> list[EvaluationItem]:
    """The items of a dataset layout's split (instance labels, and their types, where the layout has them).

    Raises:
        ValueError: the split holds no images (or the dataset cannot be read).
    """
    from .data import load_samples

    samples = load_samples(data, layout, split, max_images=max_images or None)
    if not samples:
        raise ValueError(f"no images in split {split!r} of {data} (layout {layout})")
    return [EvaluationItem(sample.name, (lambda s=sample: s.image), (lambda s=sample: s.mask > 0),
                           (lambda s=sample: s.mask) if sample.is_instance else None,
                           load_types=(lambda s=sample: s.types) if sample.is_instance and sample.types is not None
                           else None)
            for sample in samples]


def folder_items(images: str | Path, masks: str | Path | None = None, instances: str | Path | None = None,
                 max_images: int | None = None) -> list[EvaluationItem]:
    """The items of a folder of images with reference masks and/or instance maps, matched
    by file stem; an image without its label becomes an item with a ``problem``.

    Raises:
        ValueError: neither `masks` nor `instances`, or no images.
    """
    from .data.datasets import find_label_file
    from .files import read_image, read_mask
    from .predict import expand_inputs

    if masks is None and instances is None:
        raise ValueError("give --images DIR with --masks DIR (and optionally --instances DIR), or --layout and --data")
    files, _ = expand_inputs([Path(images)])
    files = files[:max_images] if max_images else files
    if not files:
        raise ValueError(f"no images in {images}")
    items = []
    for path in files:
        mask_path = find_label_file([Path(masks)], path.stem) if masks else None
        instance_path = find_label_file([Path(instances)], path.stem) if instances else None
        if masks and mask_path is None:
            items.append(EvaluationItem(path.name, problem=f"{path}: no mask with stem {path.stem!r} in {masks}"))
        elif instances and instance_path is None:
            items.append(EvaluationItem(path.name,
                                        problem=f"{path}: no instance map with stem {path.stem!r} in {instances}"))
        else:
            load_instances = None if instance_path is None else (lambda p=instance_path: read_mask(p, instance=True))
            load_mask = ((lambda p=mask_path: read_mask(p, instance=False)) if mask_path is not None
                         else (lambda p=instance_path: read_mask(p, instance=True) > 0))
            items.append(EvaluationItem(path.name, (lambda p=path: read_image(p)), load_mask, load_instances))
    return items


@dataclass
class Evaluation:
    """The scores of `evaluate`.

    Attributes:
        rows: one dict per scored image: ``image`` and its scores.
        failures: one line per image that could not be scored.
        pooled: (intersection, predicted, reference) foreground pixels summed over the images.
        type_names: the model's nucleus types (type id i + 1 is ``type_names[i]``); empty
            for a model without types.
        types: the type counts pooled over the images with reference types
            (`napari_sgdc.type_metrics.TypeScores`), None when the model has no types.
    """

    rows: list[dict] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    pooled: np.ndarray = field(default_factory=lambda: np.zeros(3, np.int64))
    type_names: tuple[str, ...] = ()
    types: TypeScores | None = None

    @property
    def keys(self) -> list[str]:
        """The score columns: the semantic ones, plus the instance and type ones when any row has them."""
        instance = any("aji" in row for row in self.rows)
        typed = any("f_d" in row for row in self.rows)
        return [*SEMANTIC_KEYS, *(INSTANCE_KEYS if instance else ()), *(TYPE_KEYS if typed else ())]

    @property
    def type_summary(self) -> dict[str, float] | None:
        """The pooled type scores (`TypeScores.summary`), None without typed images."""
        if self.types is None or self.types.images == 0:
            return None
        return self.types.summary(len(self.type_names))

    @property
    def pooled_iou_dice(self) -> tuple[float, float]:
        """IoU and Dice of the pixels summed over all images."""
        intersection, predicted, reference = (int(value) for value in self.pooled)
        union = predicted + reference - intersection
        return intersection / max(union, 1), 2 * intersection / max(predicted + reference, 1)


def evaluate(model, items: Sequence[EvaluationItem], options=None, *, tile: int | None = 512, overlap: float = 0.25,
             tta: bool = False, amp: bool = False, tolerance: float = 2.0, engine="torch",
             on_error: Callable[[str], Any] | None = None,
             progress: Callable[[int, int], Any] | None = None) -> Evaluation:
    """Segments and scores every item (a failing item is reported and skipped).

    For a model with nucleus types (``config.type_names``), items with reference types
    (``load_types``) and instance labels also add the segmentation's ``object_types`` to
    the pooled type scores (centroid pairing radius 12 px: the images are taken as they
    are) and their row gets the image's F_d.

    Args:
        model: an `SGDCSegmenter`.
        items: what to score (`layout_items`, `folder_items`).
        options: `PostprocessOptions` (default: the model's).
        tile, overlap, tta, amp, engine: as in `napari_sgdc.inference.segment` (an engine name or object).
        tolerance: boundary F1 tolerance in pixels.
        on_error: called with one line per item that cannot be scored.
        progress: called with (items done, items total) after each item.
    """
    from .postprocess import PostprocessOptions

    options = options or PostprocessOptions.for_model(model.config)
    result = Evaluation(type_names=tuple(model.config.type_names))
    if model.config.has_types:
        from .type_metrics import TypeScores

        result.types = TypeScores()
    for index, item in enumerate(items):
        try:
            if item.problem is not None:
                raise ValueError(item.problem)
            result.rows.append(_score_item(model, item, options, result.pooled, result.types, tile=tile,
                                           overlap=overlap, tta=tta, amp=amp, tolerance=tolerance, engine=engine))
        except (ValueError, OSError) as error:
            message = str(error) if item.problem is not None else f"{item.name}: {error}"
            result.failures.append(message)
            if on_error is not None:
                on_error(message)
        if progress is not None:
            progress(index + 1, len(items))
    return result


def _score_item(model, item: EvaluationItem, options, pooled: np.ndarray, types, *, tile, overlap, tta, amp,
                tolerance, engine="torch") -> dict:
    """The row of one item; adds its pixel counts to `pooled` and its type counts to `types` (a
    `TypeScores`, or None)."""
    from . import metrics
    from .inference import segment
    from .postprocess import postprocess

    image, target = item.load_image(), item.load_mask()
    target_instances = item.load_instances() if item.load_instances is not None else None
    target_types = item.load_types() if types is not None and item.load_types is not None else None
    result = segment(model, image, options, tile=tile or None, overlap=overlap, tta=tta, stack=False, amp=amp,
                     engine=engine)
    if result.mask.shape != target.shape:
        raise ValueError(f"mask shape {target.shape} differs from image shape {result.mask.shape}")
    row = {"image": item.name, **metrics.semantic_scores(result.mask, target, tolerance)}
    if target_instances is not None:
        labels = result.labels
        if labels is None:  # a semantic model scored against instances: split its mask
            labels = postprocess(result.probability, result.boundary, options, instances=True)[1]
        row.update(metrics.instance_scores(labels, target_instances))
        if target_types is not None and result.object_types is not None and result.labels is not None:
            row["f_d"] = types.add(labels, result.object_types, target_instances, target_types)
    reference = np.asarray(target) > 0  # pooled last: an item that fails above adds nothing
    pooled += [np.count_nonzero(result.mask & reference), np.count_nonzero(result.mask), np.count_nonzero(reference)]
    return row


def summarize(rows: list[dict], keys: Sequence[str]) -> dict[str, tuple[float, float]]:
    """Mean and (population) standard deviation of each key over rows, ignoring NaN."""
    summary = {}
    for key in keys:
        values = np.array([row[key] for row in rows if key in row], dtype=float)
        values = values[np.isfinite(values)]
        summary[key] = (float(values.mean()), float(values.std())) if values.size else (math.nan, math.nan)
    return summary


def summary_lines(evaluation: Evaluation, tolerance: float = 2.0) -> list[str]:
    """The report: mean ± std of each score, then the pooled IoU / Dice, then (for a model
    with types) F_d, F_c and PQ of each type and mPQ, pooled over the typed images."""
    lines = []
    for key, (mean, std) in summarize(evaluation.rows, evaluation.keys).items():
        lines.append(f"{SCORE_LABELS[key].format(tolerance=tolerance):<28} {mean:.4f} ± {std:.4f}")
    iou, dice = evaluation.pooled_iou_dice
    lines.append(f"{'Pooled IoU / Dice':<28} {iou:.4f} / {dice:.4f}  (pixels summed over all images)")
    if evaluation.type_names:
        lines.extend(_type_lines(evaluation))
    return lines


def _type_lines(evaluation: Evaluation) -> list[str]:
    """The nucleus-type part of the report (see `napari_sgdc.type_metrics` for the definitions)."""
    scores = evaluation.type_summary
    if scores is None:
        return ["Nucleus types: not scored (no image had reference types and predicted object types)"]
    lines = [f"Nucleus types, pooled over {evaluation.types.images} image(s) (pairing radius 12 px):",
             f"{'  F_d (detection)':<28} {scores['f_d']:.4f}"]
    for index, name in enumerate(evaluation.type_names, start=1):
        lines.append(f"{f'  F_c {name}':<28} {scores[f'f_c_{index}']:.4f}")
    for index, name in enumerate(evaluation.type_names, start=1):
        lines.append(f"{f'  PQ {name}':<28} {scores[f'pq_{index}']:.4f}")
    defined = sum(not math.isnan(scores[f"pq_{index}"]) for index in range(1, len(evaluation.type_names) + 1))
    lines.append(f"{'  mPQ':<28} {scores['mpq']:.4f}  (mean over the {defined} type(s) present)")
    binary = summarize(evaluation.rows, ["pq"])["pq"][0]
    lines.append(f"{'  PQ (binary, per image)':<28} {binary:.4f}")
    return lines


def check_csv_target(path: str | Path, overwrite: bool = False) -> None:
    """Refuses (before any work) a CSV path that exists, unless `overwrite`.

    Raises:
        ValueError: one line naming the file.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a CSV file")
    if path.exists() and not overwrite:
        raise ValueError(f"{path} already exists; not replaced (use --overwrite, or another --csv)")


def write_csv(rows: Sequence[dict], path: str | Path, keys: Sequence[str] | None = None, *,
              overwrite: bool = False) -> Path:
    """Writes per-image rows (``image`` plus `keys`, other keys left out; floats with 6 significant digits)
    atomically to `path`; an existing file is replaced only with `overwrite`.

    Raises:
        ValueError: `path` exists and not `overwrite`.
    """
    from .files import atomic_write

    check_csv_target(path, overwrite)
    if keys is None:
        keys = [key for key in (*SEMANTIC_KEYS, *INSTANCE_KEYS, *TYPE_KEYS) if any(key in row for row in rows)]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=["image", *keys], restval="", extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({key: (f"{value:.6g}" if isinstance(value, float) else value)
                                 for key, value in row.items()})

    return atomic_write(path, write)
