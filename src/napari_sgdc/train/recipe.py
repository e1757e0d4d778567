"""Training from a config and dataset layouts: what ``napari-sgdc train`` runs, callable from Python.

`train_from_config` reads the YAML (or dicts), applies overrides, checks the settings
before any data is read, loads the training and validation splits of the layouts (see
`napari_sgdc.data.datasets.LAYOUT_TABLE`), trains with `fit` and, for instance models
with validation images, tunes the post-processing defaults of the saved checkpoint.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..config import ModelConfig, TrainConfig
from .fit import History, check_train_config, seed_everything

__all__ = ["TrainResult", "load_config_sections", "model_config_for", "train_config_for", "train_from_config"]

ConfigSource = str | Path | Mapping[str, Mapping[str, Any]] | None


@dataclass
class TrainResult:
    """What `train_from_config` did.

    Attributes:
        history: the `fit` history (``cancelled`` when the run stopped early).
        out: the best checkpoint's path.
        task: ``semantic`` or ``instance``.
        n_train: training images.
        n_val: validation images.
        model_config: the trained model's config (after tuning, its tuned defaults).
        train_config: the run's settings.
        tuning: the post-processing search (`tune_postprocess`), or None when not tuned.
    """

    history: History
    out: Path
    task: str
    n_train: int
    n_val: int
    model_config: ModelConfig
    train_config: TrainConfig
    tuning: dict | None = None

    @property
    def cancelled(self) -> bool:
        return self.history.cancelled


def load_config_sections(config: ConfigSource) -> tuple[dict, dict]:
    """The ``model:`` and ``train:`` sections of a YAML file or a mapping ({} when None).

    Raises:
        ValueError: the config holds anything else (one line naming it).
    """
    if config is None:
        return {}, {}
    if isinstance(config, Mapping):
        content, name = dict(config), "the config"
    else:
        import yaml

        with open(config) as stream:
            content, name = yaml.safe_load(stream) or {}, str(config)
    if not isinstance(content, dict) or set(content) - {"model", "train"}:
        raise ValueError(f"{name}: a config YAML holds only 'model:' and 'train:' sections")
    return dict(content.get("model") or {}), dict(content.get("train") or {})


def model_config_for(values: Mapping[str, Any], task: str, layout: str) -> ModelConfig:
    """The `ModelConfig` of `values` for `task`, with the layout's class names by default, and
    its nucleus types for an instance model on a layout that has them (CoNSeP)."""
    from ..data.datasets import layout_info
    from ..model import tiny_config

    values = {**values, "task": task}
    info = layout_info(layout)
    values.setdefault("class_names", info.class_names(task))
    if task == "instance" and info.types and "type_names" not in values:  # `type_names: []` opts out
        values.update(type_names=info.types, type_colors=info.type_colors)
    if values.get("encoder") == "mini":
        return tiny_config(**values)
    return ModelConfig.from_dict(values)


def train_config_for(values: Mapping[str, Any], layout: str) -> TrainConfig:
    """The checked `TrainConfig` of `values`, with the layout's defaults: stain jitter on
    H&E layouts and the checkpoint picked by AJI for instance models, IoU otherwise.

    Raises:
        ValueError: a setting `fit` cannot run (one line naming it).
    """
    from ..data.datasets import layout_info

    values = {"stain_jitter": layout_info(layout).stain_jitter, "select_metric": "auto", **values}
    config = TrainConfig.from_dict(values)
    check_train_config(config)
    return config


def train_from_config(
    config: ConfigSource,
    data: str | Path,
    layout: str,
    out: str | Path,
    *,
    model_overrides: Mapping[str, Any] | None = None,
    train_overrides: Mapping[str, Any] | None = None,
    train_splits: Sequence[str] = ("train",),
    val_split: str | None = "val",
    also: Sequence[tuple[str, str | Path]] = (),
    also_val: Sequence[tuple[str, str | Path]] = (),
    max_images: int | None = None,
    max_val_images: int | None = None,
    task: str | None = None,
    resume: str | Path | bool | None = None,
    tune: bool = True,
    events: Callable[[dict], Any] | None = None,
    cancel: threading.Event | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Trains an SGDC segmenter on dataset layouts and saves the best checkpoint at `out`.

    Args:
        config: a YAML path or a mapping with ``model:`` and ``train:`` sections
            (`ModelConfig` / `TrainConfig` fields), or None for the defaults.
        data: the dataset folder.
        layout: its layout (`napari_sgdc.data.datasets.LAYOUTS`).
        out: the checkpoint path (``.safetensors``); see `fit` for the files next to it.
        model_overrides, train_overrides: fields that replace the config's.
        train_splits: the splits of `data` to train on.
        val_split: the split of `data` to validate on, or None / ``"none"``.
        also: (layout, folder) pairs whose ``train`` split is added to training.
        also_val: (layout, folder) pairs whose ``val`` split is added to validation.
        max_images: train on the first N images of `data` only (None or 0: all).
        max_val_images: validate on the first N images of each set only (None or 0: all).
        task: ``semantic`` or ``instance`` (None: the layout's, or guessed from the labels).
        resume: continue an interrupted run: True (from `out`) or a checkpoint/state path.
        tune: tune an instance model's post-processing defaults on validation afterwards.
        events: called with `fit`'s ``step`` and ``epoch`` events, plus ``{"kind": "start",
            "encoder", "block", "task", "n_train", "n_val"}`` before training, ``{"kind":
            "trained", "history"}`` after it and ``{"kind": "tuned", "tuning"}`` after tuning.
        cancel: once set, the run stops (after loading data, or after the current step) and
            returns with ``result.cancelled``; `fit` saves its state for `resume`.
        provenance: extra provenance stored in the checkpoint.

    Raises:
        ValueError: bad settings (before any data is read), a missing dataset or no
            training images (one line each).
        FileNotFoundError: `resume` has no training state.
    """
    emit = events or (lambda event: None)
    model_values, train_values = load_config_sections(config)
    train_cfg = train_config_for({**train_values, **(train_overrides or {})}, layout)
    out = Path(out)
    resume_path = None if resume is None or resume is False else out if resume is True else Path(resume)
    train_samples, val_samples, task = _load_splits(data, layout, train_splits, val_split, also, also_val,
                                                    max_images or None, max_val_images or None, task)
    model_cfg = model_config_for({**model_values, **(model_overrides or {})}, task, layout)
    train_data, val_data = _datasets(train_samples, val_samples, model_cfg, train_cfg, task)
    sizes = {"n_train": len(train_samples), "n_val": len(val_samples)}
    result = TrainResult(History(cancelled=True), out, task, model_config=model_cfg, train_config=train_cfg, **sizes)
    if cancel is not None and cancel.is_set():
        return result
    from ..model import build_model
    from . import fit as run_fit  # the package's `fit`, looked up per call (it can be patched there)

    seed_everything(train_cfg.seed)  # before build_model, so the seed also fixes the initial weights
    model = build_model(model_cfg)
    if train_cfg.init and resume_path is None:
        from ..checkpoints import init_from_checkpoint

        fresh = init_from_checkpoint(model, train_cfg.init)
        emit({"kind": "init", "source": train_cfg.init, "fresh": fresh})
    emit({"kind": "start", "encoder": model_cfg.encoder, "block": model_cfg.block, "task": task, **sizes})
    record = {"command": "napari_sgdc.train.train_from_config", **dict(provenance or {}), "data": str(data),
              "layout": layout, "train_splits": ",".join(train_splits), "also": [list(map(str, p)) for p in also],
              "also_val": [list(map(str, p)) for p in also_val], "max_images": max_images, **sizes}
    result.history = run_fit(model, train_data, val_data, train_cfg, callbacks=[emit], cancel=cancel, out=out,
                             resume=resume_path, provenance=record)
    if result.cancelled:
        return result
    emit({"kind": "trained", "history": result.history})
    if tune and val_data is not None and model_cfg.is_instance and out.is_file():
        from .tune import TUNED_FIELDS, write_tuned_checkpoint

        result.tuning = write_tuned_checkpoint(out, out, val_data, train_cfg.device)
        result.model_config = dataclasses.replace(model_cfg, **{name: result.tuning[name] for name in TUNED_FIELDS})
        emit({"kind": "tuned", "tuning": result.tuning})
    return result


def _load_splits(data, layout, train_splits, val_split, also, also_val, max_images, max_val_images, task):
    """(training samples, validation samples, task) of the run's datasets."""
    from ..data import load_samples

    train_samples = []
    for split in filter(None, (part.strip() for part in train_splits)):
        train_samples += load_samples(data, layout, split, task=task)
    train_samples = train_samples[:max_images] if max_images else train_samples
    if not train_samples:
        raise ValueError(f"no training images found in {data} (layout {layout})")
    task = task or ("instance" if train_samples[0].is_instance else "semantic")
    for extra_layout, folder in also:
        train_samples += load_samples(folder, extra_layout, "train", task=task)
    val_samples = []
    if val_split not in (None, "none"):
        val_samples = load_samples(data, layout, val_split, max_images=max_val_images, task=task)
    for extra_layout, folder in also_val:
        val_samples += load_samples(folder, extra_layout, "val", max_images=max_val_images, task=task)
    return train_samples, val_samples, task


def _datasets(train_samples, val_samples, model_cfg: ModelConfig, train_cfg: TrainConfig, task: str):
    """The augmented training dataset and the whole-image validation dataset (None without images)."""
    from ..data import SegmentationDataset, resize_samples
    from ..data.datasets import validation_dataset

    train_data = SegmentationDataset(resize_samples(train_samples, model_cfg.resize_long_side),
                                     crop_size=train_cfg.crop_size, augment=True,
                                     boundary_width=train_cfg.boundary_width, stain_jitter=train_cfg.stain_jitter,
                                     task=task, seed=train_cfg.seed, aspect_jitter=train_cfg.aspect_jitter,
                                     artifacts=train_cfg.artifacts, instance_map=model_cfg.instance_map,
                                     types=model_cfg.has_types)
    val_data = None
    if val_samples:
        val_data = validation_dataset(val_samples, model_cfg, boundary_width=train_cfg.boundary_width)
    return train_data, val_data
