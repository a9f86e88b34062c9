"""The optimisation recipe: optimizer, learning-rate schedule and which parameters get weight decay."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn


@dataclass
class Recipe:
    """How the weights are fitted (``model.recipe.*`` in a config).

    Args:
        optimizer: ``adam`` (the Keras port) or ``adamw`` (decoupled weight decay).
        lr: peak learning rate.
        weight_decay: applied to conv and linear weights only; biases and norm parameters never decay.
        scheduler: ``none`` (constant) or ``cosine`` (linear warm-up, then cosine decay to 0, per step).
        warmup_epochs: warm-up length for ``cosine``.
    """

    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    scheduler: Literal["none", "cosine"] = "none"
    warmup_epochs: float = 0.0


def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: weights (decayed) and biases / norm scales (ndim ≤ 1, never decayed)."""
    decay, keep = [], []
    for p in module.parameters():
        if p.requires_grad:
            (keep if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def configure(recipe: Recipe, net: nn.Module, total_steps: int, max_epochs: int) -> Any:
    """What ``configure_optimizers`` returns for ``net``'s parameters under ``recipe``."""
    cls = torch.optim.AdamW if recipe.optimizer == "adamw" else torch.optim.Adam
    optimizer = cls(parameter_groups(net, recipe.weight_decay), lr=recipe.lr)
    if recipe.scheduler == "none":
        return optimizer
    total = max(int(total_steps), 1)
    warmup = int(recipe.warmup_epochs * total / max(max_epochs, 1))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
