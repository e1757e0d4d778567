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
              + L_map                      (instance models with ModelConfig.instance_map
                                            ``distance`` or ``hover``)

              + λ_type · L_type            (models with nucleus types, ModelConfig.type_names;
                                            λ_type = TrainConfig.type_weight)

    L_map (distance) = MSE(σ(d), t_d)                 t_d: normalised distance to border
    L_map (hover)    = MSE(h, t_h) + 2 · MSGE(h, t_h)  t_h: HoVer-Net x/y maps in [-1, 1]
              MSGE = mean over object pixels of the squared difference of the
                     x-gradient of the x map and the y-gradient of the y map (Graham et al.
                     2019, with their weights 1 and 2); gradients by 5×5 Sobel kernels

    L_type = CE_c(z, t) + Dice_T(softmax(z), t)      z: (B, T, H, W) type logits, t: type ids
              over the pixels whose type is known (t > 0; background, and nuclei of data
              without types, are ignored); CE_c is cross-entropy with class weights
              c_t (`type_class_weights`: inverse pixel frequency to the power
              TrainConfig.type_balance, so rare types such as CoNSeP's "other" count more),
              Dice_T the soft Dice of each type present in the batch, averaged over them

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

__all__ = ["mask_loss", "edge_loss", "instance_map_loss", "type_loss", "type_class_weights", "total_loss",
           "EDGE_POS_WEIGHT_MAX"]

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


def _sobel_5x5(device: torch.device) -> torch.Tensor:
    """(2, 1, 5, 5) kernels: d/dx and d/dy, each normalised to unit gain on a unit ramp."""
    smooth = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], device=device)
    derivative = torch.tensor([-1.0, -2.0, 0.0, 2.0, 1.0], device=device)
    d_dx = smooth[:, None] * derivative[None, :]  # (5, 5): varies along x (columns)
    d_dx = d_dx / (d_dx * torch.arange(-2.0, 3.0, device=device)[None, :]).sum()
    return torch.stack([d_dx, d_dx.T])[:, None]


def _hover_gradients(maps: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W) x and y maps → (B, 2, H, W): d(x map)/dx and d(y map)/dy."""
    kernels = _sobel_5x5(maps.device)  # (2, 1, 5, 5)
    return F.conv2d(maps, kernels, padding=2, groups=2)


def instance_map_loss(name: str, output: torch.Tensor, target: torch.Tensor,
                      weight: torch.Tensor | None = None) -> torch.Tensor:
    """L_map of the module docstring for ``instance_map`` `name` (``distance`` or ``hover``).

    Args:
        name: ``distance`` ((B, 1, H, W) logits) or ``hover`` ((B, 2, H, W) values).
        output: the head's output.
        target: the matching target from `napari_sgdc.data.targets.instance_map_target`.
        weight: optional (B, 1, H, W) per-pixel weights.
    """
    _check_shapes(output, target, name)
    weight = _check_weight(weight, target[:, :1])
    values = torch.sigmoid(output.float()) if name == "distance" else output.float()
    squared = (values - target) ** 2  # (B, C, H, W)
    total = weight.expand_as(squared) if weight is not None else torch.ones_like(squared)
    loss = (squared * total).sum() / total.sum().clamp_min(1e-6)
    if name == "hover":
        inside = (target.abs().sum(dim=1, keepdim=True) > 0).float()  # (B, 1, H, W) object pixels
        if weight is not None:
            inside = inside * weight
        gradient_error = (_hover_gradients(values) - _hover_gradients(target)) ** 2  # (B, 2, H, W)
        loss = loss + 2.0 * (gradient_error * inside).sum() / (2.0 * inside.sum()).clamp_min(1.0)
    return loss


def type_class_weights(pixel_counts, balance: float) -> torch.Tensor:
    """Class weights c_t of `type_loss`: ``(mean count / count_t) ** balance`` over the types
    that occur, normalised to a pixel-weighted mean of 1 (absent types get weight 1).

    Args:
        pixel_counts: (T + 1,) training pixels per type id (index 0, no type, is ignored).
        balance: 0 = unweighted, 1 = inverse frequency.
    """
    counts = torch.as_tensor(pixel_counts, dtype=torch.float64)[1:]
    weights = torch.ones_like(counts)
    present = counts > 0
    if present.any():
        raw = (counts[present].mean() / counts[present]) ** float(balance)
        weights[present] = raw / ((raw * counts[present]).sum() / counts[present].sum())
    return weights.float()


def type_loss(logits: torch.Tensor, target: torch.Tensor, class_weights: torch.Tensor | None = None,
              weight: torch.Tensor | None = None) -> torch.Tensor:
    """L_type of the module docstring: class-weighted cross-entropy + soft Dice over the
    pixels whose type is known.

    Args:
        logits: (B, T, H, W) type logits.
        target: (B, 1, H, W) int type ids (0 = ignore, 1..T).
        class_weights: (T,) c_t, or None for 1.
        weight: optional (B, 1, H, W) per-pixel weights.

    Returns:
        scalar loss (0 with a gradient when no pixel has a known type).
    """
    if logits.shape[0] != target.shape[0] or logits.shape[2:] != target.shape[2:] or target.shape[1] != 1:
        raise ValueError(f"type logits have shape {tuple(logits.shape)} but the target has {tuple(target.shape)}")
    logits = logits.float()
    ids = target[:, 0].long()  # (B, H, W)
    known = (ids > 0).float()
    if weight is not None:
        known = known * _check_weight(weight, target.float())[:, 0]
    if not bool(known.sum() > 0):
        return logits.sum() * 0.0
    index = (ids - 1).clamp(0, logits.shape[1] - 1)  # (B, H, W)
    class_weights = None if class_weights is None else class_weights.to(logits.device, torch.float32)
    per_pixel = F.cross_entropy(logits, index, weight=class_weights, reduction="none")  # (B, H, W)
    pixel_class_weight = known if class_weights is None else known * class_weights[index]
    ce = (per_pixel * known).sum() / pixel_class_weight.sum().clamp_min(1e-12)
    probability = torch.softmax(logits, dim=1)  # (B, T, H, W)
    one_hot = F.one_hot(index, logits.shape[1]).permute(0, 3, 1, 2).float() * known[:, None]
    overlap = (probability * one_hot * known[:, None]).sum(dim=(0, 2, 3))  # (T,)
    total = (probability * known[:, None]).sum(dim=(0, 2, 3)) + one_hot.sum(dim=(0, 2, 3))
    present = one_hot.sum(dim=(0, 2, 3)) > 0
    dice = 1.0 - (2.0 * overlap[present] + 1e-5) / (total[present] + 1e-5)
    return ce + dice.mean()


def total_loss(
    outputs: dict[str, torch.Tensor],
    batch: dict[str, torch.Tensor],
    edge_weight: float = 0.5,
    edge_supervision: bool = True,
    type_weight: float = 1.0,
    type_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``L_mask + edge_weight * L_edge`` (see the module docstring).

    Args:
        outputs: model outputs with ``mask`` (B, 1, H, W) and ``edge`` (B, 1, H, W) logits,
            and ``distance`` or ``hover`` for those instance maps.
        batch: targets with ``mask`` and ``edge`` (B, 1, H, W), the instance-map target
            when the outputs have one, and optionally ``weight`` (B, 1, H, W) per-pixel loss
            weights applied to every term.
        edge_weight: λ_edge.
        edge_supervision: include the edge term.
        type_weight: λ_type, for outputs with ``type`` logits (the batch then needs ``type``).
        type_weights: the class weights c_t of `type_loss` (None: 1).

    Returns:
        (total scalar loss, {"mask": float, "edge": float} plus ``distance`` or ``hover``)
        with the parts for logging (``edge`` is 0.0 when not supervised).
    """
    weight = batch.get("weight")
    loss_mask = mask_loss(outputs["mask"], batch["mask"], weight)
    parts = {"mask": float(loss_mask.detach())}
    loss = loss_mask
    for name in ("distance", "hover"):
        if name in outputs:
            if name not in batch:
                raise ValueError(f"the model has a {name} head but the batch has no {name} target "
                                 f"(build the dataset with instance_map={name!r})")
            loss_map = instance_map_loss(name, outputs[name], batch[name], weight)
            parts[name] = float(loss_map.detach())
            loss = loss + loss_map
    if "type" in outputs and type_weight > 0:
        if "type" not in batch:
            raise ValueError("the model has a type head but the batch has no type target "
                             "(build the dataset with types=True)")
        loss_type = type_loss(outputs["type"], batch["type"], type_weights, weight)
        parts["type"] = float(loss_type.detach())
        loss = loss + type_weight * loss_type
    if edge_supervision and edge_weight > 0 and "edge" in outputs:
        loss_edge = edge_loss(outputs["edge"], batch["edge"], weight)
        parts["edge"] = float(loss_edge.detach())
        return loss + edge_weight * loss_edge, parts
    parts["edge"] = 0.0
    return loss, parts
