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


def mask_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + Dice on the mask.

    Args:
        logits: (B, 1, H, W) mask logits.
        target: (B, 1, H, W) float {0, 1}.

    Returns:
        scalar loss.
    """
    _check_shapes(logits, target, "mask")
    logits = logits.float()
    return F.binary_cross_entropy_with_logits(logits, target) + _dice(logits, target)


def edge_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Class-balanced BCE + Dice on the boundary target.

    Args:
        logits: (B, 1, H, W) boundary logits.
        target: (B, 1, H, W) float {0, 1}.

    Returns:
        scalar loss.
    """
    _check_shapes(logits, target, "edge")
    logits = logits.float()
    positive_fraction = target.mean().clamp_min(1e-6)
    pos_weight = ((1.0 - positive_fraction) / positive_fraction).clamp(1.0, EDGE_POS_WEIGHT_MAX)
    bce = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight.detach())
    return bce + _dice(logits, target)


def total_loss(
    outputs: dict[str, torch.Tensor],
    batch: dict[str, torch.Tensor],
    edge_weight: float = 0.5,
    edge_supervision: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``L_mask + edge_weight * L_edge`` (see the module docstring).

    Args:
        outputs: model outputs with ``mask`` (B, 1, H, W) and ``edge`` (B, 1, H, W) logits.
        batch: targets with ``mask`` and ``edge`` (B, 1, H, W).
        edge_weight: λ_edge.
        edge_supervision: include the edge term.

    Returns:
        (total scalar loss, {"mask": float, "edge": float}) with the parts for logging
        (``edge`` is 0.0 when not supervised).
    """
    loss_mask = mask_loss(outputs["mask"], batch["mask"])
    parts = {"mask": float(loss_mask.detach())}
    if edge_supervision and edge_weight > 0 and "edge" in outputs:
        loss_edge = edge_loss(outputs["edge"], batch["edge"])
        parts["edge"] = float(loss_edge.detach())
        return loss_mask + edge_weight * loss_edge, parts
    parts["edge"] = 0.0
    return loss_mask, parts
