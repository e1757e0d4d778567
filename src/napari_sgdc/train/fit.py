"""The single training loop used by the CLI, the GUI (through `finetune`) and the tests.

What `fit` expects of the model (the contract of ``napari_sgdc.model``):

* ``model(x)`` with ``x`` (B, 3, H, W) float RGB in [0, 1], H and W multiples of
  ``model.size_multiple`` (32), returns a dict with ``mask`` (B, 1, H, W) and ``edge``
  (B, 1, H, W) logits;
* ``model.config`` is its `ModelConfig` (``edge_supervision`` switches the edge loss off);
* ``model.encoder`` is the encoder submodule (its own learning rate; frozen by
  ``TrainConfig.freeze_encoder``).

Files written when ``out`` is given (``out = run/model.safetensors``):

* ``run/model.safetensors``: the best checkpoint (best validation ``select_metric``, or
  the latest epoch when there is no validation), via `napari_sgdc.io.save_checkpoint`;
* ``run/model.last.safetensors``: the latest epoch's weights (a normal checkpoint);
* ``run/model.last.pt``: the training state for ``resume`` (weights, AdamW and scheduler
  state, step, history, RNG state); plain tensors and containers only, readable with
  ``torch.load(weights_only=True)``.

All files are written atomically. A cancelled run also writes the two ``last`` files, at
the step where it stopped, so it can be resumed.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .. import metrics as seg_metrics
from ..config import TrainConfig
from ..device import autocast, resolve_device
from ..io import atomic_write, save_checkpoint
from .losses import total_loss

__all__ = ["History", "fit", "evaluate", "state_path_for", "last_checkpoint_path_for"]

STATE_FORMAT = "napari-sgdc-trainstate/1"
SELECT_METRICS = {"iou": "max", "dice": "max", "loss": "min"}
_STREAM_SALT = 7919  # separates the batch-order stream from the per-item augmentation streams


@dataclass
class History:
    """What a `fit` run did.

    Attributes:
        steps: optimiser steps completed (the global step; continues across resume).
        total_steps: steps the run was planned for.
        losses: training loss of every step (including steps before a resume).
        loss_parts: per step ``{"mask": float, "edge": float}``.
        epoch_losses: mean training loss of every completed epoch.
        val_metrics: per validation ``{"epoch", "step", "iou", "dice", "val_loss"}``
            (mean over the validation images; IoU/Dice at threshold 0.5).
        best_metric: best value of ``TrainConfig.select_metric`` (None without validation).
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


def last_checkpoint_path_for(out: str | Path) -> Path:
    """``run/model.safetensors`` -> ``run/model.last.safetensors``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.last{out.suffix or '.safetensors'}")


def state_path_for(path: str | Path) -> Path:
    """The training-state file for a checkpoint path given to ``resume``.

    Accepts the ``.last.pt`` file itself, the ``.last.safetensors`` checkpoint or the
    best checkpoint path ``out``.
    """
    path = Path(path)
    if path.suffix == ".pt":
        return path
    if path.name.endswith(".last.safetensors"):
        return path.with_name(path.name[: -len(".safetensors")] + ".pt")
    return path.with_name(f"{path.stem}.last.pt")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


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


def _pad_to_multiple(image: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pads (B, C, H, W) at the bottom/right to multiples of `multiple` (reflect where possible)."""
    height, width = image.shape[-2:]
    pad_h = (-height) % multiple
    pad_w = (-width) % multiple
    if pad_h == 0 and pad_w == 0:
        return image
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(image, (0, pad_w, 0, pad_h), mode=mode)  # (B, C, H', W')


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataset: Dataset,
    *,
    device: torch.device | str = "cpu",
    amp: bool = False,
    edge_weight: float = 0.5,
    threshold: float = 0.5,
    cancel=None,
) -> dict[str, float] | None:
    """Mean IoU, Dice and loss of `model` over `dataset`, one whole item at a time.

    Each item is padded to a multiple of ``model.size_multiple`` (32), run through the
    model, and cropped back. IoU and Dice follow `napari_sgdc.metrics` (1.0 when both
    prediction and target are empty).

    Args:
        model: the segmenter.
        dataset: items with ``image`` (3, H, W), ``mask`` and ``edge`` (1, H, W); sizes may vary.
        device: where to run.
        amp: bf16 autocast on CUDA.
        edge_weight: λ_edge of the reported loss.
        threshold: probability threshold of the mask.
        cancel: `threading.Event`; when set the evaluation stops and returns None.

    Returns:
        ``{"iou", "dice", "val_loss"}``, or None when cancelled.
    """
    device = resolve_device(device)
    was_training = model.training
    model.eval()
    multiple = int(getattr(model, "size_multiple", 32))
    edge_supervision = bool(getattr(getattr(model, "config", None), "edge_supervision", True))
    ious, dices, losses = [], [], []
    try:
        for index in range(len(dataset)):
            if cancel is not None and cancel.is_set():
                return None
            item = dataset[index]
            image = item["image"][None].to(device)  # (1, 3, H, W)
            height, width = image.shape[-2:]
            padded = _pad_to_multiple(image, multiple).contiguous(memory_format=torch.channels_last)
            with autocast(device, amp):
                outputs = model(padded)
            outputs = {key: outputs[key][..., :height, :width].float() for key in ("mask", "edge") if key in outputs}
            targets = {key: item[key][None].to(device) for key in ("mask", "edge")}  # (1, 1, H, W)
            loss, _ = total_loss(outputs, targets, edge_weight, edge_supervision)
            losses.append(float(loss))
            prediction = (torch.sigmoid(outputs["mask"][0, 0]) > threshold).cpu().numpy()  # (H, W)
            target = item["mask"][0].numpy() > 0.5  # (H, W)
            ious.append(seg_metrics.iou(prediction, target))
            dices.append(seg_metrics.dice(prediction, target))
    finally:
        model.train(was_training)
    return {"iou": float(np.mean(ious)), "dice": float(np.mean(dices)), "val_loss": float(np.mean(losses))}


def _set_train_mode(model: torch.nn.Module, freeze_encoder: bool, freeze_batchnorm: bool = False) -> None:
    model.train()
    if freeze_encoder and getattr(model, "encoder", None) is not None:
        model.encoder.eval()  # BatchNorm statistics stay fixed
    if freeze_batchnorm:
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()  # running statistics stay those of the base model


def fit(
    model: torch.nn.Module,
    train_data: Dataset,
    val_data: Dataset | None = None,
    cfg: TrainConfig | None = None,
    *,
    callbacks: Sequence[Callable[[dict], Any]] | None = None,
    cancel=None,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    provenance: dict | None = None,
    device: str | torch.device | None = None,
) -> History:
    """Trains `model` in place.

    AdamW with two parameter groups (encoder at ``cfg.lr_encoder``, everything else at
    ``cfg.lr_decoder``), linear warm-up for ``cfg.warmup_steps`` then cosine decay to 0,
    stepped every optimiser step; optional bf16 autocast on CUDA (``cfg.amp``); gradient
    clipping at ``cfg.grad_clip``; loss `total_loss` (mask BCE + Dice plus
    ``cfg.edge_weight`` times the edge loss). Inputs and weights use ``channels_last``.

    An epoch is ``cfg.steps_per_epoch`` steps (or ``len(train_data) // batch_size``,
    at least 1); the run lasts ``cfg.epochs`` epochs, capped at ``cfg.max_steps`` when
    that is set. Batches are drawn from per-epoch permutations of the dataset seeded by
    ``(cfg.seed, epoch)``, and `SegmentationDataset` augmentation is seeded by
    ``(cfg.seed, epoch, index)`` (through ``set_epoch``), so on CPU a run is reproducible
    and a resumed run continues exactly where the interrupted one stopped.

    Validation runs every ``cfg.val_every`` epochs and after the last one (whole images,
    see `evaluate`).

    Args:
        model: the segmenter (see the module docstring). Moved to the device; left in
            eval mode with its ``requires_grad`` flags restored when done.
        train_data: items with ``image`` (3, h, w), ``mask`` and ``edge`` (1, h, w) of one
            size (e.g. a `SegmentationDataset` with ``augment=True``).
        val_data: validation items (may differ in size), or None.
        cfg: the run's settings (defaults: `TrainConfig()`).
        callbacks: each is called with an event dict ``{"kind": "step"|"epoch", "step",
            "total_steps", "epoch", "epochs", "loss", "metrics", "eta_s", "lr"}``; step
            events carry the step loss and ``metrics = {"loss_mask", "loss_edge"}``, epoch
            events the mean epoch loss and ``metrics = {"train_loss"}`` plus the
            validation ``iou``, ``dice`` and ``val_loss`` when validated.
        cancel: `threading.Event`, checked before every step; once set the run stops
            before the next step and returns with ``cancelled=True``.
        out: best-checkpoint path (``.safetensors``); see the module docstring for the
            files written next to it.
        resume: a path written by an earlier run with ``out`` (the checkpoint, its
            ``.last.safetensors`` or ``.last.pt``): weights, optimiser, scheduler, step and
            history continue from there.
        provenance: extra provenance stored in the checkpoints.
        device: overrides ``cfg.device``.

    Returns:
        the `History`.

    Raises:
        ValueError: for an empty dataset or an unknown ``select_metric``.
        FileNotFoundError: when ``resume`` has no training state.
        FloatingPointError: when the loss becomes NaN or infinite.
    """
    cfg = cfg or TrainConfig()
    callbacks = list(callbacks or [])
    started = time.perf_counter()
    device = resolve_device(device if device is not None else cfg.device)
    if len(train_data) == 0:
        raise ValueError("training dataset is empty")
    validate = val_data is not None and len(val_data) > 0 and cfg.val_every > 0
    if validate and cfg.select_metric not in SELECT_METRICS:
        raise ValueError(f"select_metric must be one of {sorted(SELECT_METRICS)}, got {cfg.select_metric!r}")
    _seed_everything(cfg.seed)

    batch_size = cfg.batch_size
    steps_per_epoch = cfg.steps_per_epoch or max(1, len(train_data) // batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps > 0:
        total_steps = min(total_steps, cfg.max_steps)
    n_epochs = math.ceil(total_steps / steps_per_epoch)

    memory_format = torch.channels_last if device.type in ("cpu", "cuda") else torch.contiguous_format
    model.to(device)
    model.to(memory_format=memory_format)
    encoder = getattr(model, "encoder", None)
    requires_grad_before = {name: p.requires_grad for name, p in model.named_parameters()}
    if cfg.freeze_encoder and encoder is not None:
        for parameter in encoder.parameters():
            parameter.requires_grad_(False)
    encoder_ids = {id(p) for p in encoder.parameters()} if encoder is not None else set()
    trainable = [p for p in model.parameters() if p.requires_grad]
    encoder_params = [p for p in trainable if id(p) in encoder_ids]
    other_params = [p for p in trainable if id(p) not in encoder_ids]
    groups = [{"params": other_params, "lr": cfg.lr_decoder, "name": "decoder"}]
    if encoder_params:
        groups.insert(0, {"params": encoder_params, "lr": cfg.lr_encoder, "name": "encoder"})
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.warmup_steps, total_steps))

    history = History(total_steps=total_steps)
    if out is not None:
        out = Path(out)
        history.checkpoint = out
        history.last_checkpoint = last_checkpoint_path_for(out)
    if resume is not None:
        state_file = state_path_for(resume)
        if not state_file.is_file():
            raise FileNotFoundError(
                f"cannot resume: training state {state_file} not found (fit(out=...) writes it next to the checkpoint)"
            )
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        previous = History.from_dict(state["history"])
        history.steps = previous.steps
        history.losses, history.loss_parts = previous.losses, previous.loss_parts
        history.epoch_losses, history.val_metrics = previous.epoch_losses, previous.val_metrics
        history.best_metric, history.best_epoch = previous.best_metric, previous.best_epoch
    history.total_steps = total_steps
    provenance = dict(provenance or {})

    def emit(event: dict) -> None:
        for callback in callbacks:
            callback(event)

    def save_last(epoch: int) -> None:
        if out is None:
            return
        metadata = {"step": history.steps, "epoch": epoch}
        save_checkpoint(history.last_checkpoint, model, train_config=cfg, metrics=metadata,
                        provenance={**provenance, "kind": "last"})
        state = {
            "format": STATE_FORMAT,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": history.steps,
            "epoch": epoch,
            "history": history.to_dict(),
            "torch_rng": torch.get_rng_state(),
            "train_config": cfg.to_dict(),
        }
        atomic_write(state_path_for(history.last_checkpoint), lambda tmp: torch.save(state, tmp))

    edge_supervision = bool(getattr(getattr(model, "config", None), "edge_supervision", True))
    step = history.steps
    steps_this_call = 0
    train_started = time.perf_counter()
    try:
        for epoch in range(step // steps_per_epoch, n_epochs):
            if step >= total_steps:
                break
            if hasattr(train_data, "set_epoch"):
                train_data.set_epoch(epoch, seed=cfg.seed)
            epoch_end = min((epoch + 1) * steps_per_epoch, total_steps)
            indices = _epoch_indices(len(train_data), steps_per_epoch * batch_size, cfg.seed, epoch)
            first = (step - epoch * steps_per_epoch) * batch_size
            last = (epoch_end - epoch * steps_per_epoch) * batch_size
            loader = DataLoader(train_data, batch_size=batch_size, sampler=indices[first:last],
                                num_workers=cfg.num_workers, pin_memory=device.type == "cuda")
            _set_train_mode(model, cfg.freeze_encoder, cfg.freeze_batchnorm)
            epoch_step_losses = []
            for batch in loader:
                if cancel is not None and cancel.is_set():
                    history.cancelled = True
                    break
                image = batch["image"].to(device, non_blocking=True)  # (B, 3, h, w)
                image = image.contiguous(memory_format=memory_format)
                targets = {key: batch[key].to(device, non_blocking=True) for key in ("mask", "edge")}  # (B, 1, h, w)
                with autocast(device, cfg.amp):
                    outputs = model(image)
                loss, parts = total_loss(outputs, targets, cfg.edge_weight, edge_supervision)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
                optimizer.step()
                scheduler.step()
                step += 1
                steps_this_call += 1
                history.steps = step
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    raise FloatingPointError(f"training loss became {loss_value} at step {step}")
                history.losses.append(loss_value)
                history.loss_parts.append(parts)
                epoch_step_losses.append(loss_value)
                seconds_per_step = (time.perf_counter() - train_started) / steps_this_call
                emit({
                    "kind": "step", "step": step, "total_steps": total_steps, "epoch": epoch,
                    "epochs": n_epochs, "loss": loss_value,
                    "metrics": {"loss_mask": parts["mask"], "loss_edge": parts["edge"]},
                    "eta_s": seconds_per_step * (total_steps - step),
                    "lr": optimizer.param_groups[-1]["lr"],
                })
            del loader
            if history.cancelled:
                save_last(epoch)
                break
            epoch_metrics: dict[str, float] = {}
            if epoch_step_losses:
                epoch_metrics["train_loss"] = float(np.mean(epoch_step_losses))
                history.epoch_losses.append(epoch_metrics["train_loss"])
            is_last_epoch = step >= total_steps
            if validate and ((epoch + 1) % cfg.val_every == 0 or is_last_epoch):
                val = evaluate(model, val_data, device=device, amp=cfg.amp,
                               edge_weight=cfg.edge_weight, cancel=cancel)
                if val is None:
                    history.cancelled = True
                    save_last(epoch)
                    break
                epoch_metrics.update(val)
                history.val_metrics.append({"epoch": epoch, "step": step, **val})
                key = "val_loss" if cfg.select_metric == "loss" else cfg.select_metric
                value = val[key]
                better = (
                    history.best_metric is None
                    or (SELECT_METRICS[cfg.select_metric] == "max" and value > history.best_metric)
                    or (SELECT_METRICS[cfg.select_metric] == "min" and value < history.best_metric)
                )
                if better:
                    history.best_metric, history.best_epoch = value, epoch
                    if out is not None:
                        save_checkpoint(out, model, train_config=cfg,
                                        metrics={**val, "epoch": epoch, "step": step},
                                        provenance={**provenance, "kind": "best"})
            elif out is not None and not validate:
                save_checkpoint(out, model, train_config=cfg,
                                metrics={**epoch_metrics, "epoch": epoch, "step": step},
                                provenance={**provenance, "kind": "latest"})
            save_last(epoch)
            elapsed = time.perf_counter() - train_started
            emit({
                "kind": "epoch", "step": step, "total_steps": total_steps, "epoch": epoch,
                "epochs": n_epochs, "loss": epoch_metrics.get("train_loss", float("nan")),
                "metrics": epoch_metrics,
                "eta_s": elapsed / max(1, steps_this_call) * (total_steps - step),
                "lr": optimizer.param_groups[-1]["lr"],
            })
    finally:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(requires_grad_before.get(name, True))
        model.eval()
        history.elapsed_s = time.perf_counter() - started
    if out is None:
        history.checkpoint = history.last_checkpoint = None
    return history
