"""One re-entrant lock per model, so `segment()` and `fit()`/`finetune()` never overlap.

Training switches modules between train and eval mode and updates weights in place;
inference switches every module to eval mode and back. Both hold ``model_lock(model)``
for their whole run, so a segmentation started during fine-tuning waits for it (and
vice versa). The lock is re-entrant: a training callback on the training thread may
call `segment()` on the same model.
"""

from __future__ import annotations

import threading
import weakref

__all__ = ["model_lock"]

_LOCKS: "weakref.WeakKeyDictionary[object, threading.RLock]" = weakref.WeakKeyDictionary()
_GUARD = threading.Lock()


def model_lock(model: object) -> threading.RLock:
    """The `threading.RLock` of `model` (created on first use, dropped with the model)."""
    with _GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock
