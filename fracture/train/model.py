"""Networks: the seed CNN ported from the Keras project, wrapped with its input scaling.

Every network takes raw pixel values (float, 0..255, shape ``N x 1 x H x W``)
exactly as :func:`fracture.imaging.preprocess.load` produces them and returns one
fracture logit per image. Scaling and normalisation live inside the network,
so the exported ONNX graph carries them too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fracture.imaging.contract import Contract


class SplitBackbone(nn.Module):
    """A backbone as ``features`` (the last conv map, which the localiser and Grad-CAM read) and a one-logit ``head``."""

    features: nn.Module
    head: nn.Module

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features).squeeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class FractureCNN(SplitBackbone):
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


class TorchvisionBackbone(SplitBackbone):
    """A torchvision classifier split into ``features`` (last conv map) and a one-logit ``head``."""

    def __init__(self, features: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.features = features
        self.head = head


class Pyramid(nn.Module):
    """A backbone's ``features`` run block by block, returning the last map of every stride from 8 up."""

    def __init__(self, features: nn.Sequential, in_channels: int = 1, probe: int = 64) -> None:
        super().__init__()
        self.features = features
        was = features.training
        features.eval()
        x = torch.zeros(1, in_channels, probe, probe)
        last_at: dict[int, tuple[int, int]] = {}
        with torch.no_grad():
            for i, block in enumerate(features):
                x = block(x)
                stride = probe // x.shape[-1]
                if stride >= 8:
                    last_at[stride] = (i, x.shape[1])
        features.train(was)
        if 8 not in last_at:
            raise ValueError("the localise head needs a feature map at stride 8 (seed CNN: 3 pooling blocks)")
        self.taps = [last_at[s][0] for s in sorted(last_at)]
        self.channels = [last_at[s][1] for s in sorted(last_at)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, block in enumerate(self.features):
            x = block(x)
            if i in self.taps:
                out.append(x)
            if i == self.taps[-1]:
                break
        return out


class FusedLogits(nn.Module):
    """Two image logits fused as ``scale * (fusion * first + (1 - fusion) * second) + shift``; buffers chosen on
    validation, so checkpoint and ONNX graph agree. ``fusion`` is 1, 0 or 0.5; ``scale`` and ``shift`` are a
    Platt recalibration (1 and 0 until ``fracture.ensemble`` fits one). ``logit_names`` names the two."""

    logit_names = ("map", "joint")
    IDENTITY = {"scale": 1.0, "shift": 0.0}

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("fusion", torch.tensor(0.5))
        for name, value in self.IDENTITY.items():
            self.register_buffer(name, torch.tensor(value))

    def fuse(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return self.scale * (self.fusion * first + (1 - self.fusion) * second) + self.shift

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        """Checkpoints from before the recalibration existed load as uncalibrated (scale 1, shift 0)."""
        for name, value in self.IDENTITY.items():
            state_dict.setdefault(prefix + name, torch.tensor(value))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class LocaliseNet(FusedLogits):
    """Input scaling + backbone + a light FPN decoder: a fracture map at stride 8 and an image logit.

    The decoder merges every stride from 8 up (1x1 lateral convs, nearest 2x
    upsampling, addition) and ends in two 3x3 conv blocks and a 1x1 conv: one
    map logit per 8x8 input cell. The image logit is a fusion of two heads:
    log-sum-exp pooling of the map (``map``) and a global-average-pool linear
    head on the deepest features (``joint``); ``fusion`` (a buffer, chosen on
    validation) weighs them: 1 = map only, 0 = joint only. Fully convolutional,
    so it trains on crops and predicts on the whole input.

    Args:
        features: the backbone's feature blocks (seed CNN or resnet).
        contract: the preprocessing contract (input scaling).
        width: decoder channels.
        lse_r: sharpness of the log-sum-exp pooling (large = max, small = mean).
    """

    def __init__(self, features: nn.Sequential, contract: Contract, width: int = 96, lse_r: float = 5.0) -> None:
        super().__init__()
        self.scaling = InputScaling(contract)
        self.pyramid = Pyramid(features, contract.channels)
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in self.pyramid.channels)
        block = [nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        self.decoder = nn.Sequential(*block, *[nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)])
        self.map_out = nn.Conv2d(width, 1, 1)
        nn.init.constant_(self.map_out.bias, -4.0)  # fractures cover ~1 % of cells: start near that prior
        self.joint = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(self.pyramid.channels[-1], 1))
        self.lse_r = lse_r

    def forward_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(map-pooled logit, joint logit, map logits ``N x H/8 x W/8``)."""
        feats = self.pyramid(self.scaling(x))
        top = self.lateral[-1](feats[-1])
        for f, lateral in zip(reversed(feats[:-1]), reversed(list(self.lateral)[:-1])):
            top = nn.functional.interpolate(top, scale_factor=2.0, mode="nearest") + lateral(f)
        maps = self.map_out(self.decoder(top)).squeeze(1)
        flat = maps.flatten(1) * self.lse_r
        pooled = (torch.logsumexp(flat, dim=1) - math.log(flat.shape[1])) / self.lse_r
        return pooled, self.joint(feats[-1]).squeeze(1), maps

    def forward_logit_map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image logit, map logits): what evaluation and export use."""
        pooled, joint, maps = self.forward_maps(x)
        return self.fuse(pooled, joint), maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_logit_map(x)[0]


def _gray_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """The same first convolution taking one channel."""
    return nn.Conv2d(1, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None)


def _torchvision(arch: str) -> TorchvisionBackbone:
    import torchvision

    m = getattr(torchvision.models, arch)(weights=None)
    pool = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if arch.startswith("resnet"):
        m.conv1 = _gray_conv(m.conv1)
        features = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4)
        return TorchvisionBackbone(features, nn.Sequential(*pool, nn.Linear(m.fc.in_features, 1)))
    if arch.startswith("densenet"):
        m.features.conv0 = _gray_conv(m.features.conv0)
        return TorchvisionBackbone(nn.Sequential(m.features, nn.ReLU()), nn.Sequential(*pool, nn.Linear(m.classifier.in_features, 1)))
    if arch.startswith("efficientnet"):
        m.features[0][0] = _gray_conv(m.features[0][0])
        return TorchvisionBackbone(m.features, nn.Sequential(*pool, nn.Dropout(m.classifier[0].p), nn.Linear(m.classifier[1].in_features, 1)))
    if arch.startswith("convnext"):
        m.features[0][0] = _gray_conv(m.features[0][0])
        norm = m.classifier[0]
        return TorchvisionBackbone(m.features, nn.Sequential(nn.AdaptiveAvgPool2d(1), norm, nn.Flatten(), nn.Linear(m.classifier[2].in_features, 1)))
    raise ValueError(f"unknown arch {arch!r}")


ARCHS = ("seed_cnn", "resnet18", "resnet34", "resnet50", "densenet121", "efficientnet_b0", "convnext_tiny")
LOCALISE_ARCHS = ("seed_cnn", "resnet18", "resnet34", "resnet50")


def load_local_weights(backbone: nn.Module, path: str) -> None:
    """Load a local torchvision state dict: RGB first conv summed to gray, classifier left fresh.

    Never downloads. A missing file or a state dict of another architecture is a clear error.
    """
    import os

    if not os.path.isfile(path):
        raise FileNotFoundError(f"model.weights: {path} not found (weights are never downloaded; give a local torchvision state dict)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    own = backbone.state_dict()
    # map torchvision names to ours by matching parameter order within equal shapes
    mapped, skipped = {}, []
    theirs = [(k, v) for k, v in state.items() if not k.startswith(("fc.", "classifier."))]
    ours = [(k, v) for k, v in own.items() if not k.startswith("head.")]
    if len(theirs) != len(ours):
        raise ValueError(f"model.weights: {path} has {len(theirs)} feature tensors, this architecture {len(ours)}: wrong architecture?")
    for (tk, tv), (ok, ov) in zip(theirs, ours):
        if tv.ndim == 4 and tv.shape[1] == 3 and ov.shape[1] == 1:
            tv = tv.sum(dim=1, keepdim=True)  # fold RGB into one channel: same response to a gray image
        if tv.shape != ov.shape:
            raise ValueError(f"model.weights: {tk} has shape {tuple(tv.shape)}, expected {tuple(ov.shape)} for {ok}: wrong architecture?")
        mapped[ok] = tv
    missing = backbone.load_state_dict(mapped, strict=False)
    skipped = [k for k in missing.missing_keys if not k.startswith("head.")]
    if skipped:
        raise ValueError(f"model.weights: {path} lacks {skipped[:3]}")


def build_network(contract: Contract, arch: str = "seed_cnn", weights: str | None = None, head: str = "classify", **kwargs) -> nn.Module:
    """The network named ``arch`` for inputs made under ``contract``; ``kwargs`` configure the seed CNN.

    ``head="classify"``: one logit per image (:class:`FractureNet`); ``"localise"``:
    a fracture map and an image logit (:class:`LocaliseNet`).
    """
    if head not in ("classify", "localise"):
        raise ValueError(f"head must be classify or localise, got {head!r}")
    if head == "localise" and arch not in LOCALISE_ARCHS:
        raise ValueError(f"the localise head is built for {', '.join(LOCALISE_ARCHS)}, not {arch!r}")
    if arch == "seed_cnn":
        if head == "localise":
            kwargs["pool"] = "max"  # the dense head is not used; a flatten head would only waste memory
        backbone: nn.Module = FractureCNN(image_size=contract.image_size, in_channels=contract.channels, **kwargs)
    elif arch in ARCHS:
        backbone = _torchvision(arch)
    else:
        raise ValueError(f"unknown arch {arch!r}; available: {', '.join(ARCHS)}")
    if weights:
        load_local_weights(backbone, weights)
    if head == "localise":
        return LocaliseNet(backbone.features, contract)
    return FractureNet(backbone, contract)
