"""The network's outputs as per-pixel maps, and the 8 dihedral transforms of test-time
augmentation (`segment`, validation and the benchmarks read the heads through `head_maps`)."""

from __future__ import annotations

import torch

__all__ = ["dihedral", "dihedral_vectors", "head_maps"]


def dihedral(x: torch.Tensor, index: int, inverse: bool = False) -> torch.Tensor:
    """The `index`-th of the 8 flips and 90° rotations of (..., H, W), or its inverse."""
    turns, flip = index % 4, index >= 4
    if inverse:
        x = torch.flip(x, dims=(-1,)) if flip else x
        return torch.rot90(x, -turns, dims=(-2, -1))
    x = torch.rot90(x, turns, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if flip else x


def dihedral_vectors(vx: torch.Tensor, vy: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Undoes `dihedral` transform `index` on the components of a vector field.

    A quarter turn (`torch.rot90` from rows to columns) maps an offset (x, y) (column,
    row) to (y, −x) and the flip maps it to (−x, y); `dihedral` turns, then flips, so
    the inverse flips, then turns back with (x, y) → (−y, x) per turn. Apply it after
    the maps themselves went back through ``dihedral(..., inverse=True)``.
    """
    turns, flip = index % 4, index >= 4
    if flip:
        vx = -vx
    for _ in range(turns):
        vx, vy = -vy, vx
    return vx, vy


def head_maps(outputs: dict[str, torch.Tensor], index: int = 0) -> dict[str, torch.Tensor]:
    """Per-pixel maps of the first item of a forward pass, in the untransformed frame.

    Args:
        outputs: the model's outputs (``mask``, ``edge`` and optionally ``distance`` or
            ``hover``) for an input seen through `dihedral` transform `index`.
        index: the transform to undo (0: none).

    Returns:
        float32 (H, W) tensors: ``probability``, ``boundary``, and ``distance`` (in [0, 1])
        or ``hover_x`` and ``hover_y`` (in [-1, 1]) for those ``ModelConfig.instance_map``;
        ``type_1`` … ``type_T``, the probability of each nucleus type, for a model with types.
    """
    maps = {"probability": torch.sigmoid(outputs["mask"][0, 0].float()),
            "boundary": torch.sigmoid(outputs["edge"][0, 0].float())}
    if "distance" in outputs:
        maps["distance"] = torch.sigmoid(outputs["distance"][0, 0].float())
    maps = {name: dihedral(value, index, inverse=True) for name, value in maps.items()}  # (H, W) each
    if "hover" in outputs:
        hover = dihedral(outputs["hover"][0].float().clamp(-1.0, 1.0), index, inverse=True)  # (2, H, W)
        maps["hover_x"], maps["hover_y"] = dihedral_vectors(hover[0], hover[1], index)
    if "type" in outputs:
        types = dihedral(torch.softmax(outputs["type"][0].float(), dim=0), index, inverse=True)  # (T, H, W)
        maps.update({f"type_{number}": plane for number, plane in enumerate(types, start=1)})
    return maps
