"""Deprecated: `napari_sgdc.io` is now `napari_sgdc.checkpoints` (kept for one release)."""

from .deprecation import warn_renamed

warn_renamed("napari_sgdc.io", "napari_sgdc.checkpoints", stacklevel=2)

from .checkpoints import *  # noqa: E402,F401,F403
from .checkpoints import __all__  # noqa: E402,F401
