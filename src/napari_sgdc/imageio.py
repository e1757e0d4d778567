"""Deprecated: `napari_sgdc.imageio` is now `napari_sgdc.files` (kept for one release)."""

from .deprecation import warn_renamed

warn_renamed("napari_sgdc.imageio", "napari_sgdc.files", stacklevel=2)

from .files import *  # noqa: E402,F401,F403
from .files import __all__  # noqa: E402,F401
