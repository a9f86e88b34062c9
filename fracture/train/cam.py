"""Grad-CAM from a network's last feature maps, differentiable so the exported graph can compute it (torch)."""

from __future__ import annotations

import torch
from torch import nn

from fracture.train.model import FractureNet


def cam_from_features(net: FractureNet, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logit, Grad-CAM) with the logit's gradient written as plain tensor ops, so ONNX exporters can trace it.

    Walks the dense head forward, then back: Linear → times its weight, ReLU →
    times its mask, global max-pool → the arg-max mask, global average-pool →
    1/(H·W). Grad-CAM = ReLU(sum_c mean_hw(grad_c) · feature_c), not normalised.
    """
    modules = list(net.backbone.head)
    outputs = []
    h = features
    for m in modules:
        h = m(h)
        outputs.append(h)
    logit = h.squeeze(1)
    grad = torch.ones_like(h)
    for i in range(len(modules) - 1, -1, -1):
        m, inp = modules[i], (outputs[i - 1] if i else features)
        if isinstance(m, nn.Linear):
            grad = grad @ m.weight
        elif isinstance(m, nn.ReLU):
            grad = grad * (outputs[i] > 0).to(grad.dtype)
        elif isinstance(m, nn.Flatten):
            grad = grad.reshape(inp.shape)
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            grad = grad.expand(inp.shape) / (inp.shape[2] * inp.shape[3])
        elif isinstance(m, nn.AdaptiveMaxPool2d):
            grad = grad * (inp == inp.amax(dim=(2, 3), keepdim=True)).to(grad.dtype)
        elif isinstance(m, nn.LayerNorm):  # ConvNeXt's LayerNorm2d over channels of the pooled 1x1 map
            dims = tuple(range(1, inp.ndim)) if inp.ndim == 2 else (1,)
            mean = inp.mean(dim=dims, keepdim=True)
            var = inp.var(dim=dims, keepdim=True, unbiased=False)
            xhat = (inp - mean) / torch.sqrt(var + m.eps)
            weight = m.weight.reshape(1, -1, *([1] * (inp.ndim - 2)))
            g = grad * weight
            grad = (g - g.mean(dim=dims, keepdim=True) - xhat * (g * xhat).mean(dim=dims, keepdim=True)) / torch.sqrt(var + m.eps)
        elif not isinstance(m, (nn.Dropout, nn.Identity)):
            raise ValueError(f"heatmaps are not supported for a head with {type(m).__name__}")
    weights = grad.mean(dim=(2, 3), keepdim=True)
    return logit, torch.relu((weights * features).sum(dim=1))


def normalise_cam(cam: torch.Tensor) -> torch.Tensor:
    """0..1 per image (a map of where, not how much); an all-zero map stays zero."""
    return cam / cam.amax(dim=(1, 2), keepdim=True).clamp(min=1e-6)
