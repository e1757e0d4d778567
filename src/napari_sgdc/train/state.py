"""The training-state file that lets `fit` resume (``run/model.last.pt`` next to ``run/model.safetensors``).

The state is a dict of plain tensors and containers (readable with
``torch.load(weights_only=True)``): ``format`` (`STATE_FORMAT`), ``model`` (the
state_dict), ``optimizer``, ``scheduler``, ``step``, ``epoch``, ``history``
(``History.to_dict()``), ``torch_rng`` and ``train_config``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import TrainConfig
from ..files import atomic_write
from ..checkpoints import CheckpointError, load_state_checked

__all__ = [
    "STATE_FORMAT", "STATE_KEYS", "last_checkpoint_path_for", "load_train_state", "remove_stale_temporaries",
    "save_train_state", "state_path_for",
]

STATE_FORMAT = "napari-sgdc-trainstate/1"
STATE_KEYS = ("format", "model", "optimizer", "scheduler", "step", "epoch", "history", "torch_rng", "train_config")


def last_checkpoint_path_for(out: str | Path) -> Path:
    """``run/model.safetensors`` -> ``run/model.last.safetensors``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.last{out.suffix or '.safetensors'}")


def state_path_for(path: str | Path) -> Path:
    """The training-state file for a path given to ``resume``: the ``.last.pt`` file itself,
    the ``.last.safetensors`` checkpoint or the best checkpoint path ``out``."""
    path = Path(path)
    if path.suffix == ".pt":
        return path
    if path.name.endswith(".last.safetensors"):
        return path.with_name(path.name[: -len(".safetensors")] + ".pt")
    return path.with_name(f"{path.stem}.last.pt")


def remove_stale_temporaries(out: str | Path) -> list[Path]:
    """Deletes the ``.<name>.*.tmp`` files that a killed save of this run left next to
    `out`, its ``last`` checkpoint and its state file; returns them."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    names = {out.name, last_checkpoint_path_for(out).name, state_path_for(out).name}
    stale = [path for path in out.parent.iterdir()
             if path.is_file() and any(_is_temporary_of(path.name, name) for name in names)]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def _is_temporary_of(filename: str, name: str) -> bool:
    """``.{name}.<random>.tmp``, the pattern of `napari_sgdc.checkpoints.atomic_write`."""
    prefix = f".{name}."
    return filename.startswith(prefix) and filename.endswith(".tmp") and len(filename) > len(prefix) + len(".tmp")


def save_train_state(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                     *, step: int, epoch: int, history: dict, cfg: TrainConfig) -> Path:
    """Writes the training state to `path` atomically."""
    state = {
        "format": STATE_FORMAT,
        "model": {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": step,
        "epoch": epoch,
        "history": history,
        "torch_rng": torch.get_rng_state(),
        "train_config": cfg.to_dict(),
    }
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_train_state(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler) -> dict:
    """Restores weights, optimiser, scheduler and torch RNG from a state file.

    Returns:
        the saved history dict (``History.to_dict()``).

    Raises:
        FileNotFoundError: no state file at `path`.
        CheckpointError: the file is unreadable, not a training state, or does not fit
            the model or optimiser (one line naming the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"cannot resume: training state {path} not found (fit(out=...) writes it next to the checkpoint)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, garbage, pickled objects: all unreadable
        raise CheckpointError(f"{path}: not a readable training state ({type(error).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: not a training state of format {STATE_FORMAT} (found {found!r})")
    bad = [key for key in STATE_KEYS if key not in state]
    bad += [key for key in ("model", "history") if key in state and not isinstance(state[key], dict)]
    if bad:
        raise CheckpointError(f"{path}: incomplete training state (missing or invalid: {', '.join(bad)})")
    load_state_checked(model, state["model"], source=str(path))
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        message = " ".join(str(error).split())
        raise CheckpointError(f"{path}: optimiser or scheduler state does not fit this run ({message})") from None
    return state["history"]
