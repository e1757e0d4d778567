"""Packaging: every third-party import is declared, and the config layer stays free of torch."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "napari_sgdc"

# Imported only where an optional feature needs it, each behind a clear message or a fallback:
# napari is the host application (the plugin layer runs inside it); matplotlib draws the
# fine-tuning loss plot (text otherwise); distributed runs slides on a cluster; pandas writes
# parquet object tables; bioimageio.spec and onnx write bioimage.io packages (`export`).
OPTIONAL = {"napari": "all", "matplotlib": "plot", "distributed": "cluster", "pandas": "parquet",
            "pyarrow": "parquet", "bioimageio": "export", "onnx": "export",
            "onnxruntime": "engines", "openvino": "engines"}  # napari_sgdc.engines: ONNX Runtime, OpenVINO


def _imported_modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in SOURCE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], path)
    return {name: path for name, path in found.items()
            if name not in sys.stdlib_module_names and name != "napari_sgdc"}


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\[<>=!~; ]", req, maxsplit=1)[0].lower().replace("_", "-") for req in requirements}


def _declared() -> tuple[set[str], dict[str, set[str]]]:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = {name: _requirement_names(reqs) for name, reqs in project["optional-dependencies"].items()}
    return _requirement_names(project["dependencies"]), extras


def test_every_import_is_declared():
    required, extras = _declared()
    distributions = importlib.metadata.packages_distributions()
    missing = []
    for module, path in sorted(_imported_modules().items()):
        names = {name.lower().replace("_", "-") for name in distributions.get(module, [module])}
        if module in OPTIONAL:
            if not names & extras[OPTIONAL[module]]:
                missing.append(f"{module} ({path.name}) not in the extra {OPTIONAL[module]!r}")
        elif not names & required:
            missing.append(f"{module} ({path.relative_to(ROOT)}) is imported but not a dependency")
    assert not missing, "\n".join(missing)


def test_optional_imports_stay_optional():
    """The optional modules are imported inside functions, never at a module's top level."""
    top_level = []
    for path in SOURCE.rglob("*.py"):
        if "_napari" in path.parts:
            continue  # the plugin layer runs inside napari
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                top_level += [f"{path.name}: {n}" for n in names if n.split(".")[0] in OPTIONAL]
    assert not top_level


@pytest.mark.parametrize("module", ["napari_sgdc.config", "napari_sgdc.postprocess"])
def test_light_modules_do_not_import_torch(module):
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_config_names_match_the_model_registry():
    from napari_sgdc.config import BLOCK_NAMES, ENCODER_NAMES
    from napari_sgdc.model.registry import BLOCK_TYPES, ENCODERS

    assert tuple(ENCODERS) == ENCODER_NAMES and tuple(BLOCK_TYPES) == BLOCK_NAMES


@pytest.mark.parametrize("old, new", [("napari_sgdc.io", "napari_sgdc.checkpoints"),
                                      ("napari_sgdc.imageio", "napari_sgdc.files")])
def test_renamed_modules_keep_working_for_one_release(old, new):
    code = (f"import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
            f"try:\n    import {old}\nexcept DeprecationWarning as w:\n    print(w)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert old in out and new in out
    import importlib
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        shim = importlib.import_module(old)
    target = importlib.import_module(new)
    assert shim.__all__ and all(getattr(shim, name) is getattr(target, name) for name in target.__all__)


def test_built_in_weights_ship_in_the_weights_folder():
    from napari_sgdc.checkpoints import BUILTIN_DIR, builtin_models

    assert BUILTIN_DIR.name == "weights" and builtin_models() == ["dermoscopy", "nuclei"]


def test_the_old_keyword_of_the_model_source_still_works():
    from napari_sgdc.checkpoints import model_path, read_model_config

    with pytest.warns(DeprecationWarning, match="source="):
        assert model_path(name_or_path="dermoscopy") == model_path("dermoscopy")
    with pytest.warns(DeprecationWarning):
        assert read_model_config(name_or_path="nuclei").split_level == read_model_config(source="nuclei").split_level


def test_npe2_manifest_validates():
    """`npe2 validate` accepts the plugin's manifest (the file the wheel ships)."""
    from npe2 import PluginManifest

    manifest = PluginManifest.from_file(SOURCE / "napari.yaml")
    manifest.validate_imports()
    result = subprocess.run([sys.executable, "-m", "npe2", "validate", str(SOURCE / "napari.yaml")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "valid" in result.stdout, result.stdout + result.stderr
