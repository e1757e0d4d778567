"""The single training loop used by the CLI, the GUI (through `finetune`) and the tests.

`fit` trains an `SGDCSegmenter` (see `napari_sgdc.model`): ``model(x)`` with ``x``
(B, 3, H, W) RGB in [0, 1] returns ``mask`` and ``edge`` (B, 1, H, W) logits,
``model.config`` is its `ModelConfig` and ``model.param_groups`` its optimiser groups.

Files written when ``out`` is given (``out = run/model.safetensors``):

* ``run/model.safetensors``: the best checkpoint (best validation metric, see
  `TrainConfig.select_metric`, or the latest epoch without validation);
* ``run/model.last.safetensors``: the latest epoch's weights (a normal checkpoint);
* ``run/model.last.pt``: the training state for ``resume`` (see `napari_sgdc.train.state`).

All files are written atomically; stale temporaries of a killed save are removed when
the next run starts. A cancelled run writes the two ``last`` files at the step where it
stopped (when it made any step), so it can be resumed.
"""

from __future__ import annotations

import dataclasses
import math
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..config import TrainConfig
from ..device import DEVICES, forward, memory_format, resolve_device
from ..checkpoints import save_checkpoint
from ..locks import model_lock
from ..model import SGDCSegmenter
from .losses import total_loss, type_class_weights
from .state import (
    last_checkpoint_path_for, load_train_state, remove_stale_temporaries, save_train_state, state_path_for,
)
from .validate import validate

__all__ = ["History", "SELECT_METRICS", "TrainingDiverged", "check_train_config", "fit", "seed_everything"]

SELECT_METRICS = {"iou": "max", "dice": "max", "aji": "max", "loss": "min"}
"""Validation metrics that can pick the best checkpoint, and their direction. ``auto``:
``aji`` for instance models, ``iou`` otherwise."""
_STREAM_SALT = 7919  # separates the batch-order stream from the per-item augmentation streams
_COUNTS = {"epochs": 1, "batch_size": 1, "max_steps": 0, "steps_per_epoch": 0, "warmup_steps": 0,
           "val_every": 0, "boundary_width": 1, "num_workers": 0, "seed": 0}  # whole numbers and their minimum
_RATES = ("lr_decoder", "lr_encoder", "weight_decay", "grad_clip", "edge_weight", "l2sp", "type_weight",
          "type_balance")  # finite and >= 0


@dataclass
class History:
    """What a `fit` run did.

    Attributes:
        steps: optimiser steps completed (the global step; continues across resume).
        total_steps: steps the run was planned for.
        losses: training loss of every step (including steps before a resume).
        loss_parts: per step ``{"mask": float, "edge": float}``, plus ``"l2sp"`` (the
            penalty ``λ Σ ‖w − w_start‖²``, included in the loss) when ``cfg.l2sp > 0``.
        epoch_losses: mean training loss of every completed epoch.
        val_metrics: per validation ``{"epoch", "step", "iou", "dice", "val_loss"}`` plus
            ``"aji"`` for instance models (means over the validation images, see `validate`).
        select_metric: the metric that picked the best checkpoint (None without validation).
        best_metric: its best value (None without validation).
        best_epoch: epoch (0-based) of the best metric.
        cancelled: the run stopped early because `cancel` was set.
        elapsed_s: wall time of this call.
        checkpoint: path of the best checkpoint (None without ``out``).
        last_checkpoint: path of the ``last`` checkpoint (None without ``out``).
    """

    steps: int = 0
    total_steps: int = 0
    losses: list[float] = field(default_factory=list)
    loss_parts: list[dict[str, float]] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)
    val_metrics: list[dict[str, float]] = field(default_factory=list)
    select_metric: str | None = None
    best_metric: float | None = None
    best_epoch: int | None = None
    cancelled: bool = False
    elapsed_s: float = 0.0
    checkpoint: Path | None = None
    last_checkpoint: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key in ("checkpoint", "last_checkpoint"):
            data[key] = None if data[key] is None else str(data[key])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "History":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        for key in ("checkpoint", "last_checkpoint"):
            if values.get(key) is not None:
                values[key] = Path(values[key])
        return cls(**values)


def seed_everything(seed: int) -> None:
    """Seeds Python, NumPy and torch (call it before building a model for a reproducible run)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class TrainingDiverged(ValueError):
    """The training loss became NaN or infinite (the message names the learning rates)."""


def check_train_config(cfg: TrainConfig) -> None:
    """Raises ValueError, one line naming the setting, for a config `fit` cannot run."""
    for name, least in _COUNTS.items():
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise ValueError(f"{name} must be a whole number >= {least}, got {value!r}")
    crop = cfg.crop_size
    if isinstance(crop, bool) or not isinstance(crop, (int, np.integer)) or crop <= 0 or crop % 32:
        raise ValueError(f"crop_size must be a positive multiple of 32, got {crop!r}")
    for name in _RATES:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) \
                or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if isinstance(cfg.aspect_jitter, bool) or not isinstance(cfg.aspect_jitter, (int, float, np.number)) \
            or not 1.0 <= cfg.aspect_jitter <= 4.0:
        raise ValueError(f"aspect_jitter must be a number from 1 (off) to 4, got {cfg.aspect_jitter!r}")
    if not isinstance(cfg.artifacts, bool):
        raise ValueError(f"artifacts must be true or false, got {cfg.artifacts!r}")
    if cfg.select_metric not in (*SELECT_METRICS, "auto"):
        raise ValueError(f"select_metric must be one of {['auto', *SELECT_METRICS]}, got {cfg.select_metric!r}")
    smallest_map = cfg.batch_size * (cfg.crop_size // 32) ** 2  # values per channel at stride 32
    if smallest_map < 2 and not cfg.freeze_batchnorm:
        raise ValueError(f"batch_size {cfg.batch_size} with crop_size {cfg.crop_size} leaves one value per channel "
                         "at stride 32, too few for BatchNorm statistics: use batch_size >= 2 or crop_size >= 64")
    if str(cfg.device).lower().split(":")[0] not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {cfg.device!r}")


def _select_metric(cfg: TrainConfig, model: SGDCSegmenter, validating: bool) -> str | None:
    if not validating:
        return None
    if cfg.select_metric == "auto":
        return "aji" if model.config.is_instance else "iou"
    if cfg.select_metric == "aji" and not model.config.is_instance:
        raise ValueError("select_metric 'aji' needs an instance model (ModelConfig.task = 'instance')")
    return cfg.select_metric


def _epoch_indices(n_items: int, n_needed: int, seed: int, epoch: int) -> list[int]:
    """Shuffled item indices for one epoch: concatenated permutations, cut to `n_needed`."""
    rng = np.random.default_rng([seed, epoch, _STREAM_SALT])
    chunks, count = [], 0
    while count < n_needed:
        chunks.append(rng.permutation(n_items))
        count += n_items
    return np.concatenate(chunks)[:n_needed].tolist()


def _lr_lambda(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up over `warmup_steps`, then cosine decay to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _set_train_mode(model: SGDCSegmenter, freeze_encoder: bool, freeze_batchnorm: bool) -> None:
    model.train()
    if freeze_encoder:
        model.encoder.eval()  # BatchNorm statistics stay fixed
    if freeze_batchnorm:
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()  # running statistics stay those of the base model


def _optimizer(model: SGDCSegmenter, cfg: TrainConfig, total_steps: int):
    """AdamW over the model's parameter groups and its warm-up + cosine schedule."""
    optimizer = torch.optim.AdamW(model.param_groups(cfg.lr_encoder, cfg.lr_decoder), weight_decay=cfg.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.warmup_steps, total_steps))


def _resumed(history: History, saved: dict) -> History:
    """The saved history, continued with this call's plan and output paths."""
    previous = History.from_dict(saved)
    same_metric = previous.select_metric in (None, history.select_metric)
    return dataclasses.replace(
        previous, total_steps=history.total_steps, select_metric=history.select_metric, cancelled=False,
        elapsed_s=0.0, checkpoint=history.checkpoint, last_checkpoint=history.last_checkpoint,
        best_metric=previous.best_metric if same_metric else None,
        best_epoch=previous.best_epoch if same_metric else None)


@dataclass
class _Run:
    """What the steps of one `fit` call share."""

    model: SGDCSegmenter
    cfg: TrainConfig
    device: torch.device
    history: History
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    steps_per_epoch: int
    callbacks: list[Callable[[dict], Any]]
    provenance: dict
    anchor: list[tuple[torch.nn.Parameter, torch.Tensor]] = field(default_factory=list)  # L2-SP: (w, w_start)
    type_weights: torch.Tensor | None = None  # the type loss's class weights c_t
    started: float = field(default_factory=time.perf_counter)
    steps_this_call: int = 0

    @property
    def n_epochs(self) -> int:
        return math.ceil(self.history.total_steps / self.steps_per_epoch)

    def emit(self, kind: str, epoch: int, loss: float, metrics: dict[str, float]) -> None:
        history = self.history
        seconds_per_step = (time.perf_counter() - self.started) / max(1, self.steps_this_call)
        event = {"kind": kind, "step": history.steps, "total_steps": history.total_steps, "epoch": epoch,
                 "epochs": self.n_epochs, "loss": loss, "metrics": metrics,
                 "eta_s": seconds_per_step * (history.total_steps - history.steps),
                 "lr": self.optimizer.param_groups[-1]["lr"]}
        for callback in self.callbacks:
            callback(event)

    def save(self, path: Path | None, kind: str, metrics: dict[str, float], epoch: int) -> None:
        if path is not None:
            save_checkpoint(path, self.model, train_config=self.cfg,
                            metrics={**metrics, "epoch": epoch, "step": self.history.steps},
                            provenance={**self.provenance, "kind": kind})

    def save_last(self, epoch: int) -> None:
        """The ``last`` checkpoint and the training state (nothing before the first step)."""
        history = self.history
        if history.last_checkpoint is None or history.steps == 0:
            return
        self.save(history.last_checkpoint, "last", {}, epoch)
        save_train_state(state_path_for(history.last_checkpoint), self.model, self.optimizer, self.scheduler,
                         step=history.steps, epoch=epoch, history=history.to_dict(), cfg=self.cfg)


def _l2sp_penalty(run: _Run) -> torch.Tensor:
    """``cfg.l2sp · Σ ‖w − w_start‖²`` over the trainable weights (a scalar in the autograd graph)."""
    return run.cfg.l2sp * sum(((weight - start) ** 2).sum() for weight, start in run.anchor)


def _train_step(run: _Run, batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, float]]:
    """One optimiser step; returns the loss and its parts."""
    cfg, device = run.cfg, run.device
    keys = [key for key in ("mask", "edge", "weight", "distance", "hover", "type") if key in batch]
    targets = {key: batch[key].to(device, non_blocking=True) for key in keys}  # (B, 1 or 2, h, w)
    outputs = forward(run.model, batch["image"], device, cfg.amp)  # (B, 3, h, w) in
    loss, parts = total_loss(outputs, targets, cfg.edge_weight, run.model.config.edge_supervision,
                             cfg.type_weight, run.type_weights)
    if run.anchor:
        penalty = _l2sp_penalty(run)
        parts["l2sp"] = float(penalty.detach())
        loss = loss + penalty
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for g in run.optimizer.param_groups for p in g["params"]], cfg.grad_clip)
    run.optimizer.step()
    run.scheduler.step()
    return float(loss.detach()), parts


def _type_weights(model: SGDCSegmenter, train_data: Dataset, cfg: TrainConfig) -> torch.Tensor | None:
    """The type loss's class weights from the training set's type pixels (None: no types)."""
    from ..data.datasets import type_pixel_counts

    n_types = len(model.config.type_names)
    if not n_types or not hasattr(train_data, "samples"):
        return None
    return type_class_weights(type_pixel_counts(train_data, n_types), cfg.type_balance)


def _run_epoch(run: _Run, train_data: Dataset, epoch: int, cancel: threading.Event | None) -> list[float]:
    """Trains `epoch` from the current step to its end (or to the cancel); returns the step losses."""
    cfg, history = run.cfg, run.history
    if hasattr(train_data, "set_epoch"):
        train_data.set_epoch(epoch, seed=cfg.seed)
    epoch_start = epoch * run.steps_per_epoch
    epoch_end = min(epoch_start + run.steps_per_epoch, history.total_steps)
    indices = _epoch_indices(len(train_data), run.steps_per_epoch * cfg.batch_size, cfg.seed, epoch)
    order = indices[(history.steps - epoch_start) * cfg.batch_size:(epoch_end - epoch_start) * cfg.batch_size]
    loader = DataLoader(train_data, batch_size=cfg.batch_size, sampler=order, num_workers=cfg.num_workers,
                        pin_memory=run.device.type == "cuda")
    _set_train_mode(run.model, cfg.freeze_encoder, cfg.freeze_batchnorm)
    losses = []
    for batch in loader:
        if cancel is not None and cancel.is_set():
            history.cancelled = True
            break
        loss, parts = _train_step(run, batch)
        history.steps += 1
        run.steps_this_call += 1
        if not math.isfinite(loss):
            raise TrainingDiverged(f"training loss became {loss} at step {history.steps}: lower the learning rate "
                                   f"(lr_decoder={run.cfg.lr_decoder:g}, lr_encoder={run.cfg.lr_encoder:g})")
        history.losses.append(loss)
        history.loss_parts.append(parts)
        losses.append(loss)
        run.emit("step", epoch, loss, {f"loss_{name}": value for name, value in parts.items()})
    return losses


def _record_validation(run: _Run, epoch: int, scores: dict[str, float]) -> None:
    """Adds `scores` to the history and saves the best checkpoint when they are the best yet."""
    history = run.history
    history.val_metrics.append({"epoch": epoch, "step": history.steps, **scores})
    if "split_level" in scores:  # the tuned marker level travels with the weights it was tuned for
        run.model.config.split_level = scores["split_level"]
    name = history.select_metric
    value = scores["val_loss" if name == "loss" else name]
    best = history.best_metric
    if best is None or (value > best if SELECT_METRICS[name] == "max" else value < best):
        history.best_metric, history.best_epoch = value, epoch
        run.save(history.checkpoint, "best", scores, epoch)


def fit(
    model: SGDCSegmenter,
    train_data: Dataset,
    val_data: Dataset | None = None,
    cfg: TrainConfig | None = None,
    *,
    callbacks: Sequence[Callable[[dict], Any]] | None = None,
    cancel: threading.Event | None = None,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    provenance: dict | None = None,
    device: str | torch.device | None = None,
) -> History:
    """Trains `model` in place, holding its `napari_sgdc.locks.model_lock` throughout.

    AdamW over ``model.param_groups(cfg.lr_encoder, cfg.lr_decoder)``, linear warm-up for
    ``cfg.warmup_steps`` then cosine decay to 0 (per step); bf16 autocast when ``cfg.amp`` and the device runs bf16 natively (`napari_sgdc.device.autocast`);
    gradient clipping at ``cfg.grad_clip``; loss `total_loss` (per-pixel weighted when the
    items carry ``weight``) plus, when ``cfg.l2sp > 0``, the L2-SP penalty
    ``cfg.l2sp · Σ ‖w − w_start‖²`` over the trainable weights, ``w_start`` being the
    model's weights when `fit` was called (before a resumed state is loaded); ``channels_last``.

    An epoch is ``cfg.steps_per_epoch`` steps (or ``len(train_data) // batch_size``, at
    least 1); the run lasts ``cfg.epochs`` epochs, capped at ``cfg.max_steps`` when set.
    Batches come from per-epoch permutations seeded by ``(cfg.seed, epoch)`` and
    augmentation is seeded per item (``set_epoch``), so on CPU a run is reproducible and
    a resumed run continues exactly where the interrupted one stopped. Validation (see
    `validate`) runs every ``cfg.val_every`` epochs and after the last one.

    Args:
        model: the segmenter; moved to the device, left in eval mode with its
            ``requires_grad`` flags restored.
        train_data: items with ``image`` (3, h, w), ``mask`` and ``edge`` (1, h, w) of one
            size, optionally ``weight`` (1, h, w) per-pixel loss weights.
        val_data: validation items (sizes may differ), or None.
        cfg: the run's settings (default `TrainConfig()`), checked by `check_train_config`.
        callbacks: called with ``{"kind": "step"|"epoch", "step", "total_steps", "epoch",
            "epochs", "loss", "metrics", "eta_s", "lr"}``; step events carry ``metrics =
            {"loss_mask", "loss_edge"}`` plus ``loss_distance`` / ``loss_hover`` / ``loss_l2sp``
            when those terms are on, epoch events ``{"train_loss"}`` plus the validation
            scores when validated.
        cancel: checked before every step; once set the run stops and returns with
            ``cancelled=True``.
        out: best-checkpoint path (``.safetensors``); see the module docstring.
        resume: a path written by an earlier run with ``out`` (checkpoint, ``.last.safetensors``
            or ``.last.pt``): weights, optimiser, scheduler, step and history continue from there.
        provenance: extra provenance stored in the checkpoints.
        device: overrides ``cfg.device``.

    Raises:
        ValueError: a bad config, an empty dataset, or ``select_metric="aji"`` for a
            semantic model.
        FileNotFoundError: ``resume`` has no training state.
        napari_sgdc.checkpoints.CheckpointError: the training state is unreadable or does not fit.
        TrainingDiverged: the loss becomes NaN or infinite (a ValueError naming the learning rates).
    """
    cfg = cfg or TrainConfig()
    check_train_config(cfg)
    if len(train_data) == 0:
        raise ValueError("training dataset is empty")
    validating = val_data is not None and len(val_data) > 0 and cfg.val_every > 0
    started = time.perf_counter()
    history = History(select_metric=_select_metric(cfg, model, validating))
    device = resolve_device(device if device is not None else cfg.device)
    seed_everything(cfg.seed)
    steps_per_epoch = cfg.steps_per_epoch or max(1, len(train_data) // cfg.batch_size)
    history.total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps > 0:
        history.total_steps = min(history.total_steps, cfg.max_steps)
    if out is not None:
        history.checkpoint, history.last_checkpoint = Path(out), last_checkpoint_path_for(out)
        remove_stale_temporaries(out)
    with model_lock(model):
        requires_grad = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
        try:
            model.to(device)
            model.to(memory_format=memory_format(device))
            if cfg.freeze_encoder:
                model.encoder.requires_grad_(False)
            anchor = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad] if cfg.l2sp > 0 else []
            optimizer, scheduler = _optimizer(model, cfg, history.total_steps)
            if resume is not None:
                history = _resumed(history, load_train_state(state_path_for(resume), model, optimizer, scheduler))
            run = _Run(model, cfg, device, history, optimizer, scheduler, steps_per_epoch,
                       list(callbacks or []), dict(provenance or {}), anchor, _type_weights(model, train_data, cfg))
            for epoch in range(history.steps // steps_per_epoch, run.n_epochs):
                if history.steps >= history.total_steps:
                    break
                step_losses = _run_epoch(run, train_data, epoch, cancel)
                metrics: dict[str, float] = {}
                if not history.cancelled and step_losses:
                    metrics["train_loss"] = float(np.mean(step_losses))
                    history.epoch_losses.append(metrics["train_loss"])
                last_epoch = history.steps >= history.total_steps
                if not history.cancelled and validating and ((epoch + 1) % cfg.val_every == 0 or last_epoch):
                    scores = validate(model, val_data, device=device, amp=cfg.amp, edge_weight=cfg.edge_weight,
                                      cancel=cancel)
                    history.cancelled = scores is None
                    if scores is not None:
                        metrics.update(scores)
                        _record_validation(run, epoch, scores)
                elif not history.cancelled and not validating:
                    run.save(history.checkpoint, "latest", metrics, epoch)
                run.save_last(epoch)
                if history.cancelled:
                    break
                run.emit("epoch", epoch, metrics.get("train_loss", float("nan")), metrics)
        finally:
            for parameter, flag in requires_grad:
                parameter.requires_grad_(flag)
            model.eval()
            history.elapsed_s = time.perf_counter() - started
    return history
