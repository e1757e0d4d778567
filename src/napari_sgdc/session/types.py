"""Nucleus types of a cached result, and the user's changes to them (headless).

A typed model (``ModelConfig.type_names``) gives every object of the mask a type from the
per-pixel type probabilities (`napari_sgdc.postprocess.assign_types`). The user's labels
follow the same rule: an object the user painted, added or split takes the type its pixels'
probabilities give, unless the user set its type (`TypeOverrides`), which then wins. A type
change is an edit: fine-tuning weighs the object as a corrected outline
(`napari_sgdc.train.corrections.retyped_pixels`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["TypeChange", "TypeOverrides", "type_name", "type_table_of", "types_per_object"]


def type_name(names: tuple[str, ...], type_id: int) -> str:
    """The name of type `type_id` (1-based), or ``"none"`` for 0 and unknown ids."""
    return names[type_id - 1] if 1 <= type_id <= len(names) else "none"


@dataclass(frozen=True)
class TypeChange:
    """One change of an object's type.

    Attributes:
        label: the object's label id.
        old: its type id before (0 = none).
        new: its type id after.
        names: the model's type names (for the text).
    """

    label: int
    old: int
    new: int
    names: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        """One line: ``"object 12: epithelial → inflammatory"``."""
        return f"object {self.label}: {type_name(self.names, self.old)} → {type_name(self.names, self.new)}"


def type_table_of(labels: np.ndarray, type_probability: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`assign_types` of `labels`, where an object without any type probability (painted on
    a plane that was never segmented) gets type 0 instead of type 1.

    Returns:
        ``(types, confidence)``: (K + 1,) int16 and float32, indexed by label id.
    """
    from napari_sgdc.postprocess import assign_types

    types, confidence = assign_types(np.asarray(labels), type_probability)
    types[confidence <= 0] = 0
    return types, confidence


def types_per_object(labels: np.ndarray, types: np.ndarray, n_types: int) -> np.ndarray:
    """(n_types + 1,) objects of `labels` per type id (index 0: objects without a type)."""
    present = np.flatnonzero(np.bincount(np.asarray(labels).ravel().astype(np.int64)))
    present = present[present > 0]
    table = np.zeros(int(present.max(initial=0)) + 1, np.int64)
    table[:min(table.size, len(types))] = np.asarray(types[:table.size], np.int64)
    return np.bincount(table[present], minlength=n_types + 1)[:n_types + 1]


@dataclass
class TypeOverrides:
    """The types the user set, by label id, with their undo history.

    Attributes:
        types: label id -> type id the user set.
        history: the changes, oldest first, each with what the override was before (None: none).
    """

    types: dict[int, int] = field(default_factory=dict)
    history: list[tuple[TypeChange, int | None]] = field(default_factory=list)

    def clear(self) -> None:
        """Forgets every override and its history (the labels were written anew)."""
        self.types.clear()
        self.history.clear()

    def set(self, change: TypeChange) -> None:
        """Records `change` (undoable)."""
        self.history.append((change, self.types.get(change.label)))
        self.types[change.label] = change.new

    def undo(self) -> TypeChange | None:
        """Takes the latest change back; returns it (None: nothing to undo)."""
        if not self.history:
            return None
        change, before = self.history.pop()
        if before is None:
            self.types.pop(change.label, None)
        else:
            self.types[change.label] = before
        return change

    def apply(self, labels: np.ndarray, types: np.ndarray, confidence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The table with the overrides of the objects present in `labels` (confidence 1: the user's)."""
        if not self.types:
            return types, confidence
        types, confidence = types.copy(), confidence.copy()
        counts = np.bincount(np.asarray(labels).ravel().astype(np.int64), minlength=types.size)
        for label, type_id in self.types.items():
            if 0 < label < types.size and counts[label]:
                types[label], confidence[label] = type_id, 1.0
        return types, confidence
