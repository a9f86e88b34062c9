"""Dataset and LightningDataModule: validated splits, a cache of resized images, train-only augmentation.

Every item is ``(image, label, mask, boxes, has_boxes)``: the float pixels
``1 x H x W``, the 0/1 label, the fracture-box mask over those pixels (0/1,
moved with the pixels by every augmentation and crop), the true boxes in model
input pixels (``MAX_BOXES x 4``, padded with -1; unaugmented, for scoring on
validation/test) and whether the image has box annotations at all.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, WeightedRandomSampler

from fracture.data.annotations import Columns, DatasetError, load_splits
from fracture.imaging import preprocess
from fracture.imaging.contract import Contract
from fracture.train.augment import device_augment
from fracture.train.dataset import Augmentation, FractureDataset, Item, Transform, build_cache, eval_transform, train_transform


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
        reduced_decode: decode large images at 1/2-1/8 scale when that stays at or above ``image_size``: JPEGs
            in libjpeg, other containers as their JPEG would be (recorded in the contract, so deployment decodes
            the same way).
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
        self.contract = Contract(image_size=image_size, resize=resize, train_crop=crop, reduced_decode=reduced_decode)
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
