"""The loaded models of a correction session, with their fine-tuning history (headless).

A `ModelState` is one model in memory and what fine-tuning did to it: a weight snapshot
before every kept run (the undo stack, at most `MAX_UNDO` deep), the provenance of each
run, and the settings of the latest one. A `FinetuneRun` is a run being made: it holds
the snapshot until the run is kept (`ModelState.keep_run`) or dropped (`ModelState.drop_run`,
which restores the weights bit for bit).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napari_sgdc.training_pairs import TrainingPair

__all__ = ["BUILTIN_PREFIX", "MAX_UNDO", "FinetuneRun", "ModelState", "builtin_name", "display_name", "load_state"]

BUILTIN_PREFIX = "built-in: "
"""A model source naming a built-in model: ``"built-in: <name>"`` (else a checkpoint path)."""
MAX_UNDO = 10
"""Fine-tune runs that can be undone, per model."""


def display_name(source: str) -> str:
    """Model picker text for a built-in name or a checkpoint path."""
    if source.startswith(BUILTIN_PREFIX):
        return source
    return Path(source).name


def builtin_name(source: str) -> str:
    """What `napari_sgdc.checkpoints.load_model` takes for `source`: the built-in's name or the path."""
    return source[len(BUILTIN_PREFIX):] if source.startswith(BUILTIN_PREFIX) else source


@dataclass
class FinetuneRun:
    """One fine-tune run of a model, from its start until it is kept or dropped.

    Attributes:
        state: the model being trained.
        pairs: the training pairs of the run (all made for ``state.source``).
        config: the TrainConfig of the run.
        snapshot: the weights before the run (what undo and a failed run restore).
        info: provenance of the run: ``images``, ``planes``, ``preset``; `ModelState.keep_run`
            adds ``steps``, ``loss_first`` and ``loss_last``.
    """

    state: "ModelState"
    pairs: list[TrainingPair]
    config: Any
    snapshot: dict[str, Any]
    info: dict[str, Any]


@dataclass
class ModelState:
    """One loaded model and its fine-tuning history.

    Attributes:
        source: a built-in model name (``"built-in: <name>"``) or a checkpoint path.
        model: the torch module (the one every dock uses).
        undo: weight snapshots taken before each kept fine-tune, newest last.
        runs: provenance of each kept fine-tune run (the newest `MAX_UNDO` pair with `undo`).
        last_train_config: the TrainConfig of the latest kept run.
    """

    source: str
    model: Any
    undo: list[dict[str, Any]] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    last_train_config: Any = None

    @property
    def display_name(self) -> str:
        """Short name for the model picker."""
        return display_name(self.source)

    def snapshot(self) -> dict[str, Any]:
        """Returns an exact copy of the model's parameters and buffers."""
        return {key: value.detach().clone() for key, value in self.model.state_dict().items()}

    def restore(self, snapshot: dict[str, Any]) -> None:
        """Restores weights bit for bit from `snapshot`."""
        self.model.load_state_dict(snapshot, strict=True)

    def model_metadata(self) -> dict[str, Any]:
        """The metadata that `napari_sgdc.checkpoints.load_checkpoint` attached (a copy)."""
        return dict(getattr(self.model, "metadata", None) or {})

    def provenance(self) -> dict[str, Any]:
        """Provenance for a checkpoint: the base model and the fine-tuning kept so far."""
        base = self.model_metadata().get("provenance") or {}
        images = sorted({name for run in self.runs for name in run["images"]})
        return {
            "base_model": self.source,
            "base_provenance": base,
            "finetuned_with": "napari-sgdc GUI",
            "corrected_images": len(images),
            "corrected_image_names": images,
            "finetune_steps": int(sum(run["steps"] for run in self.runs)),
            "finetune_runs": list(self.runs),
        }

    # -- fine-tune runs ------------------------------------------------------------------
    def begin_run(self, pairs: list[TrainingPair], config: Any, preset: str = "") -> FinetuneRun:
        """Snapshots the weights for a run on `pairs` (the run itself is `train.finetune`)."""
        info = {"images": [pair.image_name for pair in pairs],
                "planes": sum(len(pair.labels) for pair in pairs), "preset": preset}
        return FinetuneRun(self, list(pairs), config, self.snapshot(), info)

    def keep_run(self, run: FinetuneRun, history: Any) -> dict[str, Any]:
        """Records a finished run: its snapshot goes on the undo stack, its provenance into `runs`.

        Returns:
            The run's provenance (with ``steps``, ``loss_first``, ``loss_last``).
        """
        losses = [float(x) for x in getattr(history, "losses", [])]
        info = dict(run.info, steps=int(getattr(history, "steps", len(losses))),
                    loss_first=losses[0] if losses else None, loss_last=losses[-1] if losses else None)
        self.undo.append(run.snapshot)
        self.runs.append(info)
        self.last_train_config = run.config
        if len(self.undo) > MAX_UNDO:
            self.undo.pop(0)  # the oldest run can no longer be undone; its provenance stays
        return info

    def drop_run(self, run: FinetuneRun) -> None:
        """A cancelled or failed run: the weights from before it, bit for bit."""
        self.restore(run.snapshot)

    def undo_run(self) -> dict[str, Any] | None:
        """Restores the weights from before the latest kept run.

        Returns:
            The undone run's provenance, or None when there is nothing to undo.
        """
        if not self.undo:
            return None
        self.restore(self.undo.pop())
        run = self.runs.pop() if self.runs else {"images": []}
        self.last_train_config = None
        return run


def load_state(source: str, device: str = "auto") -> ModelState:
    """Loads the model of `source` (``"built-in: <name>"`` or a checkpoint path).

    Raises:
        FileNotFoundError: the checkpoint or built-in does not exist.
        ValueError: the checkpoint is not a valid napari-sgdc checkpoint.
    """
    from napari_sgdc.checkpoints import load_model

    return ModelState(source=source, model=load_model(builtin_name(source), device=device))
