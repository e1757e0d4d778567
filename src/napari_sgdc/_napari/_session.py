"""One headless `napari_sgdc.session.CorrectionSession` per napari viewer.

Both docks of a viewer share its session (models, results, options, busy state); the
registry holds no reference to the viewer, so closing a viewer releases its models.
"""

from __future__ import annotations

import weakref
from typing import Any

from napari_sgdc.session import CorrectionSession

_SESSIONS: dict[int, CorrectionSession] = {}


def real_viewer(viewer: Any) -> Any:
    """The viewer behind napari's public-only proxy (which wraps every layer it returns
    in a new object, so caches keyed by layer identity need the real viewer)."""
    return getattr(viewer, "__wrapped__", viewer)


def get_session(viewer: Any) -> CorrectionSession:
    """Returns the session of `viewer`, creating it on first use.

    napari may hand widgets a public-only proxy of the viewer; the session belongs to the
    real viewer behind it, so both widgets share one session.
    """
    viewer = real_viewer(viewer)
    key = id(viewer)
    session = _SESSIONS.get(key)
    if session is None:
        session = CorrectionSession()
        _SESSIONS[key] = session
        weakref.finalize(viewer, _SESSIONS.pop, key, None)
    return session
