"""Writes a bioimage.io model package (format 0.5) of a napari-sgdc model: `export`.

The package (a .zip) holds ``bioimageio.yaml``, the weights as a PyTorch state_dict (with
its architecture, `network.ExportedSGDC`), TorchScript and ONNX, test tensors the model
made itself, a README and a cover image from the model's output on the bundled sample.
``bioimageio.spec`` (the ``export`` extra) validates the package before it is written; the
existing file at `out` is never replaced unless ``overwrite=True``.
"""

from __future__ import annotations

import hashlib
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from .. import __version__
from ..checkpoints import load_checkpoint, model_path
from ..config import ModelConfig
from ..files import atomic_write
from ..samples import read_sample
from .describe import INPUT_ID, describe, readme
from .network import OPSET, ExportedSGDC, export_onnx, output_specs

__all__ = ["export", "FORMATS", "RDF_NAME", "OPSET"]

FORMATS = ("bioimageio",)
RDF_NAME = "bioimageio.yaml"
EXTRA_HINT = "pip install 'napari-sgdc[export]'"


def _check_extra() -> None:
    """One line naming the extra when the export libraries are missing."""
    try:
        import bioimageio.spec  # noqa: F401
        import onnx  # noqa: F401  (torch.onnx.export needs it)
    except ImportError as error:
        raise ImportError(f"exporting a bioimage.io package needs {error.name}: {EXTRA_HINT}") from None


def _network(model_or_source: Any) -> tuple[ExportedSGDC, dict, str]:
    """The model as an `ExportedSGDC` on the CPU in float32, its metadata and a package name."""
    if isinstance(model_or_source, torch.nn.Module):
        model, metadata, name = model_or_source, dict(getattr(model_or_source, "metadata", None) or {}), "SGDC model"
    else:
        model, metadata = load_checkpoint(model_path(model_or_source), device="cpu")
        stem = Path(str(model_or_source)).name.split(".")[0]
        name = f"napari-sgdc {stem}"
    cfg: ModelConfig = model.config
    network = ExportedSGDC(**cfg.to_dict())
    network.load_state_dict({k: v.detach().float().cpu() for k, v in model.state_dict().items()})
    return network.eval(), metadata, name


def _test_input(cfg: ModelConfig, tile: int) -> np.ndarray:
    """(1, 3, tile, tile) uint8 from the bundled sample: a central crop of the H&E sample at its own
    40× scale for histology models, the whole dermoscopy sample resized for the others."""
    from PIL import Image

    if cfg.mpp > 0 or cfg.is_instance:
        image = read_sample("nuclei")
        top, left = (image.shape[0] - tile) // 2, (image.shape[1] - tile) // 2
        image = image[max(top, 0):max(top, 0) + tile, max(left, 0):max(left, 0) + tile]
    else:
        image = read_sample("dermoscopy")
    if image.shape[:2] != (tile, tile):
        image = np.asarray(Image.fromarray(image).resize((tile, tile), Image.Resampling.LANCZOS))
    return np.ascontiguousarray(image.transpose(2, 0, 1)[None])


def _cover(image: np.ndarray, probability: np.ndarray, boundary: np.ndarray, path: Path) -> None:
    """A 2:1 PNG: the test input, and the same with the mask (green) and boundary (red) drawn on it."""
    from PIL import Image

    rgb = image[0].transpose(1, 2, 0).astype(np.float32)
    overlay = rgb.copy()
    mask = probability[0, 0] >= 0.5
    overlay[mask] = 0.55 * overlay[mask] + 0.45 * np.array([40, 220, 60])
    edge = boundary[0, 0] >= 0.5
    overlay[edge] = [230, 30, 30]
    Image.fromarray(np.concatenate([rgb, overlay], axis=1).clip(0, 255).astype(np.uint8)).save(path)


def _write_weights(network: ExportedSGDC, example: torch.Tensor, folder: Path, files: dict[str, str]) -> None:
    torch.save(network.state_dict(), folder / files["weights_pt"])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about the size checks, which hold for multiples of 32
        torch.jit.trace(network, example, check_trace=False).save(str(folder / files["weights_torchscript"]))
    names = [spec["id"] for spec in output_specs(network.config)]
    export_onnx(network, example, str(folder / files["weights_onnx"]), INPUT_ID, names)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def validate_folder(folder: Path) -> None:
    """Validates an unpacked package with ``bioimageio.spec``, no downloads; ValueError if invalid."""
    _check_extra()
    from bioimageio.spec import InvalidDescr, load_description

    descr = load_description(folder / RDF_NAME, perform_io_checks=False)
    if isinstance(descr, InvalidDescr):
        errors = "; ".join(f"{'.'.join(map(str, e.loc))}: {e.msg}" for e in descr.validation_summary.errors)
        raise ValueError(f"the exported package is not a valid bioimage.io model: {errors}")


def _build(network: ExportedSGDC, metadata: dict, name: str, folder: Path, tile: int) -> None:
    cfg = network.config
    files = {"weights_pt": "weights.pt", "weights_torchscript": "weights_torchscript.pt",
             "weights_onnx": "weights.onnx", "environment": "environment.yaml", "readme": "README.md",
             "cover": "cover.png", f"test_{INPUT_ID}": f"test_{INPUT_ID}.npy"}
    image = _test_input(cfg, tile)
    example = torch.from_numpy(image).float() / 255.0
    with torch.no_grad():
        outputs = [out.numpy() for out in network(example)]
    for spec, array in zip(output_specs(cfg), outputs):
        files[f"test_{spec['id']}"] = f"test_{spec['id']}.npy"
        np.save(folder / files[f"test_{spec['id']}"], array.astype(np.float32))
    np.save(folder / files[f"test_{INPUT_ID}"], image.astype(np.float32))
    _cover(image, outputs[0], outputs[1], folder / files["cover"])
    _write_weights(network, example, folder, files)
    (folder / files["environment"]).write_text(yaml.safe_dump(
        {"name": "napari-sgdc", "channels": ["conda-forge", "nodefaults"],
         "dependencies": ["python>=3.10", "pip", {"pip": [f"napari-sgdc>={__version__}"]}]}, sort_keys=False))
    rdf = describe(cfg, metadata, files, name=name, torch_version=torch.__version__, opset=OPSET)
    (folder / files["readme"]).write_text(readme(rdf), encoding="utf-8")
    for entry in [*rdf["inputs"], *rdf["outputs"]]:
        entry["test_tensor"]["sha256"] = _sha256(folder / entry["test_tensor"]["source"])
    for entry in rdf["weights"].values():
        entry["sha256"] = _sha256(folder / entry["source"])
    (folder / RDF_NAME).write_text(yaml.safe_dump(rdf, sort_keys=False, allow_unicode=True), encoding="utf-8")


def export(model_or_source: Any, out: str | Path, format: str = "bioimageio", *, name: str | None = None,
           tile: int = 256, overwrite: bool = False) -> Path:
    """Writes `model_or_source` (a built-in name, a checkpoint or package path, or a loaded model)
    as a bioimage.io model package (a ``.zip``).

    Args:
        out: the ``.zip`` to write; an existing file is kept unless `overwrite`.
        format: ``bioimageio`` (the only format so far).
        name: the package's name (default: from the model source).
        tile: the side of the test tensors (a multiple of 32, at least 64).

    Returns:
        The written path.

    Raises:
        ValueError: an unknown format, a bad `out` or `tile`, or a package that fails validation.
        FileExistsError: `out` exists and `overwrite` is False.
        ImportError: ``bioimageio.spec`` or ``onnx`` is missing (the ``export`` extra).
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out).expanduser()
    if out.suffix.lower() != ".zip":
        raise ValueError(f"a bioimage.io package is a .zip file; got {out}")
    if not isinstance(tile, int) or tile < 64 or tile % 32:
        raise ValueError(f"tile must be a multiple of 32 and at least 64, got {tile!r}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    _check_extra()
    network, metadata, default_name = _network(model_or_source)
    with tempfile.TemporaryDirectory(prefix="sgdc-export-") as tmp:
        folder = Path(tmp)
        _build(network, metadata, name or default_name, folder, tile)
        validate_folder(folder)

        def write(path: Path) -> None:
            with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
                for file in sorted(folder.iterdir()):
                    archive.write(file, file.name)

        return atomic_write(out, write)
