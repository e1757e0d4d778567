"""Tuning a finished instance checkpoint's post-processing defaults on validation images.

`tune_checkpoint` is ``napari-sgdc tune``: it searches the mask threshold, separation
level and smallest-object size with the best mean AJI and PQ together (`tune_postprocess`) and writes a
copy of the checkpoint that carries them as its defaults; the input is never changed.
`write_tuned_checkpoint` is the step it shares with the end of `train_from_config`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from torch.utils.data import Dataset

__all__ = ["TUNED_FIELDS", "tune_checkpoint", "tuning_summary", "write_tuned_checkpoint"]

TUNED_FIELDS = ("threshold", "split_level", "min_size")
"""The `ModelConfig` fields a tuning sets."""


def write_tuned_checkpoint(source: str | Path, out: str | Path, dataset: Dataset, device: str = "auto") -> dict:
    """Tunes the post-processing defaults of checkpoint `source` on `dataset` and writes the
    checkpoint with them to `out` (metadata kept, the search recorded in its metrics under
    ``postprocess_tuning``). `out` may be `source` (the end of training tunes in place).

    Returns:
        the search result of `tune_postprocess`.
    """
    from ..checkpoints import load_checkpoint, read_metadata, save_checkpoint
    from .validate import tune_postprocess

    model, _ = load_checkpoint(source, device=device)
    found = tune_postprocess(model, dataset, device=device)
    for name in TUNED_FIELDS:
        setattr(model.config, name, found[name])
    metadata = read_metadata(source)
    metrics = {**(metadata.get("metrics") or {}), "postprocess_tuning": {**found, "n_images": len(dataset)}}
    save_checkpoint(out, model.to("cpu"), train_config=metadata.get("train_config"), metrics=metrics,
                    provenance=metadata.get("provenance"))
    return found


def tune_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    data: str | Path,
    layout: str,
    *,
    split: str = "val",
    also_val: Sequence[tuple[str, str | Path]] = (),
    max_images: int | None = None,
    device: str = "auto",
    overwrite: bool = False,
) -> dict:
    """Tunes an instance checkpoint's post-processing defaults on a dataset split and writes a
    tuned copy to `out` (what ``napari-sgdc tune`` does). Every check runs before any work.

    Args:
        checkpoint: the instance model's checkpoint (never changed).
        out: where to write the tuned checkpoint.
        data: dataset folder.
        layout: its layout (`napari_sgdc.data.datasets.LAYOUTS`).
        split: split to tune on.
        also_val: (layout, folder) pairs whose ``val`` split is added.
        max_images: tune on the first N images of each set only (None or 0: all).
        device: where to run.
        overwrite: replace `out` when it exists.

    Returns:
        the search result (see `tune_postprocess`).

    Raises:
        ValueError: a semantic model, `out` exists without `overwrite`, `out` is the input
            checkpoint, or the split holds no images (one line each).
    """
    from ..config import ModelConfig
    from ..data import load_samples
    from ..data.datasets import validation_dataset
    from ..checkpoints import read_metadata

    out = Path(out)
    config = read_metadata(checkpoint).get("model_config") or {}
    if config.get("task") != "instance":
        raise ValueError(f"{checkpoint}: tune needs an instance model (this one is {config.get('task')!r})")
    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists; not replaced (give --overwrite)")
    if out.resolve() == Path(checkpoint).resolve():
        raise ValueError("--out must differ from --model: the input checkpoint is never changed")
    max_images = max_images or None
    samples = load_samples(data, layout, split, max_images=max_images, task="instance")
    for extra_layout, folder in also_val:
        samples += load_samples(folder, extra_layout, "val", max_images=max_images, task="instance")
    if not samples:
        raise ValueError(f"no images in split {split!r} of {data} (layout {layout})")
    dataset = validation_dataset(samples, ModelConfig.from_dict(config))
    return write_tuned_checkpoint(checkpoint, out, dataset, device)


def tuning_summary(found: dict) -> str:
    """One line describing a `tune_postprocess` result."""
    return (f"threshold {found['threshold']:g}, split level {found['split_level']:g}, min size "
            f"{found['min_size']} px: validation AJI {found['aji']:.4f} (was {found['aji_default']:.4f}), "
            f"object F1 {found['object_f1']:.4f}, PQ {found['pq']:.4f}")
