"""Old names kept working for one release, each with a `DeprecationWarning`.

The one mechanism for renamed public names: `renamed_field` for dataclass fields
(construction keyword, attribute and dict key), `renamed_argument` for keyword arguments,
`renamed_function` for functions. The
table of renames lives in docs/architecture.md ("Vocabulary").
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable

REMOVED_IN = "0.3"


def warn_renamed(old: str, new: str, stacklevel: int = 3) -> None:
    """Warns that `old` is a deprecated name of `new`."""
    warnings.warn(f"{old} is deprecated and will be removed in napari-sgdc {REMOVED_IN}; use {new}",
                  DeprecationWarning, stacklevel=stacklevel)


def renamed_field(old: str, new: str) -> Callable[[type], type]:
    """Class decorator for a dataclass whose field `new` was called `old`.

    The constructor still takes ``old=`` and the attribute ``obj.old`` still reads (and, on
    mutable classes, writes) the field, each with a `DeprecationWarning`; ``from_dict``-style
    readers call `rename_keys` to accept the old key in saved files without a warning.
    """

    def decorate(cls: type) -> type:
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            if old in kwargs:
                warn_renamed(f"{cls.__name__}({old}=...)", f"{new}=")
                if new in kwargs:
                    raise TypeError(f"{cls.__name__} got both {old} (deprecated) and {new}")
                kwargs[new] = kwargs.pop(old)
            init(self, *args, **kwargs)

        def getter(self: Any) -> Any:
            warn_renamed(f"{cls.__name__}.{old}", f"{cls.__name__}.{new}")
            return getattr(self, new)

        def setter(self: Any, value: Any) -> None:
            warn_renamed(f"{cls.__name__}.{old}", f"{cls.__name__}.{new}")
            setattr(self, new, value)

        cls.__init__ = __init__
        setattr(cls, old, property(getter, setter))
        renames = dict(getattr(cls, "_renamed_fields", {}))
        renames[old] = new
        cls._renamed_fields = renames
        return cls

    return decorate


def rename_keys(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """`data` with the old field names of `cls` (`renamed_field`) replaced by the new ones."""
    renames = getattr(cls, "_renamed_fields", {})
    return {renames.get(key, key): value for key, value in data.items()}


def renamed_argument(old: str, new: str) -> Callable[[Callable], Callable]:
    """Decorator for a function whose keyword argument `new` was called `old`: ``old=`` still
    works, with a `DeprecationWarning`."""

    def decorate(function: Callable) -> Callable:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if old in kwargs:
                warn_renamed(f"{function.__name__}({old}=...)", f"{new}=")
                kwargs[new] = kwargs.pop(old)
            return function(*args, **kwargs)

        return wrapper

    return decorate


def renamed_function(function: Callable, old: str) -> Callable:
    """`function` under its old name `old`, warning on every call."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        warn_renamed(old, function.__name__)
        return function(*args, **kwargs)

    return wrapper
