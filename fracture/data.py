"""Dataset and LightningDataModule: validated splits, a cache of resized images, train-only augmentation.

Every item is ``(image, label, mask, boxes, has_boxes)``: the float pixels
``1 x H x W``, the 0/1 label, the fracture-box mask over those pixels (0/1,
moved with the pixels by every augmentation and crop), the true boxes in model
input pixels (``MAX_BOXES x 4``, padded with -1; unaugmented, for scoring on
validation/test) and whether the image has box annotations at all.
"""

from __future__ import annotations

import hashlib
import os
import secrets
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

from fracture import detection, preprocess
from fracture.annotations import Columns, DatasetError, load_splits
from fracture.augment import device_augment
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


Item = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class FractureDataset(Dataset):
    """Model inputs from a cached ``N x H x W`` uint8 array (with original sizes), or decoded per item when uncached."""

    def __init__(self, table: pd.DataFrame, contract: preprocess.Contract, transform: Transform, images: np.ndarray | None = None,
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


def build_cache(paths: list[str], contract: preprocess.Contract, mode: str, cache_dir: str | os.PathLike, max_pixels: int,
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
        split_seed: seed of that carve-out (and of the folds).
        folds: cross-validation: cut train into this many grouped, label-stratified folds and validate on
            fold ``fold`` (the test split is untouched); compare recipes with ``python -m fracture.folds``.
        fold: which fold validates (0 .. folds-1).
        cache: ``memory`` (decode once per run), ``disk`` (decode once, memory-map after) or ``none``. With
            several processes (DDP) ``memory`` is built once, by the first process of each machine, into
            ``cache_dir`` and memory-mapped by all of them (one copy, in the page cache).
        cache_dir: where ``disk`` (and shared ``memory``) caches live.
        crop: train on random ``crop`` px squares of the ``image_size`` input (validation and test see the
            whole input; needs a fully convolutional model such as ``head: localise`` under ``model.net``); ``null`` = no crop.
        crop_on_box: probability that a training crop is placed over a fracture box (images with boxes).
        reduced_decode: decode large JPEGs at 1/2-1/8 scale when that stays at or above ``image_size``
            (recorded in the contract, so deployment decodes the same way).
        max_pixels: images whose header claims more pixels are refused before decoding.
        allow_leakage: train even when copies of one radiograph (exact or near duplicates) are in two splits,
            or a file is empty; the problems are recorded in ``run_info.json``.
        columns: annotation column names (auto-detected when unset).
        augmentation: train-only augmentation.
        augment_on: ``cpu`` (in the loader workers) or ``device``: the loader hands uint8 batches (pinned on a
            GPU) and :func:`fracture.augment.device_augment` warps them after the transfer, one draw per image.
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
        folds: int | None = None,
        fold: int = 0,
        cache: Literal["memory", "disk", "none"] = "memory",
        cache_dir: str = "data/.cache",
        crop: int | None = None,
        crop_on_box: float = 0.5,
        reduced_decode: bool = True,
        max_pixels: int = preprocess.DEFAULT_MAX_PIXELS,
        allow_leakage: bool = False,
        columns: Columns | None = None,
        augmentation: Augmentation | None = None,
        augment_on: Literal["cpu", "device"] = "cpu",
    ) -> None:
        super().__init__()
        self.root = root
        self.contract = preprocess.Contract(image_size=image_size, resize=resize, train_crop=crop, reduced_decode=reduced_decode)
        self.batch_size = batch_size
        self.sampler = sampler
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.folds, self.fold = folds, fold
        self.cache = cache
        self.cache_dir = cache_dir
        self.crop, self.crop_on_box = crop, crop_on_box
        self.max_pixels = max_pixels
        self.allow_leakage = allow_leakage
        self.columns = columns or Columns()
        self.augmentation = augmentation or Augmentation()
        self.augment_on = augment_on
        self.tables: dict[str, pd.DataFrame] = {}
        self.datasets: dict[str, FractureDataset] = {}

    def check(self) -> dict[str, pd.DataFrame]:
        """Parse and validate every split (cheap: no decoding); raises DatasetError."""
        if not self.tables:
            train_csv = Path(self.root) / "train" / "annotations.csv"
            if not train_csv.is_file():
                raise DatasetError(missing_dataset_message(self.root))
            self.tables = load_splits(self.root, self.columns, self.val_fraction, self.split_seed, self.allow_leakage,
                                      self.folds, self.fold)
        return self.tables

    @property
    def class_counts(self) -> dict[str, int]:
        """Images per class in the train split (for ``pos_weight: auto`` and the export metadata)."""
        labels = self.check()["train"]["label"].to_numpy()
        return {"not_fractured": int((labels == 0).sum()), "fractured": int((labels == 1).sum())}

    def _cache_mode(self) -> str:
        """``disk`` when the cache is shared between processes, else the configured mode."""
        world = getattr(self.trainer, "world_size", 1) if self.trainer is not None else 1
        return "disk" if self.cache == "disk" or (self.cache == "memory" and world > 1) else self.cache

    def prepare_data(self) -> None:
        """Lightning calls this on one process per machine before any ``setup``: shared caches are built here, once."""
        if self._cache_mode() == "disk":
            for split, table in self.check().items():
                build_cache(table["path"].tolist(), self.contract, "disk", self.cache_dir, self.max_pixels, desc=split)

    def _dataset(self, split: str) -> FractureDataset:
        if split not in self.datasets:
            table = self.check()[split]
            images = sizes = None
            if self.cache != "none":
                images, sizes = build_cache(table["path"].tolist(), self.contract, self._cache_mode(), self.cache_dir, self.max_pixels, desc=split)
            if split != "train":
                transform = eval_transform()
            elif self.augment_on == "device":
                transform = Transform(raw=True)
            else:
                transform = train_transform(self.augmentation, self.crop, self.crop_on_box)
            self.datasets[split] = FractureDataset(table, self.contract, transform, images, self.max_pixels, sizes)
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

    def on_after_batch_transfer(self, batch: Item, dataloader_idx: int) -> Item:
        """Training batches that arrive as uint8 (``augment_on: device``) are augmented here, on the device."""
        if batch[0].dtype != torch.uint8:
            return batch
        x, mask, y = device_augment(batch[0], batch[2], batch[1], batch[4], self.augmentation, self.crop, self.crop_on_box)
        return x, y, mask, batch[3], batch[4]

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
    parts = [t[["path", "label", "fracture_type", "group", "study"]].assign(split=s) for s, t in tables.items()]
    pd.concat(parts)[["split", "path", "label", "fracture_type", "group", "study"]].to_csv(path, index=False)
