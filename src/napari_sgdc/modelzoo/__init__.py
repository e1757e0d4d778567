"""bioimage.io model packages: `export` a napari-sgdc model, `load_package` one back.

``napari_sgdc.export(model_or_source, "model.zip")`` writes the package (needs the
``export`` extra: bioimageio.spec, onnx); `load_package` reads a package made by this
plugin (a .zip or a folder) with napari-sgdc alone.
"""

from __future__ import annotations

from .load import is_package, load_package
from .package import FORMATS, export, validate_folder

__all__ = ["FORMATS", "export", "is_package", "load_package", "validate_folder"]
