"""The training list of fine-tuning: corrected image/labels pairs (headless: arrays in,
no napari or Qt).

The napari Fine-tune widget reads its image and labels layers into arrays and calls
`collect_pair`; the pairs it keeps are tied to the model they were made for, and
`split_by_model` keeps a fine-tune run to the pairs of the model being trained.
A pair made from the model's own mask keeps what the model wrote (`TrainingPair.predictions`),
so fine-tuning learns most from the edited pixels. (Which pixels of a pair were
edited, and how much they weigh in the loss, is `napari_sgdc.train.corrections`.)
`napari_sgdc.autosave` keeps the pairs on disk until they are trained or discarded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_sgdc.grid import usable_mpp

__all__ = ["InputError", "PairArrays", "TrainingPair", "collect_pair", "converted_types", "is_pair_list", "pair_arrays",
           "split_by_model"]


class InputError(ValueError):
    """A problem with the user's inputs (shown to the user as one line)."""


@dataclass
class TrainingPair:
    """One corrected image of the training list (copies, so later edits do not leak in).

    Attributes:
        image_name: name of the image.
        labels_name: name of the corrected labels.
        images: the corrected planes, each (H, W[, C]).
        labels: their labels, each (H, W) int.
        model_source: the model whose prediction was corrected (a built-in
            ``"built-in: <name>"`` or a checkpoint path); the pair trains only that model.
        predictions: per plane, what the model wrote before the user corrected it (the
            ``predictions`` of `napari_sgdc.train.finetune`), or None when the labels did
            not start from the model's mask.
        mpp: the image's µm per pixel to fine-tune at (`finetune(mpp=...)`): what the
            model ran with when it segmented the image; None: as the image is.
        types: per plane, the type table of its labels (nucleus types: int16 indexed by label
            id, 0 = no type), or None (untyped model, or types unknown).
        predicted_types: per plane, the type table of its prediction, or None.
    """

    image_name: str
    labels_name: str
    images: list[np.ndarray]
    labels: list[np.ndarray]
    model_source: str
    predictions: list[np.ndarray] | None = None
    mpp: float | None = None
    types: list[np.ndarray] | None = None
    predicted_types: list[np.ndarray] | None = None

    @property
    def key(self) -> tuple[str, str]:
        """(image name, model source): a newer pair with the same key replaces an older one."""
        return self.image_name, self.model_source

    @property
    def model_name(self) -> str:
        """Short model name: the built-in's name or the checkpoint's file name."""
        return Path(self.model_source).name

    @property
    def title(self) -> str:
        """Text in the training list: ``lesion ← mask (built-in: dermoscopy)`` for the image's own
        ``"<image> mask"``, else ``lesion ← <labels name> (<model>)``; a pair with a scale adds
        it: ``hne ← mask (built-in: nuclei, 0.5 µm/px)``."""
        planes = f", {len(self.images)} planes" if len(self.images) > 1 else ""
        labels = "mask" if self.labels_name == f"{self.image_name} mask" else self.labels_name
        scale = f", {self.mpp:g} µm/px" if self.mpp else ""
        return f"{self.image_name} ← {labels}{planes} ({self.model_name}{scale})"


def _table(table: np.ndarray, plane: np.ndarray) -> np.ndarray:
    """The part of a type table that plane `plane`'s ids index (a stack shares one table)."""
    return np.array(np.asarray(table)[:int(plane.max(initial=0)) + 1], np.int16)


def _retyped_planes(labels: np.ndarray, predicted: np.ndarray, types: np.ndarray | None,
                    predicted_types: np.ndarray | None) -> np.ndarray:
    """(N,) bool: planes holding an object whose type the user changed."""
    if types is None or predicted_types is None:
        return np.zeros(len(labels), bool)
    from napari_sgdc.train.corrections import retyped_pixels

    return np.array([retyped_pixels(plane, before, types, predicted_types).any()
                     for plane, before in zip(labels, predicted)], bool)


def collect_pair(planes: np.ndarray, labels: np.ndarray, *, image_shape: Sequence[int], image_name: str,
                 labels_name: str, model_source: str, predicted: np.ndarray | None = None,
                 mpp: float | None = None, types: np.ndarray | None = None,
                 predicted_types: np.ndarray | None = None) -> TrainingPair:
    """Validates an image/corrections pair and copies its corrected planes.

    Args:
        planes: (N, H, W[, C]) the image's planes (N = 1 for a 2-D image).
        labels: the corrections, of shape `image_shape`; 0 is background.
        image_shape: the image's shape without its colour axis, (*planes, H, W).
        image_name: name of the image (for the list and the messages).
        labels_name: name of the corrections.
        model_source: the model the corrections were made for.
        predicted: (N, H, W) what the model wrote into `labels`, when `labels` is the
            model's own mask: only planes that differ from it are kept (a plane the user
            erased completely is a correction too), each with its prediction.
        mpp: the image's µm per pixel, kept with the pair (`TrainingPair.mpp`).
        types: the type table of `labels` (ids unique across a stack's planes), or None.
        predicted_types: the type table of `predicted`: a plane where only types changed is
            a correction too.

    Returns:
        A `TrainingPair` of copies of the corrected planes (without `predicted`: the
        non-empty planes).

    Raises:
        InputError: shape mismatch, all background (without `predicted`), or no corrections.
    """
    image_shape, labels = tuple(int(n) for n in image_shape), np.asarray(labels)
    if tuple(labels.shape) != image_shape:
        raise InputError(
            f"Labels '{labels_name}' have shape {tuple(labels.shape)} but image '{image_name}' has shape "
            f"{image_shape}: they must match pixel for pixel."
        )
    label_planes = labels.reshape((-1, *image_shape[-2:]))  # (N, H, W)
    if len(planes) != len(label_planes):
        raise ValueError(f"{len(planes)} image planes but {len(label_planes)} label planes")
    if predicted is not None and np.shape(predicted) == label_planes.shape:
        predicted = np.asarray(predicted)
        keep = (label_planes != predicted).reshape(len(label_planes), -1).any(axis=1)
        keep |= _retyped_planes(label_planes, predicted, types, predicted_types)
        if not keep.any():
            raise InputError(
                f"No corrections in '{labels_name}': it still equals the model's prediction. "
                "Paint or erase on it first (or change a nucleus's type)."
            )
    else:
        predicted = predicted_types = None
        if not labels.any():
            raise InputError(f"Labels '{labels_name}' are all background (0): paint the objects first.")
        keep = label_planes.reshape(len(label_planes), -1).any(axis=1)
    indices = np.flatnonzero(keep)
    return TrainingPair(
        image_name=image_name,
        labels_name=labels_name,
        images=[np.array(planes[i]) for i in indices],
        labels=[np.array(label_planes[i]) for i in indices],
        model_source=model_source,
        predictions=None if predicted is None else [np.array(predicted[i]) for i in indices],
        mpp=mpp,
        types=None if types is None else [_table(types, label_planes[i]) for i in indices],
        predicted_types=None if predicted_types is None else [_table(predicted_types, predicted[i]) for i in indices],
    )


def split_by_model(pairs: Sequence[TrainingPair], model_source: str) -> tuple[list[TrainingPair], list[TrainingPair]]:
    """Splits `pairs` into those made for `model_source` and those made for other models."""
    kept = [pair for pair in pairs if pair.model_source == model_source]
    return kept, [pair for pair in pairs if pair.model_source != model_source]


@dataclass
class PairArrays:
    """Training pairs as the arrays `napari_sgdc.train.finetune` takes, one entry per plane.

    Attributes:
        images: (H, W[, C]) planes.
        labels: int32 instance ids (instance models; `napari_sgdc.data.targets.instance_ids`) or bool masks.
        predictions: what the model wrote, converted alike, or None per plane.
        mpp: the µm/px to fine-tune each plane at (`napari_sgdc.grid.usable_mpp`), or None.
        types, predicted_types: the type tables of `labels` and `predictions` (indexed by the
            converted ids), or None per plane (always None for a model without types).
    """

    images: list[np.ndarray]
    labels: list[np.ndarray]
    predictions: list[np.ndarray | None]
    mpp: list[float | None]
    types: list[np.ndarray | None] = field(default_factory=list)
    predicted_types: list[np.ndarray | None] = field(default_factory=list)


def _target(labels: np.ndarray, instances: bool) -> np.ndarray:
    if not instances:
        return labels > 0
    from napari_sgdc.data.targets import instance_ids  # here: the autosave imports this module without torch

    return instance_ids(labels)


def converted_types(labels: np.ndarray, ids: np.ndarray, table: np.ndarray | None) -> np.ndarray | None:
    """The type table of `labels` re-indexed by `ids`, their conversion (`instance_ids`: the
    same objects, perhaps renumbered); None stays None."""
    if table is None:
        return None
    labels, ids = np.asarray(labels), np.asarray(ids)
    table = np.asarray(table, np.int16).ravel()
    inside = (labels >= 0) & (labels < table.size)
    pixel_types = np.where(inside, table[np.where(inside, labels, 0).astype(np.int64)], 0)
    out = np.zeros(int(ids.max(initial=0)) + 1, np.int16)
    out[ids[ids > 0]] = pixel_types[ids > 0]  # every pixel of an object carries its type
    return out


def pair_arrays(pairs: Sequence[TrainingPair], config: Any) -> PairArrays:
    """Converts `pairs` into training targets for a model of `config` (``ModelConfig``): labels
    become instance ids for instance models and foreground masks otherwise; so do the predictions;
    the type tables follow the ids for a model with types (``config.has_types``), else are None."""
    instances = bool(config.is_instance)
    typed = instances and bool(getattr(config, "has_types", False))
    arrays = PairArrays([], [], [], [])
    for pair in pairs:
        count = len(pair.labels)
        predictions = pair.predictions or [None] * count
        types = pair.types if typed and pair.types is not None else [None] * count
        predicted_types = pair.predicted_types if typed and pair.predicted_types is not None else [None] * count
        for image, labels, prediction, table, predicted_table in zip(pair.images, pair.labels, predictions, types,
                                                                     predicted_types):
            arrays.images.append(image)
            arrays.labels.append(_target(labels, instances))
            arrays.predictions.append(None if prediction is None else _target(prediction, instances))
            arrays.mpp.append(usable_mpp(pair.mpp, config))
            arrays.types.append(converted_types(labels, arrays.labels[-1], table) if typed else None)
            arrays.predicted_types.append(None if prediction is None or not typed else
                                          converted_types(prediction, arrays.predictions[-1], predicted_table))
    return arrays


def is_pair_list(items: object) -> bool:
    """Whether `items` is a non-empty list or tuple of `TrainingPair`."""
    return isinstance(items, (list, tuple)) and bool(items) and all(isinstance(i, TrainingPair) for i in items)
