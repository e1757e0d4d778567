"""Training losses.

Notation: ``m`` mask logits and ``y`` the mask target (B, 1, H, W); ``e`` edge logits and
``b`` the boundary target (B, 1, H, W); ``σ`` the sigmoid. Dice terms are MONAI
``DiceLoss(sigmoid=True, batch=True)``, i.e. computed over the whole batch at once so that
patches without foreground do not produce undefined values:

    Dice(x, t) = 1 - (2 Σ σ(x) t + ε) / (Σ σ(x) + Σ t + ε),   ε = 1e-5

    L_mask  = BCE(m, y) + Dice(m, y)

    L_edge  = BCE_w(e, b) + Dice(e, b),
              BCE_w = binary cross-entropy with positive-class weight
              w = clamp((1 - p) / p, 1, 50),  p = fraction of boundary pixels in the batch

    L_total = L_mask + λ_edge · L_edge     (λ_edge = TrainConfig.edge_weight;
                                            L_edge is dropped when ModelConfig.edge_supervision
                                            is False)

Boundary pixels are rare (a few percent), hence the weighted BCE: without it the edge
head learns to predict "no boundary" everywhere.

Per-pixel weights ``ω`` (B, 1, H, W), e.g. from user edits (see
`napari_sgdc.train.corrections`), turn every term into its weighted form:

    BCE_ω(x, t)  = Σ ω · bce(x, t) / Σ ω
    Dice_ω(x, t) = 1 - (2 Σ ω σ(x) t + ε) / (Σ ω σ(x) + Σ ω t + ε)

With ``ω = 1`` these are the unweighted terms; without weights the MONAI/PyTorch
implementations above are used unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss

__all__ = ["mask_loss", "edge_loss", "total_loss", "EDGE_POS_WEIGHT_MAX"]

EDGE_POS_WEIGHT_MAX = 50.0

_dice = DiceLoss(sigmoid=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5)


def _check_shapes(logits: torch.Tensor, target: torch.Tensor, what: str) -> None:
    if logits.shape != target.shape:
        raise ValueError(f"{what} logits have shape {tuple(logits.shape)} but the target has {tuple(target.shape)}")


def _check_weight(weight: torch.Tensor | None, target: torch.Tensor) -> torch.Tensor | None:
    if weight is None:
        return None
    if weight.shape != target.shape:
        raise ValueError(f"weight has shape {tuple(weight.shape)} but the target has {tuple(target.shape)}")
    return weight.float()


def _weighted_dice(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``Dice_ω`` over the whole batch (see the module docstring)."""
    probability = torch.sigmoid(logits)
    overlap = (weight * probability * target).sum()
    total = (weight * probability).sum() + (weight * target).sum()
    return 1.0 - (2.0 * overlap + 1e-5) / (total + 1e-5)


def _weighted_bce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                  pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """``BCE_ω``: the weighted mean of the per-pixel binary cross-entropy."""
    per_pixel = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight, reduction="none")
    return (weight * per_pixel).sum() / weight.sum().clamp_min(1e-12)


def mask_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """BCE + Dice on the mask.

    Args:
        logits: (B, 1, H, W) mask logits.
        target: (B, 1, H, W) float {0, 1}.
        weight: optional (B, 1, H, W) per-pixel weights (>= 0); None: all pixels weigh the same.

    Returns:
        scalar loss.
    """
    _check_shapes(logits, target, "mask")
    weight = _check_weight(weight, target)
    logits = logits.float()
    if weight is None:
        return F.binary_cross_entropy_with_logits(logits, target) + _dice(logits, target)
    return _weighted_bce(logits, target, weight) + _weighted_dice(logits, target, weight)


def edge_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Class-balanced BCE + Dice on the boundary target.

    Args:
        logits: (B, 1, H, W) boundary logits.
        target: (B, 1, H, W) float {0, 1}.
        weight: optional (B, 1, H, W) per-pixel weights (>= 0); None: all pixels weigh the same.

    Returns:
        scalar loss.
    """
    _check_shapes(logits, target, "edge")
    weight = _check_weight(weight, target)
    logits = logits.float()
    positive_fraction = target.mean().clamp_min(1e-6)
    pos_weight = ((1.0 - positive_fraction) / positive_fraction).clamp(1.0, EDGE_POS_WEIGHT_MAX).detach()
    if weight is None:
        bce = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight)
        return bce + _dice(logits, target)
    return _weighted_bce(logits, target, weight, pos_weight) + _weighted_dice(logits, target, weight)


def total_loss(
    outputs: dict[str, torch.Tensor],
    batch: dict[str, torch.Tensor],
    edge_weight: float = 0.5,
    edge_supervision: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``L_mask + edge_weight * L_edge`` (see the module docstring).

    Args:
        outputs: model outputs with ``mask`` (B, 1, H, W) and ``edge`` (B, 1, H, W) logits.
        batch: targets with ``mask`` and ``edge`` (B, 1, H, W), and optionally ``weight``
            (B, 1, H, W) per-pixel loss weights applied to both terms.
        edge_weight: λ_edge.
        edge_supervision: include the edge term.

    Returns:
        (total scalar loss, {"mask": float, "edge": float}) with the parts for logging
        (``edge`` is 0.0 when not supervised).
    """
    weight = batch.get("weight")
    loss_mask = mask_loss(outputs["mask"], batch["mask"], weight)
    parts = {"mask": float(loss_mask.detach())}
    if edge_supervision and edge_weight > 0 and "edge" in outputs:
        loss_edge = edge_loss(outputs["edge"], batch["edge"], weight)
        parts["edge"] = float(loss_edge.detach())
        return loss_mask + edge_weight * loss_edge, parts
    parts["edge"] = 0.0
    return loss_mask, parts
