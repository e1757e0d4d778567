"""Fine-tuning on a few user-corrected images (the GUI's correct-and-retrain loop)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..config import PRESETS, TrainConfig
from ..data.datasets import Sample, SegmentationDataset
from ..data.targets import instance_ids
from ..data.transforms import resize_labels, to_uint8_rgb
from ..device import model_device
from ..grid import check_image_mpp, resample_image, working_shape
from ..locks import model_lock
from ..model import SGDCSegmenter
from ..training_pairs import TrainingPair, converted_types, is_pair_list, pair_arrays
from .corrections import (EDIT_BAND, EDIT_MARGIN, EDIT_WEIGHT, crop_to_edits, edited_pixels, loss_weight_map,
                          retyped_pixels)
from .fit import History, fit

__all__ = ["finetune", "finetune_config", "override_preset", "FOCUS_PROBABILITY"]

FOCUS_PROBABILITY = 0.9
"""Probability that a fine-tuning patch is centred on (jittered) labelled foreground, or on
edited pixels when the prediction the user started from is known."""


def _check_predictions(
    predictions: Sequence[np.ndarray | None] | None, labels: Sequence[np.ndarray]
) -> list[np.ndarray | None]:
    if predictions is None:
        return [None] * len(labels)
    if len(predictions) != len(labels):
        raise ValueError(f"finetune got {len(predictions)} predictions for {len(labels)} label arrays")
    checked = []
    for index, (prediction, label) in enumerate(zip(predictions, labels)):
        if prediction is not None:
            prediction = np.asarray(prediction)
            if prediction.shape != np.shape(label):
                raise ValueError(f"prediction {index} has shape {prediction.shape} but labels {index} "
                                 f"have {np.shape(label)}")
        checked.append(prediction)
    return checked


def _prepare_pairs(
    images: Sequence[np.ndarray], labels: Sequence[np.ndarray], instance: bool,
    predictions: Sequence[np.ndarray | None], types: Sequence[np.ndarray | None] | None = None,
) -> list[Sample]:
    if len(images) == 0 or len(labels) == 0:
        raise ValueError("finetune needs at least one (image, labels) pair; got none")
    if len(images) != len(labels):
        raise ValueError(f"finetune got {len(images)} images but {len(labels)} label arrays")
    samples = []
    types = types if types is not None else [None] * len(labels)
    for index, (image, label, prediction, table) in enumerate(zip(images, labels, predictions, types)):
        try:
            image_rgb = to_uint8_rgb(image)
        except ValueError as error:
            raise ValueError(f"image {index}: {error}") from None
        label = np.asarray(label)
        if label.ndim != 2:
            raise ValueError(f"labels {index} must be 2D (H, W), got shape {label.shape}")
        if not (label.dtype == bool or np.issubdtype(label.dtype, np.integer)):
            raise ValueError(f"labels {index} must be a mask or whole-number ids, got dtype {label.dtype} "
                             f"(shape {label.shape})")
        if label.shape != image_rgb.shape[:2]:
            raise ValueError(
                f"labels {index} have shape {label.shape} but image {index} is {image_rgb.shape[:2]}"
            )
        if prediction is None and not np.any(label > 0):  # erasing everything is a correction
            raise ValueError(f"labels {index} are all background; paint or correct some objects first")
        if instance and label.dtype != bool:
            mask = instance_ids(label)
        else:
            mask = label > 0
        table = converted_types(label, mask, table) if instance and label.dtype != bool else None
        samples.append(Sample(name=f"pair_{index}", image=image_rgb, mask=mask, types=table))
    return samples


def _check_tables(tables: Sequence[np.ndarray | None] | None, count: int, name: str) -> list[np.ndarray | None]:
    """One type table (or None) per image."""
    if tables is None:
        return [None] * count
    if len(tables) != count:
        raise ValueError(f"finetune got {len(tables)} {name} for {count} images")
    return [None if table is None else np.asarray(table).ravel() for table in tables]


def _to_working_size(sample: Sample, prediction: np.ndarray | None, config,
                     mpp: float | None) -> tuple[Sample, np.ndarray | None]:
    """The sample (and prediction) on the grid the network sees, as `segment(mpp=mpp)` makes it:
    resampled from `mpp` to the model's µm/px, or resized to its working resolution."""
    size = working_shape(*sample.image.shape[:2], config, mpp)
    if size == sample.image.shape[:2]:
        return sample, prediction
    resized = dataclasses.replace(sample, image=resample_image(sample.image, size), mask=resize_labels(sample.mask, size))
    return resized, None if prediction is None else resize_labels(prediction, size)


def _check_mpps(mpp: float | Sequence[float | None] | None, count: int, config) -> list[float | None]:
    """One µm/px (or None) per image; one line for a wrong count or a value `segment` rejects."""
    mpps = list(mpp) if isinstance(mpp, (list, tuple)) else [mpp] * count
    if len(mpps) != count:
        raise ValueError(f"finetune got {len(mpps)} mpp values for {count} images")
    for value in mpps:
        check_image_mpp(value, config)
    return mpps


def _focus_on_edits(
    samples: Sequence[Sample], predictions: Sequence[np.ndarray | None], instance: bool, crop_size: int,
    predicted_types: Sequence[np.ndarray | None] | None = None,
) -> tuple[list[Sample], list[np.ndarray | None]]:
    """Crops each sample with a prediction to its edits (plus `EDIT_MARGIN`) and weights them;
    an object whose type differs from its predicted type (`retyped_pixels`) is an edit too.

    Returns the samples and their loss-weight maps (None where there is no prediction).
    """
    kept, weights = [], []
    predicted_types = predicted_types or [None] * len(samples)
    for index, (sample, prediction, predicted_table) in enumerate(zip(samples, predictions, predicted_types)):
        if prediction is None:
            kept.append(sample)
            weights.append(None)
            continue
        retyped = retyped_pixels(sample.mask, prediction, sample.types, predicted_table) if instance else None
        crop = crop_to_edits(sample.image, sample.mask, prediction, EDIT_MARGIN, min_size=crop_size,
                             instance=instance, also=retyped)
        edited = edited_pixels(crop.labels, crop.prediction, instance=instance)
        if retyped is not None:
            top, left, bottom, right = crop.box
            edited |= retyped[top:bottom, left:right]
        if not edited.any():
            raise ValueError(f"labels {index} equal the model's prediction: nothing was corrected")
        kept.append(dataclasses.replace(sample, image=np.ascontiguousarray(crop.image),
                                        mask=np.ascontiguousarray(crop.labels)))
        weights.append(loss_weight_map(edited, EDIT_BAND, EDIT_WEIGHT))
    return kept, weights


def finetune_config(model: SGDCSegmenter, preset: str | TrainConfig = "quick") -> TrainConfig:
    """The settings `finetune` uses for `preset` on `model`.

    A preset name gives `napari_sgdc.config.PRESETS` ``[preset]`` with the model's own
    boundary target: ``boundary_width`` is taken from the training config stored in the
    model's checkpoint (``model.metadata["train_config"]``) when there is one, so
    fine-tuning does not redefine the boundaries the model learnt (the built-in
    ``nuclei`` model was trained with 2-pixel boundaries, the presets default to 3). A
    `TrainConfig` is used as it is.

    Raises:
        ValueError: an unknown preset name.
    """
    if isinstance(preset, TrainConfig):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown fine-tuning preset {preset!r}; choose one of {sorted(PRESETS)} or pass a TrainConfig")
    cfg = PRESETS[preset]
    trained = (getattr(model, "metadata", None) or {}).get("train_config") or {}
    width = trained.get("boundary_width") if isinstance(trained, dict) else None
    if isinstance(width, int) and not isinstance(width, bool) and width >= 1:
        cfg = dataclasses.replace(cfg, boundary_width=width)
    return cfg


def override_preset(preset: TrainConfig, *, steps: int, learning_rate: float, freeze_encoder: bool,
                    device: str = "auto") -> TrainConfig:
    """`preset` for one run of `steps` steps at decoder learning rate `learning_rate` (what the
    Fine-tune dock's advanced settings set).

    The encoder's learning rate keeps the preset's encoder/decoder ratio (0 when the preset
    has no decoder rate).

    Raises:
        ValueError: fewer than one step, or a learning rate that is not positive.
    """
    if int(steps) < 1 or not learning_rate > 0:
        raise ValueError(f"fine-tuning needs at least 1 step and a positive learning rate, got {steps} and "
                         f"{learning_rate}")
    ratio = preset.lr_encoder / preset.lr_decoder if preset.lr_decoder else 0.0
    return dataclasses.replace(preset, max_steps=int(steps), steps_per_epoch=int(steps), epochs=1,
                               lr_decoder=float(learning_rate), lr_encoder=float(learning_rate) * ratio,
                               freeze_encoder=bool(freeze_encoder), device=device)


def _from_pairs(model: SGDCSegmenter, pairs: Sequence[TrainingPair], *given):  # noqa: ANN001, ANN202
    """`finetune(model, pairs)`: the arrays of the pairs (`napari_sgdc.training_pairs.pair_arrays`)."""
    if any(value is not None for value in given):
        raise ValueError("finetune got TrainingPair objects and labels, predictions, mpp or types: the pairs carry "
                         "their own; pass the preset as preset=...")
    arrays = pair_arrays(pairs, model.config)
    return arrays.images, arrays.labels, arrays.predictions, arrays.mpp, arrays.types, arrays.predicted_types


@contextlib.contextmanager
def _restore_on_failure(model: SGDCSegmenter) -> Iterator[Callable[[], None]]:
    """Restores each module's train/eval mode and each parameter's ``requires_grad`` on
    exit; yields ``rollback()``, which puts back the weights and buffers, bit for bit,
    and is also called when the block raises."""
    saved = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    modes = [(module, module.training) for module in model.modules()]
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]

    @torch.no_grad()
    def rollback() -> None:
        for name, tensor in model.state_dict().items():
            tensor.copy_(saved[name])

    try:
        yield rollback
    except BaseException:
        rollback()
        raise
    finally:
        for module, training in modes:
            module.training = training
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def finetune(
    model: SGDCSegmenter,
    images: Sequence[np.ndarray] | Sequence[TrainingPair],
    labels: Sequence[np.ndarray] | None = None,
    preset: str | TrainConfig = "quick",
    *,
    predictions: Sequence[np.ndarray | None] | None = None,
    mpp: float | Sequence[float | None] | None = None,
    types: Sequence[np.ndarray | None] | None = None,
    predicted_types: Sequence[np.ndarray | None] | None = None,
    callbacks: Sequence[Callable[[dict], Any]] | None = None,
    cancel=None,
) -> History:
    """Fine-tunes `model` in place on corrected images.

    Training patches of ``cfg.crop_size`` are centred on labelled foreground (with a
    quarter-window jitter, so object borders and nearby background are included) with
    probability `FOCUS_PROBABILITY`, and placed anywhere otherwise; they get flips,
    rotations, mild scale and colour jitter (plus stain jitter when
    ``cfg.stain_jitter``). Pairs are first brought to the grid `segment` runs the network
    on: resampled from `mpp` to the model's µm/px (``ModelConfig.mpp``), or resized to its
    working resolution (``ModelConfig.resize_long_side``). Images smaller than the crop
    are reflect-padded. For instance models (``model.config.is_instance``) integer labels
    are used as instances, so boundaries between touching objects are learnt; otherwise
    ``labels > 0`` is the mask.

    With `predictions` (per image, the labels the user started correcting from, or
    None), the model learns most from what the user changed (see
    `napari_sgdc.train.corrections`): the edited pixels are ``labels != prediction``
    (compared as instances for instance models, as foreground otherwise); training
    uses only the edited bounding box plus `EDIT_MARGIN` pixels (at least one patch),
    edited pixels and a band of `EDIT_BAND` pixels around them weigh `EDIT_WEIGHT` in
    the loss, and patches are centred on edits with probability `FOCUS_PROBABILITY`.
    All of it happens at the model's working resolution. Labels that are all
    background are accepted there (the user erased false objects).

    With the default ``device="auto"`` of the presets, training runs on the device the
    model is already on. No validation and no checkpoint files. The model's lock
    (`napari_sgdc.locks.model_lock`) is held throughout; every module's train/eval mode
    and every ``requires_grad`` flag are as before afterwards. A run that fails or is
    cancelled leaves the weights (and BatchNorm buffers) exactly as they were.

    Args:
        model: the segmenter to update.
        images: images (H, W), (H, W, 3) or (H, W, 4) of any dtype `to_float_rgb` accepts; or
            the training pairs (`napari_sgdc.training_pairs.TrainingPair`, e.g. the Fine-tune
            dock's list), which carry their labels, predictions and µm/px: then leave
            `labels`, `predictions` and `mpp` out.
        labels: per image (H, W) labels: a mask or an instance map (> 0 = foreground).
        preset: ``quick`` or ``standard`` (see `napari_sgdc.config.PRESETS`, with the
            model's own boundary width: `finetune_config`) or a `TrainConfig`.
        predictions: optional, per image, the (H, W) labels or mask the corrections
            started from (None entries: no prediction known, the whole image counts).
        mpp: the images' µm per pixel (one value, or one per image; None: the model's own
            scale), as `segment(mpp=...)` takes it, so a correction made on a 20× image
            teaches a 40× model nuclei at the size it sees them.
        types: for a model with nucleus types (``ModelConfig.type_names``), per image the type
            table of its labels (indexed by label id, 1..T; 0 = unknown: no type loss there),
            or None (types unknown); ignored by models without types.
        predicted_types: per image the type table of its prediction: objects whose type
            differs from it are edits, weighted (and focused on) like corrected outlines.
        callbacks: forwarded to `fit` (step and epoch events).
        cancel: `threading.Event`; honoured within one step.

    Returns:
        the `History` (``losses`` holds the loss of every step; ``cancelled`` when the
        run was cancelled and the weights were restored).

    Raises:
        ValueError: one clear line for no pairs, a count or shape mismatch, labels that are
            all background (without a prediction) or equal to their prediction, an `mpp`
            the model cannot use (see `napari_sgdc.grid.check_image_mpp`), or an unknown preset.
        Exception: whatever stopped `fit` (e.g. `TrainingDiverged`), after the model was restored.
    """
    cfg = finetune_config(model, preset)
    instance = model.config.is_instance
    if is_pair_list(images):
        images, labels, predictions, mpp, types, predicted_types = _from_pairs(
            model, images, labels, predictions, mpp, types, predicted_types)
    elif labels is None:
        raise ValueError("finetune needs labels for the images (or a list of TrainingPair as images)")
    predictions = _check_predictions(predictions, labels)
    typed = model.config.has_types
    types = _check_tables(types if typed else None, len(labels), "type tables")
    predicted_types = _check_tables(predicted_types if typed else None, len(labels), "predicted type tables")
    predicted_types = [None if table is None or prediction is None else converted_types(prediction,
                       instance_ids(prediction), table) for table, prediction in zip(predicted_types, predictions)]
    samples = _prepare_pairs(images, labels, instance, predictions, types)
    mpps = _check_mpps(mpp, len(samples), model.config)
    resized = [_to_working_size(sample, prediction, model.config, image_mpp)
               for sample, prediction, image_mpp in zip(samples, predictions, mpps)]
    samples, predictions = [pair[0] for pair in resized], [pair[1] for pair in resized]
    samples, weights = _focus_on_edits(samples, predictions, instance, cfg.crop_size, predicted_types)
    dataset = SegmentationDataset(
        samples, crop_size=cfg.crop_size, augment=True, boundary_width=cfg.boundary_width,
        stain_jitter=cfg.stain_jitter, task="instance" if instance else "semantic",
        scale_range=(0.85, 1.18), foreground_prob=FOCUS_PROBABILITY, seed=cfg.seed,
        aspect_jitter=cfg.aspect_jitter, artifacts=cfg.artifacts, instance_map=model.config.instance_map,
        weights=weights if any(weight is not None for weight in weights) else None, types=typed,
    )
    device = model_device(model) if cfg.device == "auto" else None
    with model_lock(model), _restore_on_failure(model) as rollback:
        history = fit(model, dataset, None, cfg, callbacks=callbacks, cancel=cancel, out=None, device=device)
        if history.cancelled:
            rollback()
    return history
