"""Training and evaluation items: the cache of resized images (built once per run, shared across processes), the train-only augmentation on the CPU, one draw per image."""

from __future__ import annotations

import hashlib
import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from fracture.boxes import detection
from fracture.data.annotations import DatasetError
from fracture.imaging import preprocess
from fracture.imaging.contract import Contract
from fracture.progress import progress

Item = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]



@dataclass
class Augmentation:
    """Train-only augmentation; validation and test never see it.

    Args:
        enabled: switch all augmentation off.
        rotation: maximum rotation in degrees.
        translate: maximum shift as a fraction of the image side.
        scale_min: smallest zoom factor.
        scale_max: largest zoom factor.
        hflip: probability of a horizontal flip.
        brightness: brightness jitter (0 = none).
        contrast: contrast jitter (0 = none).
        noise_std: Gaussian noise in pixel units (0..255 scale).
    """

    enabled: bool = True
    rotation: float = 10.0
    translate: float = 0.05
    scale_min: float = 0.9
    scale_max: float = 1.1
    hflip: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2
    noise_std: float = 3.0


class _PixelNoise(torch.nn.Module):
    """Additive Gaussian noise in pixel units, clamped to the valid 0..255 range."""

    def __init__(self, std: float) -> None:
        super().__init__()
        self.std = std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + torch.randn_like(x) * self.std).clamp_(0.0, 255.0)


class Transform:
    """Train or eval transform of an (image, box mask) pair of uint8 ``H x W`` tensors.

    Geometry (affine, flip) moves image and mask together; the random crop
    (``crop`` px, placed over a box with probability ``crop_on_box``) cuts both,
    and a fractured image whose crop keeps under a quarter of its box area
    becomes a negative with an empty mask. Exposure and noise touch the image only.
    """

    def __init__(self, aug: Augmentation | None = None, crop: int | None = None, crop_on_box: float = 0.5, raw: bool = False) -> None:
        self.crop, self.crop_on_box, self.raw = crop, crop_on_box, raw
        self.geometry = self.exposure = self.noise = None
        if aug is not None and aug.enabled:
            self.geometry = v2.Compose([
                v2.RandomAffine(degrees=aug.rotation, translate=(aug.translate, aug.translate), scale=(aug.scale_min, aug.scale_max),
                                interpolation=v2.InterpolationMode.BILINEAR),
                v2.RandomHorizontalFlip(aug.hflip),
            ])
            if aug.brightness or aug.contrast:
                self.exposure = v2.ColorJitter(brightness=aug.brightness, contrast=aug.contrast)
            if aug.noise_std > 0:
                self.noise = _PixelNoise(aug.noise_std)

    def _crop(self, image: torch.Tensor, mask: torch.Tensor, label: float, has_boxes: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
        size = self.crop
        h, w = image.shape
        if size is None or size >= min(h, w):
            return image, mask, label
        on = mask.nonzero()
        if len(on) and float(torch.rand(())) < self.crop_on_box:
            r, c = on[int(torch.randint(len(on), ()))].tolist()  # a box pixel, anywhere inside the crop
            top = int(torch.randint(max(r - size + 1, 0), min(r, h - size) + 1, ()))
            left = int(torch.randint(max(c - size + 1, 0), min(c, w - size) + 1, ()))
        else:
            top, left = int(torch.randint(h - size + 1, ())), int(torch.randint(w - size + 1, ()))
        image, cut = image[top : top + size, left : left + size], mask[top : top + size, left : left + size]
        if has_boxes:
            total = int((mask > 0).sum())
            kept = int((cut > 0).sum())
            if label and kept < 0.25 * total:  # the fracture is (almost) outside the crop
                return image, torch.zeros_like(cut), 0.0
        return image, cut, label

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, label: float, has_boxes: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
        """→ (float ``1 x h x w`` pixels, float 0/1 ``1 x h x w`` mask, label); ``raw``: both uint8, for augmentation on the device."""
        if self.raw:
            return image.unsqueeze(0), (mask > 0).to(torch.uint8).unsqueeze(0), label
        if self.geometry is not None:
            both = self.geometry(torch.stack([image, mask]))
            image, mask = both[0], (both[1] > 127).to(torch.uint8) * 255
        image, mask, label = self._crop(image, mask, label, has_boxes)
        image = image.unsqueeze(0)
        if self.exposure is not None:
            image = self.exposure(image)
        image = image.to(torch.float32)
        if self.noise is not None:
            image = self.noise(image)
        return image, (mask > 0).to(torch.float32).unsqueeze(0), label


def eval_transform() -> Transform:
    """Pixels as float, nothing else."""
    return Transform()


def train_transform(aug: Augmentation, crop: int | None = None, crop_on_box: float = 0.5) -> Transform:
    """Random geometry, crop and exposure; the box mask moves with the pixels."""
    return Transform(aug, crop, crop_on_box)


class FractureDataset(Dataset):
    """Model inputs from a cached ``N x H x W`` uint8 array (with original sizes), or decoded per item when uncached."""

    def __init__(self, table: pd.DataFrame, contract: Contract, transform: Transform, images: np.ndarray | None = None,
                 max_pixels: int = preprocess.DEFAULT_MAX_PIXELS, sizes: np.ndarray | None = None) -> None:
        self.paths = table["path"].tolist()
        self.labels = table["label"].to_numpy(np.float32)
        boxes = table["boxes"] if "boxes" in table.columns else [""] * len(self.paths)
        self.boxes = [detection.parse_boxes(b) for b in boxes]
        self.contract = contract
        self.transform = transform
        self.images = images
        self.sizes = sizes
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def pixels(self, index: int) -> np.ndarray:
        """The preprocessed uint8 input of one item, before any augmentation."""
        return self.pixels_and_size(index)[0]

    def pixels_and_size(self, index: int) -> tuple[np.ndarray, tuple[int, int]]:
        if self.images is not None:
            return np.asarray(self.images[index]), tuple(self.sizes[index])
        return preprocess.load_with_size(self.paths[index], self.contract, self.max_pixels)

    def input_boxes(self, index: int, height: int, width: int) -> list[detection.Box]:
        """The item's true boxes in model input pixels."""
        return detection.to_input(self.boxes[index], height, width, self.contract)

    def __getitem__(self, index: int) -> Item:
        pixels, (h, w) = self.pixels_and_size(index)
        boxes = self.input_boxes(index, h, w)
        mask = detection.rasterize(boxes, *pixels.shape)
        has_boxes = bool(boxes)
        x, m, y = self.transform(torch.from_numpy(pixels.copy()), torch.from_numpy(mask), float(self.labels[index]), has_boxes)
        padded = torch.full((detection.MAX_BOXES, 4), -1.0)
        if boxes:
            kept = sorted(boxes, key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))[: detection.MAX_BOXES]
            padded[: len(kept)] = torch.tensor(kept, dtype=torch.float32)
        return x, torch.tensor(y, dtype=torch.float32), m, padded, torch.tensor(has_boxes)


def build_cache(paths: list[str], contract: Contract, mode: str, cache_dir: str | os.PathLike, max_pixels: int,
                desc: str = "cache") -> tuple[np.ndarray, np.ndarray]:
    """Decode and resize every image once; raise one DatasetError listing every unreadable file.

    Returns the ``N x S x S`` inputs and the ``N x 2`` original (height, width),
    which place boxes in letterboxed inputs. ``disk`` mode keeps both in
    ``cache_dir`` keyed by the files (path, size, mtime) and the contract, and
    memory-maps them on later runs.
    """
    target = None
    if mode == "disk":
        key = hashlib.sha256(contract.to_json().encode())
        for p in paths:
            st = os.stat(p)
            key.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        target = Path(cache_dir) / f"{desc}-{key.hexdigest()[:16]}.npy"
        size_file = target.with_suffix(".sizes.npy")
        if target.is_file() and size_file.is_file():
            return np.load(target, mmap_mode="r"), np.load(size_file)
    size = contract.image_size
    images = np.empty((len(paths), size, size), np.uint8)
    sizes = np.zeros((len(paths), 2), np.int64)
    errors: list[str] = []

    def work(i: int) -> None:
        try:
            images[i], sizes[i] = preprocess.load_with_size(paths[i], contract, max_pixels)
        except preprocess.ImageError as exc:
            errors.append(str(exc))

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for _ in progress(pool.map(work, range(len(paths))), total=len(paths), desc=desc):
            pass
    if errors:
        shown = "\n  ".join(sorted(errors)[:10])
        more = f"\n  … and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise DatasetError(f"{len(errors)} image(s) cannot be used; fix or remove them from annotations.csv:\n  {shown}{more}")
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        for array, path in ((sizes, size_file), (images, target)):  # images last: their presence means both are complete
            tmp = path.with_name(f".{path.stem}.{os.getpid()}-{secrets.token_hex(4)}.npy")  # unique per process and node
            np.save(tmp, array)
            os.replace(tmp, path)
    return images, sizes
