"""Checkpoints: safetensors with embedded JSON metadata, atomic writes, safe loading.

A checkpoint is one ``.safetensors`` file. Its tensors are the model's state_dict; its
metadata holds, under the key ``napari_sgdc``, a JSON document with the `ModelConfig`
(so ``load_model(path)`` needs nothing else), the training config, class names, input
normalisation, metrics, the package version and provenance.

User files are never unpickled: a ``.pth``/``.pt`` file is read with
``torch.load(weights_only=True)`` (tensors and plain containers only) or refused.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import __version__
from .config import ModelConfig, TrainConfig
from .deprecation import renamed_argument
from .device import resolve_device
from .files import atomic_write

__all__ = ["BUILTIN_DIR", "CheckpointError", "FORMAT", "METADATA_KEY", "builtin_models", "init_from_checkpoint", "load_checkpoint",
           "load_model", "load_state_checked", "model_path", "read_metadata", "read_model_config", "save_checkpoint"]

FORMAT = "napari-sgdc/1"
METADATA_KEY = "napari_sgdc"
BUILTIN_DIR = Path(__file__).parent / "weights"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


def builtin_models() -> list[str]:
    """Names of the built-in models shipped in the package (``load_model(name)``)."""
    return sorted(path.stem for path in BUILTIN_DIR.glob("*.safetensors"))


def _as_dict(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return value


def save_checkpoint(path: str | Path, model: torch.nn.Module, *,
                    train_config: TrainConfig | dict | None = None, metrics: dict | None = None,
                    provenance: dict | None = None, dtype: torch.dtype | None = None) -> Path:
    """Writes `model` and its metadata to a ``.safetensors`` file, atomically.

    Args:
        path: destination; ``.safetensors`` is the expected suffix.
        model: an `SGDCSegmenter` (it carries ``.config``).
        train_config: the training run's config.
        metrics: measured metrics to record.
        provenance: free-form origin (base model, data, steps, …).
        dtype: store floating tensors in this dtype (e.g. ``torch.float16``); loading casts back.

    Returns:
        The written path.
    """
    cfg: ModelConfig = model.config
    metadata = {
        "format": FORMAT,
        "package_version": __version__,
        "model_config": cfg.to_dict(),
        "train_config": _as_dict(train_config),
        "class_names": list(cfg.class_names),
        "normalisation": {"mean": list(cfg.norm_mean), "std": list(cfg.norm_std), "units": "0..255",
                          "input": "RGB scaled to [0, 1], normalised inside the model"},
        "metrics": metrics or {},
        "provenance": provenance or {},
    }
    tensors = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[name] = tensor.contiguous()
    text = json.dumps(metadata, default=str)
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={METADATA_KEY: text}))


def read_metadata(path: str | Path) -> dict:
    """Reads the JSON metadata of a napari-sgdc ``.safetensors`` checkpoint."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as reader:
            raw = (reader.metadata() or {}).get(METADATA_KEY)
    except Exception as error:  # safetensors raises several types for corrupt files
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None
    if raw is None:
        raise CheckpointError(f"{path}: safetensors file has no napari-sgdc metadata (not a napari-sgdc checkpoint)")
    try:
        metadata = json.loads(raw)
    except ValueError as error:
        raise CheckpointError(f"{path}: napari-sgdc metadata is not valid JSON ({error})") from None
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: napari-sgdc metadata must be a JSON object, got {type(metadata).__name__}")
    return metadata


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Reads tensors and metadata from a .safetensors, (safely) a .pth/.pt file, or a bioimage.io
    package made by napari-sgdc (a .zip or a folder)."""
    from .modelzoo.load import is_package, read_package

    if is_package(path):
        return read_package(path)
    if path.suffix == ".safetensors":
        metadata = read_metadata(path)
        with safe_open(str(path), framework="pt") as reader:
            tensors = {name: reader.get_tensor(name) for name in reader.keys()}
        return tensors, metadata
    if path.suffix in (".pth", ".pt"):
        try:
            content = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise CheckpointError(
                f"{path}: refused to load; only plain tensors are accepted from .pth/.pt files "
                f"(weights_only=True) and this file needs unpickling of arbitrary objects ({type(error).__name__})"
            ) from None
        if not (isinstance(content, dict) and "model_config" in content and "state_dict" in content):
            raise CheckpointError(f"{path}: a .pth/.pt checkpoint must be a dict with 'model_config' and 'state_dict'")
        metadata = {key: value for key, value in content.items() if key != "state_dict"}
        return dict(content["state_dict"]), metadata
    raise CheckpointError(f"{path}: unsupported checkpoint type {path.suffix!r} (use .safetensors)")


def load_state_checked(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Loads `tensors` into `model`, casting dtypes; raises a clear error naming mismatched keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong_shape = sorted(name for name in set(expected) & set(tensors)
                         if tuple(expected[name].shape) != tuple(tensors[name].shape))
    if missing or unexpected or wrong_shape:
        parts = []
        for label, names in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong_shape)):
            if names:
                shown = ", ".join(names[:5]) + (f" … (+{len(names) - 5})" if len(names) > 5 else "")
                parts.append(f"{label}: {shown}")
        raise CheckpointError(f"{source} does not fit the model config; " + "; ".join(parts))
    cast = {name: tensor.to(expected[name].dtype) for name, tensor in tensors.items()}
    model.load_state_dict(cast, strict=True)


def init_from_checkpoint(model: torch.nn.Module, source: str | Path) -> list[str]:
    """Copies into `model` every weight of checkpoint `source` (a built-in name or a path)
    whose name and shape match: a warm start, e.g. a typed model from the untyped one.

    Returns:
        the names of `model`'s weights that kept their initial values (new layers).

    Raises:
        FileNotFoundError, CheckpointError: as `load_model`; CheckpointError also when
            fewer than half of the model's weights match (the wrong checkpoint).
    """
    tensors, _ = _read_tensors(model_path(source))
    expected = model.state_dict()
    matching = {name: tensor.to(expected[name].dtype) for name, tensor in tensors.items()
                if name in expected and tuple(tensor.shape) == tuple(expected[name].shape)}
    if len(matching) < len(expected) / 2:
        raise CheckpointError(f"{source}: only {len(matching)} of the model's {len(expected)} weights match; "
                              "is it a checkpoint of the same architecture?")
    model.load_state_dict(matching, strict=False)
    return sorted(set(expected) - set(matching))


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Builds the model recorded in a checkpoint and loads its weights.

    Returns:
        ``(model, metadata)``; the model is in eval mode on `device`, with ``model.metadata`` set.

    Raises:
        FileNotFoundError: no file at `path`.
        CheckpointError: unreadable, refused, or not fitting its own config.
    """
    from .model import build_model

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    tensors, metadata = _read_tensors(path)
    model_config = metadata.get("model_config")
    if not isinstance(model_config, dict):
        raise CheckpointError(f"{path}: metadata has no model_config object")
    try:
        cfg = ModelConfig.from_dict(dict(model_config, pretrained=False))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: invalid model_config: {error}") from None
    model = build_model(cfg)
    load_state_checked(model, tensors, source=str(path))
    model.metadata = metadata
    return model.to(resolve_device(device)).eval(), metadata


@renamed_argument("name_or_path", "source")
def model_path(source: str | Path) -> Path:
    """The checkpoint file of a built-in model name or a checkpoint path.

    Raises:
        FileNotFoundError: neither a built-in name nor an existing file (lists the built-ins).
    """
    text = str(source)
    if text in builtin_models():
        path = BUILTIN_DIR / f"{text}.safetensors"
    else:
        try:
            path = Path(text).expanduser()
        except RuntimeError:  # "~user" of an unknown user
            path = Path(text)
        from .modelzoo.load import is_package

        if not (path.is_file() or is_package(path)):
            names = ", ".join(builtin_models()) or "none installed"
            raise FileNotFoundError(f"no built-in model or checkpoint file named {text!r} (built-in models: {names})")
    return path


@renamed_argument("name_or_path", "source")
def load_model(source: str | Path, device: str | torch.device = "auto") -> torch.nn.Module:
    """Loads a built-in model by name (e.g. ``"dermoscopy"``), a checkpoint path, or a bioimage.io
    package made by napari-sgdc (``napari_sgdc.export``; a .zip or its unpacked folder).

    Raises:
        FileNotFoundError: neither a built-in name nor an existing file (lists the built-ins).
        CheckpointError: the file cannot be used.
    """
    model, _ = load_checkpoint(model_path(source), device=device)
    return model


@renamed_argument("name_or_path", "source")
def read_model_config(source: str | Path) -> ModelConfig:
    """The `ModelConfig` of a built-in name or checkpoint path, without loading the weights
    (a ``.safetensors`` file's metadata; other formats are loaded)."""
    path = model_path(source)
    if path.suffix != ".safetensors" or path.is_dir():
        return load_checkpoint(path, device="cpu")[0].config
    data = read_metadata(path).get("model_config")
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: the metadata has no model_config")
    return ModelConfig.from_dict(data)
