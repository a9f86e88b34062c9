"""The preprocessing contract a model carries (input size, resize method, scaling, crop, reduced decoding; versioned) and the geometry it implies: one place, stored in every checkpoint and ONNX file."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

import cv2
import numpy as np

RESIZE_METHODS = ("stretch", "letterbox")


_INTERPOLATION = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR}


CONTRACT_VERSION = 3  # 2: train_crop, version; 3: reduced_decode


_ADDED = {"train_crop": (2, None), "reduced_decode": (3, False)}  # field: (version it came in, what older models did)


@dataclass(frozen=True)
class Contract:
    """Everything a model needs to know about how its input was made.

    Stored in the checkpoint and in the ONNX metadata; the predictor rebuilds
    it from there and never from command-line flags. ``train_crop`` records the
    square crop the model was trained on (``None``: whole inputs); prediction
    always uses the whole ``image_size`` input. ``reduced_decode``: large JPEGs
    are decoded at 1/2, 1/4 or 1/8 scale by libjpeg (the largest reduction that
    stays at or above the input size), which is far cheaper than decoding every
    pixel and then throwing most away. Contracts of older versions still load,
    with the behaviour their models were trained with (no crop, full decode).
    """

    image_size: int = 224
    channels: int = 1
    resize: str = "stretch"
    interpolation: str = "area"
    pixel_scale: float = 1.0 / 255.0
    mean: float = 0.5
    std: float = 0.25
    train_crop: int | None = None
    reduced_decode: bool = False
    version: int = CONTRACT_VERSION

    def __post_init__(self) -> None:
        if not 16 <= int(self.image_size) <= 1024:
            raise ValueError(f"image_size must be within 16..1024, got {self.image_size}")
        if self.channels != 1:
            raise ValueError(f"only single-channel (grayscale) inputs are supported, got channels={self.channels}")
        if self.resize not in RESIZE_METHODS:
            raise ValueError(f"resize must be one of {RESIZE_METHODS}, got {self.resize!r}")
        if self.interpolation not in _INTERPOLATION:
            raise ValueError(f"interpolation must be one of {tuple(_INTERPOLATION)}, got {self.interpolation!r}")
        if not self.std > 0:
            raise ValueError(f"std must be positive, got {self.std}")
        if self.train_crop is not None and not 16 <= self.train_crop <= self.image_size:
            raise ValueError(f"train_crop must be within 16..image_size, got {self.train_crop}")
        if self.version > CONTRACT_VERSION:
            raise ValueError(f"preprocessing contract version {self.version} is newer than this fracture ({CONTRACT_VERSION}); upgrade fracture")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Contract:
        """Rebuild from stored metadata, refusing unknown or missing keys (a version-1 contract lacks the v2 ones)."""
        names = {f.name for f in fields(cls)}
        data = dict(data)
        data.setdefault("version", 1)  # version 1 had no version field
        for name, (since, legacy) in _ADDED.items():
            if data["version"] < since:
                data.setdefault(name, legacy)
        unknown = set(data) - names
        missing = names - set(data)
        if unknown or missing:
            raise ValueError(f"preprocessing contract has unknown keys {sorted(unknown)} / misses {sorted(missing)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


@dataclass(frozen=True)
class Geometry:
    """Where the original image lies inside the model input, to map heatmaps back."""

    height: int
    width: int
    top: int
    left: int
    inner_height: int
    inner_width: int


def geometry(height: int, width: int, contract: Contract) -> Geometry:
    """Where an image of this size lands inside the square model input."""
    size = contract.image_size
    if contract.resize == "stretch":
        return Geometry(height, width, 0, 0, size, size)
    scale = size / max(height, width)
    ih, iw = max(1, round(height * scale)), max(1, round(width * scale))
    return Geometry(height, width, (size - ih) // 2, (size - iw) // 2, ih, iw)


def resize(img: np.ndarray, contract: Contract) -> np.ndarray:
    """Resize a decoded grayscale image to the model's square input."""
    g = geometry(img.shape[0], img.shape[1], contract)
    interp = _INTERPOLATION[contract.interpolation]
    inner = cv2.resize(img, (g.inner_width, g.inner_height), interpolation=interp)
    if contract.resize == "stretch":
        return inner
    out = np.zeros((contract.image_size, contract.image_size), np.uint8)
    out[g.top : g.top + g.inner_height, g.left : g.left + g.inner_width] = inner
    return out
