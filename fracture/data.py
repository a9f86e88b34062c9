"""Dataset and LightningDataModule: validated splits, a cache of resized images, train-only augmentation."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
from torchvision.transforms import v2

from fracture import preprocess
from fracture.annotations import Columns, DatasetError, load_splits
from fracture.audit import exact_leaks
from fracture.progress import progress


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


def eval_transform() -> v2.Transform:
    """uint8 ``1 x H x W`` → float pixel values, nothing else."""
    return v2.ToDtype(torch.float32, scale=False)


def train_transform(aug: Augmentation) -> v2.Transform:
    """Random geometry and exposure on the uint8 image, then noise on floats."""
    if not aug.enabled:
        return eval_transform()
    steps: list[torch.nn.Module] = [
        v2.RandomAffine(
            degrees=aug.rotation,
            translate=(aug.translate, aug.translate),
            scale=(aug.scale_min, aug.scale_max),
            interpolation=v2.InterpolationMode.BILINEAR,
        ),
        v2.RandomHorizontalFlip(aug.hflip),
    ]
    if aug.brightness or aug.contrast:
        steps.append(v2.ColorJitter(brightness=aug.brightness, contrast=aug.contrast))
    steps.append(v2.ToDtype(torch.float32, scale=False))
    if aug.noise_std > 0:
        steps.append(_PixelNoise(aug.noise_std))
    return v2.Compose(steps)


class FractureDataset(Dataset):
    """Model inputs from a cached ``N x H x W`` uint8 array, or decoded per item when uncached."""

    def __init__(self, table: pd.DataFrame, contract: preprocess.Contract, transform: v2.Transform, images: np.ndarray | None = None, max_pixels: int = preprocess.DEFAULT_MAX_PIXELS) -> None:
        self.paths = table["path"].tolist()
        self.labels = table["label"].to_numpy(np.float32)
        self.contract = contract
        self.transform = transform
        self.images = images
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def pixels(self, index: int) -> np.ndarray:
        """The preprocessed uint8 input of one item, before any augmentation."""
        if self.images is not None:
            return np.asarray(self.images[index])
        return preprocess.load(self.paths[index], self.contract, self.max_pixels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(self.pixels(index).copy()).unsqueeze(0)
        return self.transform(x), torch.tensor(self.labels[index])


def build_cache(paths: list[str], contract: preprocess.Contract, mode: str, cache_dir: str | os.PathLike, max_pixels: int, desc: str = "cache") -> np.ndarray:
    """Decode and resize every image once; raise one DatasetError listing every unreadable file.

    ``disk`` mode keeps the array in ``cache_dir`` keyed by the files (path,
    size, mtime) and the contract, and memory-maps it on later runs.
    """
    target = None
    if mode == "disk":
        key = hashlib.sha256(contract.to_json().encode())
        for p in paths:
            st = os.stat(p)
            key.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        target = Path(cache_dir) / f"{desc}-{key.hexdigest()[:16]}.npy"
        if target.is_file():
            return np.load(target, mmap_mode="r")
    size = contract.image_size
    images = np.empty((len(paths), size, size), np.uint8)
    errors: list[str] = []

    def work(i: int) -> None:
        try:
            images[i] = preprocess.load(paths[i], contract, max_pixels)
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
        tmp = target.with_suffix(".tmp.npy")
        np.save(tmp, images)
        os.replace(tmp, target)
    return images


class FractureDataModule(L.LightningDataModule):
    """Kaggle-style dataset root → train/val/test loaders.

    Args:
        root: dataset root holding ``train/``, ``test/`` and optionally ``val/``
            (each ``images/`` + ``annotations.csv``).
        image_size: side of the square model input in pixels.
        resize: ``stretch`` to the square, or ``letterbox`` (aspect kept, zero padded).
        batch_size: images per batch (per device).
        sampler: ``shuffle``, or ``balanced`` (draw each class equally often; an alternative to ``pos_weight``).
        num_workers: loader worker processes.
        val_fraction: share of train carved off for validation when there is no ``val/``.
        split_seed: seed of that carve-out.
        cache: ``memory`` (decode once per run), ``disk`` (decode once, memory-map after) or ``none``.
        cache_dir: where ``disk`` caches live.
        max_pixels: images whose header claims more pixels are refused before decoding.
        allow_leakage: train even when an image file is byte-identical across splits.
        columns: annotation column names (auto-detected when unset).
        augmentation: train-only augmentation.
    """

    def __init__(
        self,
        root: str = "data",
        image_size: int = 224,
        resize: Literal["stretch", "letterbox"] = "stretch",
        batch_size: int = 32,
        sampler: Literal["shuffle", "balanced"] = "shuffle",
        num_workers: int = 2,
        val_fraction: float = 0.15,
        split_seed: int = 42,
        cache: Literal["memory", "disk", "none"] = "memory",
        cache_dir: str = "data/.cache",
        max_pixels: int = preprocess.DEFAULT_MAX_PIXELS,
        allow_leakage: bool = False,
        columns: Columns | None = None,
        augmentation: Augmentation | None = None,
    ) -> None:
        super().__init__()
        self.root = root
        self.contract = preprocess.Contract(image_size=image_size, resize=resize)
        self.batch_size = batch_size
        self.sampler = sampler
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.cache = cache
        self.cache_dir = cache_dir
        self.max_pixels = max_pixels
        self.allow_leakage = allow_leakage
        self.columns = columns or Columns()
        self.augmentation = augmentation or Augmentation()
        self.tables: dict[str, pd.DataFrame] = {}
        self.datasets: dict[str, FractureDataset] = {}

    def check(self) -> dict[str, pd.DataFrame]:
        """Parse and validate every split (cheap: no decoding); raises DatasetError."""
        if not self.tables:
            train_csv = Path(self.root) / "train" / "annotations.csv"
            if not train_csv.is_file():
                raise DatasetError(missing_dataset_message(self.root))
            tables = load_splits(self.root, self.columns, self.val_fraction, self.split_seed)
            leaks = exact_leaks(tables)
            if leaks and not self.allow_leakage:
                shown = "\n  ".join(leaks[:10])
                raise DatasetError(f"{len(leaks)} problem(s) found before training (run `python -m fracture.audit {self.root}` for the full audit; "
                                   f"--data.allow_leakage true to train anyway):\n  {shown}")
            self.tables = tables
        return self.tables

    @property
    def class_counts(self) -> dict[str, int]:
        """Images per class in the train split (for ``pos_weight: auto`` and the export metadata)."""
        labels = self.check()["train"]["label"].to_numpy()
        return {"not_fractured": int((labels == 0).sum()), "fractured": int((labels == 1).sum())}

    def _dataset(self, split: str) -> FractureDataset:
        if split not in self.datasets:
            table = self.check()[split]
            images = None
            if self.cache != "none":
                images = build_cache(table["path"].tolist(), self.contract, self.cache, self.cache_dir, self.max_pixels, desc=split)
            transform = train_transform(self.augmentation) if split == "train" else eval_transform()
            self.datasets[split] = FractureDataset(table, self.contract, transform, images, self.max_pixels)
        return self.datasets[split]

    def setup(self, stage: str) -> None:
        for split in {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}[stage]:
            self._dataset(split)

    def _loader(self, split: str, train: bool) -> DataLoader:
        dataset = self._dataset(split)
        sampler = None
        if not train and torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            # the default distributed sampler pads with repeated images: metrics would count some twice
            sampler = UnrepeatedDistributedSampler(dataset, shuffle=False)
        if train and self.sampler == "balanced":
            labels = dataset.labels.astype(int)
            weights = 1.0 / np.bincount(labels, minlength=2)[labels]
            sampler = WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double), num_samples=len(labels), replacement=True)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_last=train and len(dataset) > self.batch_size,  # no 1-image batch for batch-norm
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)


def missing_dataset_message(root: str | os.PathLike) -> str:
    root = Path(root)
    return f"""no dataset at {root / 'train' / 'annotations.csv'}

fracture.fit expects a Kaggle-style dataset:
  {root}/train/images/…   {root}/train/annotations.csv
  {root}/test/images/…    {root}/test/annotations.csv      ({root}/val/ optional)
annotations.csv has one row per image: an image path relative to images/ and a
fracture label (0/1, yes/no, fractured/not fractured); see README.md, "Dataset".
Download a bone-fracture X-ray dataset (for example FracAtlas, CC BY 4.0, or a
Kaggle "bone fracture" dataset) and import it into this layout:
  python -m fracture.datasets import fracatlas|folders|yolo SRC --out {root}
then train:  python -m fracture.fit --config configs/default.yaml --data.root {root}

No dataset yet? Train the demo on built-in synthetic radiographs:
  python -m fracture.synth --out data/synthetic && python -m fracture.fit --config configs/demo.yaml"""


def write_splits(tables: dict[str, pd.DataFrame], path: str | os.PathLike) -> None:
    """Record which image went to which split, so a run's split can be audited later."""
    parts = [t[["path", "label", "fracture_type", "group"]].assign(split=s) for s, t in tables.items()]
    pd.concat(parts)[["split", "path", "label", "fracture_type", "group"]].to_csv(path, index=False)
