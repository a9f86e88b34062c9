"""Training losses (torch): the image-level BCE and, for localise networks, the per-cell map loss."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

MapLoss = Literal["bce_dice", "focal"]


def map_loss(maps: torch.Tensor, mask: torch.Tensor, supervised: torch.Tensor, kind: MapLoss = "bce_dice") -> torch.Tensor:
    """Per-cell loss of the map logits against the box mask's cover of each cell (0..1).

    Only images whose boxes are known count: negatives (empty map) and fractured images with boxes.
    ``bce_dice``: mean BCE over all cells plus soft Dice on images with a fracture in view.
    ``focal``: focal BCE on the soft cover (each cell weighted by ``|p - cover|^2``), summed and divided by
    the batch's fracture cells, as CenterNet does: easy background cells fade out, so the fracture cells
    and the hard negatives (joints, plates, bone edges) carry the gradient however small the boxes are.
    """
    if not bool(supervised.any()):
        return maps.sum() * 0.0
    stride = mask.shape[-1] // maps.shape[-1]
    target = nn.functional.avg_pool2d(mask, stride).squeeze(1)[supervised]
    logits = maps[supervised].float()
    if kind == "focal":
        return focal_map_loss(logits, target)
    bce = nn.functional.binary_cross_entropy_with_logits(logits, target)
    positive = target.flatten(1).sum(1) > 0
    if not bool(positive.any()):
        return bce
    p, t = torch.sigmoid(logits[positive]).flatten(1), target[positive].flatten(1)
    dice = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    return bce + dice.mean()


def focal_map_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Quality focal loss (Li et al. 2020) on soft targets, normalised by the target mass (at least one cell)."""
    p = torch.sigmoid(logits)
    bce = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (bce * (p - target).abs().pow(gamma)).sum() / target.sum().clamp(min=1.0)


def image_loss(logits: torch.Tensor, y: torch.Tensor, pos_weight: float) -> torch.Tensor:
    """BCE on logits (the stable sigmoid + BCE), fractured weighted by ``pos_weight``."""
    weight = torch.as_tensor(pos_weight, dtype=logits.dtype, device=logits.device)
    return nn.functional.binary_cross_entropy_with_logits(logits, y.to(logits.dtype), pos_weight=weight)
