"""Reads a bioimage.io package made by napari-sgdc (a .zip or the folder it unpacks to).

Only napari-sgdc, torch and yaml are needed: the description's ``config.napari_sgdc`` holds
the `ModelConfig` and the checkpoint metadata, the ``pytorch_state_dict`` weights the
tensors (read with ``torch.load(weights_only=True)``, never unpickled).
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import torch
import yaml

from ..checkpoints import CheckpointError

__all__ = ["RDF_NAMES", "is_package", "read_package", "load_package"]

RDF_NAMES = ("bioimageio.yaml", "rdf.yaml")


def _rdf_name(names: list[str]) -> str | None:
    for wanted in RDF_NAMES:
        if wanted in names:
            return wanted
    return next((name for name in names if name.endswith(".bioimageio.yaml") and "/" not in name), None)


def is_package(path: str | Path) -> bool:
    """Whether `path` is a .zip or a folder holding a bioimage.io description."""
    path = Path(path)
    if path.is_dir():
        return _rdf_name([p.name for p in path.iterdir()]) is not None
    if path.is_file() and path.suffix.lower() == ".zip":
        try:
            with zipfile.ZipFile(path) as archive:
                return _rdf_name(archive.namelist()) is not None
        except (zipfile.BadZipFile, OSError):
            return False
    return False


def _reader(path: Path):
    """A function reading one file of the package by name, and the description's name."""
    if path.is_dir():
        rdf = _rdf_name([p.name for p in path.iterdir()])
        return (lambda name: (path / name).read_bytes()), rdf
    archive = zipfile.ZipFile(path)
    return archive.read, _rdf_name(archive.namelist())


def read_package(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The state_dict and the napari-sgdc metadata of a package made by this plugin.

    Raises:
        CheckpointError: not a readable package, or not one napari-sgdc made.
    """
    path = Path(path)
    try:
        read, rdf_name = _reader(path)
        if rdf_name is None:
            raise CheckpointError(f"{path}: no bioimageio.yaml or rdf.yaml inside (not a bioimage.io package)")
        rdf = yaml.safe_load(read(rdf_name))
    except (zipfile.BadZipFile, OSError, yaml.YAMLError) as error:
        raise CheckpointError(f"{path}: not a readable bioimage.io package ({error})") from None
    own = (rdf.get("config") or {}).get("napari_sgdc") if isinstance(rdf, dict) else None
    weights = ((rdf.get("weights") or {}).get("pytorch_state_dict") or {}) if isinstance(rdf, dict) else {}
    if not isinstance(own, dict) or not isinstance(own.get("model_config"), dict) or "source" not in weights:
        raise CheckpointError(f"{path}: a bioimage.io package not made by napari-sgdc (no config.napari_sgdc "
                              "model_config or pytorch_state_dict weights); napari-sgdc loads only its own packages")
    try:
        tensors = torch.load(io.BytesIO(read(str(weights["source"]))), map_location="cpu", weights_only=True)
    except Exception as error:  # a missing member, a corrupt or a refused file
        raise CheckpointError(f"{path}: cannot read its weights {weights['source']!r} ({error})") from None
    if not isinstance(tensors, dict):
        raise CheckpointError(f"{path}: its weights {weights['source']!r} are not a state_dict")
    metadata = {key: own.get(key) for key in ("model_config", "train_config", "metrics", "provenance")}
    metadata.update(format="bioimageio", package=str(path), package_name=rdf.get("name"),
                    decoding=own.get("decoding"))
    return tensors, metadata


def load_package(path: str | Path, device: str = "cpu") -> torch.nn.Module:
    """Loads a package made by napari-sgdc as an `SGDCSegmenter` (same as ``load_model(path)``)."""
    from ..checkpoints import load_checkpoint

    return load_checkpoint(path, device=device)[0]
