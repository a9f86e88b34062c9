"""Training losses (torch): the image-level BCE and, for localise networks, the per-cell map loss."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

MapLoss = Literal["bce_dice", "focal"]


def map_loss(maps: torch.Tensor, cover: torch.Tensor, supervised: torch.Tensor, kind: MapLoss = "bce_dice") -> torch.Tensor:
    """Per-cell loss of the map logits against the box cover of each cell (0..1, :func:`cell_cover`).

    Only images whose boxes are known count: negatives (empty map) and fractured images with boxes.
    ``bce_dice``: mean BCE over all cells plus soft Dice on images with a fracture in view.
    ``focal``: focal BCE on the soft cover (each cell weighted by ``|p - cover|^2``), summed and divided by
    the batch's fracture cells, as CenterNet does: easy background cells fade out, so the fracture cells
    and the hard negatives (joints, plates, bone edges) carry the gradient however small the boxes are.
    """
    if not bool(supervised.any()):
        return maps.sum() * 0.0
    target = cover[supervised]
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


def cell_cover(maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The share of each map cell (``N x h x w``) the box mask (``N x 1 x H x W``) covers."""
    return nn.functional.avg_pool2d(mask, mask.shape[-1] // maps.shape[-1]).squeeze(1)


def pointing_loss(maps: torch.Tensor, cover: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Spatial-softmax loss of where the map peaks: ``-log sum_c softmax(map)_c w_c`` per image with a box in view.

    ``w`` is each cell's box cover relative to the image's best-covered cell. A per-cell loss scores every
    cell alone, so a distractor (a joint, a plate, a bone edge) costs little as long as it stays below 0.5;
    the pointing game and the shown boxes rank the cells of one image against each other, and so does this
    loss: its gradient falls on the out-of-box cells in proportion to how much they outrank the box.
    Images without a box in view (negatives, crops beside the fracture, unknown boxes) do not count:
    returns the mean over those that do and how many they are (none: a zero loss), so that an epoch's
    logged mean can weigh each batch by its count instead of being diluted by batches without a box.
    """
    cover = cover.flatten(1)
    top = cover.amax(1)
    counted = int((top > 0).sum())
    if not counted:
        return maps.sum() * 0.0, 0
    logits, weight = maps.flatten(1)[top > 0].float(), cover[top > 0] / top[top > 0, None]
    inside = torch.where(weight > 0, logits + weight.log(), torch.full_like(logits, -torch.inf))
    return (torch.logsumexp(logits, 1) - torch.logsumexp(inside, 1)).mean(), counted


def pointing_hits(maps: torch.Tensor, boxes: torch.Tensor, stride: float = 8.0) -> tuple[torch.Tensor, int]:
    """The pointing game on the device, for a whole batch: is the centre of each map's top cell (``N x h x w``, at
    ``stride`` input pixels a cell) inside one of its true boxes (``N x B x 4`` input pixels, rows of -1 unused)?
    Returns the hit rate over the images with a box and how many they are (none: 0 and 0)."""
    width = maps.shape[-1]
    top = maps.flatten(1).argmax(1)
    cx, cy = ((top % width).to(boxes.dtype) + 0.5) * stride, ((top // width).to(boxes.dtype) + 0.5) * stride
    valid = boxes[..., 0] >= 0
    inside = valid & (cx[:, None] >= boxes[..., 0]) & (cx[:, None] < boxes[..., 2]) & (cy[:, None] >= boxes[..., 1]) & (cy[:, None] < boxes[..., 3])
    has = valid.any(1)
    counted = int(has.sum())
    return (inside.any(1)[has].float().mean() if counted else maps.new_zeros(())), counted


def focal_map_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Quality focal loss (Li et al. 2020) on soft targets, normalised by the target mass (at least one cell)."""
    p = torch.sigmoid(logits)
    bce = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (bce * (p - target).abs().pow(gamma)).sum() / target.sum().clamp(min=1.0)


def image_loss(logits: torch.Tensor, y: torch.Tensor, pos_weight: float) -> torch.Tensor:
    """BCE on logits (the stable sigmoid + BCE), fractured weighted by ``pos_weight``."""
    weight = torch.as_tensor(pos_weight, dtype=logits.dtype, device=logits.device)
    return nn.functional.binary_cross_entropy_with_logits(logits, y.to(logits.dtype), pos_weight=weight)
