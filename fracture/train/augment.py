"""Training augmentation on the device, a different random draw for every image of a batch.

The loader hands uint8 batches (``data.augment_on: device``); after the transfer to the GPU the
whole batch is warped at once with one affine grid per image (rotation, zoom, shift, mirror),
cropped, exposure-jittered and noised there. A torchvision v2 transform applied to a batch would
draw one set of parameters for all images; here every parameter is a vector over the batch.
The box mask goes through the same grid as its image, and a fractured crop that keeps under a
quarter of its box becomes a negative, as on the CPU path (:class:`fracture.data.Transform`).
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F


def _uniform(n: int, lo: float, hi: float, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, device=device, generator=generator) * (hi - lo) + lo


def affine_params(n: int, rotation: float, translate: float, scale: tuple[float, float], hflip: float, device: torch.device,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """``n x 2 x 3`` sampling grids' matrices (output → input, normalised coordinates), one random draw per image."""
    angle = _uniform(n, -rotation, rotation, device, generator) * (math.pi / 180)
    zoom = _uniform(n, scale[0], scale[1], device, generator)
    shift = _uniform(2 * n, -translate, translate, device, generator).view(n, 2) * 2  # a fraction of the side; the side spans 2
    flip = torch.where(torch.rand(n, device=device, generator=generator) < hflip, -1.0, 1.0)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos * flip, -sin, -shift[:, 0]], 1), torch.stack([sin * flip, cos, -shift[:, 1]], 1)], 1)
    return theta


def device_augment(x: torch.Tensor, mask: torch.Tensor, y: torch.Tensor, has_boxes: torch.Tensor, aug, crop: int | None = None,
                   crop_on_box: float = 0.5, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 ``N x 1 x H x W`` images and box masks on the device → (float pixels, float 0/1 masks, labels), augmented per image.

    ``aug`` is a :class:`fracture.data.Augmentation`; ``crop`` cuts ``crop`` px squares (over a box with
    probability ``crop_on_box`` where the image has one).
    """
    n, device = x.shape[0], x.device
    x, mask, y = x.float(), mask.float(), y.clone()
    if aug.enabled:
        theta = affine_params(n, aug.rotation, aug.translate, (aug.scale_min, aug.scale_max), aug.hflip, device, generator)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        mask = (F.grid_sample(mask, grid, mode="bilinear", padding_mode="zeros", align_corners=False) > 0.5).float()
    if crop is not None and crop < min(x.shape[-2:]):
        x, mask, y = _crop(x, mask, y, has_boxes, crop, crop_on_box, generator)
    if aug.enabled:
        if aug.brightness:
            x = x * _uniform(n, 1 - aug.brightness, 1 + aug.brightness, device, generator).view(n, 1, 1, 1)
        if aug.contrast:
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * _uniform(n, 1 - aug.contrast, 1 + aug.contrast, device, generator).view(n, 1, 1, 1) + mean
        if aug.noise_std > 0:
            x = x + torch.randn(x.shape, device=device, generator=generator) * aug.noise_std
        x = x.clamp(0.0, 255.0)
    return x, mask, y


def _crop(x: torch.Tensor, mask: torch.Tensor, y: torch.Tensor, has_boxes: torch.Tensor, size: int, on_box: float,
          generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, (h, w), device = x.shape[0], x.shape[-2:], x.device
    top = (torch.rand(n, device=device, generator=generator) * (h - size + 1)).long()
    left = (torch.rand(n, device=device, generator=generator) * (w - size + 1)).long()
    wants_box = (torch.rand(n, device=device, generator=generator) < on_box) & (mask.flatten(1).amax(1) > 0)
    for i in torch.nonzero(wants_box).flatten().tolist():  # a box pixel, anywhere inside the crop
        on = mask[i, 0].nonzero()
        r, c = on[int(torch.randint(len(on), (1,), device=device, generator=generator))].tolist()
        top[i] = int(torch.randint(max(r - size + 1, 0), min(r, h - size) + 1, (1,), device=device, generator=generator))
        left[i] = int(torch.randint(max(c - size + 1, 0), min(c, w - size) + 1, (1,), device=device, generator=generator))
    rows = (top.view(n, 1) + torch.arange(size, device=device)).view(n, 1, size, 1).expand(n, 1, size, w)
    x = x.gather(2, rows)
    total = mask.flatten(1).sum(1)
    mask = mask.gather(2, rows)
    cols = (left.view(n, 1) + torch.arange(size, device=device)).view(n, 1, 1, size).expand(n, 1, size, size)
    x, mask = x.gather(3, cols), mask.gather(3, cols)
    lost = has_boxes & (y > 0) & (mask.flatten(1).sum(1) < 0.25 * total)  # the fracture is (almost) outside the crop
    y = torch.where(lost, torch.zeros_like(y), y)
    mask = mask * (~lost).view(n, 1, 1, 1)
    return x, mask, y
