"""Networks: the seed CNN ported from the Keras project, wrapped with its input scaling.

Every network takes raw pixel values (float, 0..255, shape ``N x 1 x H x W``)
exactly as :func:`fracture.preprocess.load` produces them and returns one
fracture logit per image. Scaling and normalisation live inside the network,
so the exported ONNX graph carries them too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fracture.preprocess import Contract


class FractureCNN(nn.Module):
    """Conv blocks (3x3 conv, batch-norm, ReLU, 2x2 max-pool, dropout) → flatten → dense → one logit.

    ``pool="flatten"`` is the Keras project's head. ``max``/``avg`` pool the last
    feature map globally instead: far fewer weights and position-invariant, which
    learns small local findings (a fracture line anywhere along a bone) from
    much less data.

    Args:
        image_size: input side in pixels (the dense head depends on it).
        in_channels: input channels (1 for grayscale radiographs).
        widths: filters per conv block.
        dense: widths of the hidden dense layers.
        dropout: dropout after each conv block.
        dense_dropout: dropout after each hidden dense layer.
        pool: ``flatten`` (seed head), or global ``max`` / ``avg`` pooling before the dense layers.
    """

    def __init__(
        self,
        image_size: int = 224,
        in_channels: int = 1,
        widths: Sequence[int] = (32, 64, 128),
        dense: Sequence[int] = (256, 128),
        dropout: float = 0.25,
        dense_dropout: float = 0.5,
        pool: str = "flatten",
    ) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        channels = in_channels
        for width in widths:
            blocks += [
                nn.Conv2d(channels, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
                nn.Dropout(dropout),
            ]
            channels = width
        self.features = nn.Sequential(*blocks)
        side = image_size // 2 ** len(widths)
        if side < 1:
            raise ValueError(f"image_size {image_size} is too small for {len(widths)} pooling blocks")
        pools = {"flatten": nn.Identity(), "max": nn.AdaptiveMaxPool2d(1), "avg": nn.AdaptiveAvgPool2d(1)}
        if pool not in pools:
            raise ValueError(f"pool must be one of {tuple(pools)}, got {pool!r}")
        head: list[nn.Module] = [pools[pool], nn.Flatten()]
        fan_in = channels * side * side if pool == "flatten" else channels
        for width in dense:
            head += [nn.Linear(fan_in, width), nn.ReLU(inplace=True), nn.Dropout(dense_dropout)]
            fan_in = width
        head.append(nn.Linear(fan_in, 1))
        self.head = nn.Sequential(*head)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features).squeeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class InputScaling(nn.Module):
    """``(x * pixel_scale - mean) / std`` as one affine op, from the preprocessing contract."""

    def __init__(self, contract: Contract) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(contract.pixel_scale / contract.std, dtype=torch.float32))
        self.register_buffer("shift", torch.tensor(-contract.mean / contract.std, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


class FractureNet(nn.Module):
    """Input scaling + backbone: raw pixels in, fracture logit out."""

    def __init__(self, backbone: nn.Module, contract: Contract) -> None:
        super().__init__()
        self.scaling = InputScaling(contract)
        self.backbone = backbone

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(self.scaling(x))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def build_network(contract: Contract, arch: str = "seed_cnn", **kwargs) -> FractureNet:
    """The network named ``arch`` for inputs made under ``contract``."""
    if arch != "seed_cnn":
        raise ValueError(f"unknown arch {arch!r}; available: seed_cnn")
    return FractureNet(FractureCNN(image_size=contract.image_size, in_channels=contract.channels, **kwargs), contract)
