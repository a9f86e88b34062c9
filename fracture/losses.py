"""Training losses (torch): the image-level BCE and, for localise networks, the per-cell map loss."""

from __future__ import annotations

import torch
from torch import nn


def map_loss(maps: torch.Tensor, mask: torch.Tensor, supervised: torch.Tensor) -> torch.Tensor:
    """Per-cell BCE against the box mask's cover of each cell, plus soft Dice on images with a fracture in view.

    Only images whose boxes are known count: negatives (empty map) and fractured images with boxes.
    """
    if not bool(supervised.any()):
        return maps.sum() * 0.0
    stride = mask.shape[-1] // maps.shape[-1]
    target = nn.functional.avg_pool2d(mask, stride).squeeze(1)[supervised]
    logits = maps[supervised].float()
    bce = nn.functional.binary_cross_entropy_with_logits(logits, target)
    positive = target.flatten(1).sum(1) > 0
    if not bool(positive.any()):
        return bce
    p, t = torch.sigmoid(logits[positive]).flatten(1), target[positive].flatten(1)
    dice = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    return bce + dice.mean()


def image_loss(logits: torch.Tensor, y: torch.Tensor, pos_weight: float) -> torch.Tensor:
    """BCE on logits (the stable sigmoid + BCE), fractured weighted by ``pos_weight``."""
    weight = torch.as_tensor(pos_weight, dtype=logits.dtype, device=logits.device)
    return nn.functional.binary_cross_entropy_with_logits(logits, y.to(logits.dtype), pos_weight=weight)
