from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fracture.data.annotations import DatasetError
from fracture.imaging import preprocess
from fracture.imaging.contract import Contract
from fracture.train.data import FractureDataModule
from fracture.train.dataset import Augmentation, build_cache


def test_eval_inputs_equal_a_direct_preprocess_call(synth_root: Path) -> None:
    dm = FractureDataModule(root=str(synth_root), image_size=48, num_workers=0)
    dm.setup("fit")
    dm.setup("test")
    for split in ("val", "test"):
        ds = dm.datasets[split]
        for i in (0, len(ds) - 1):
            x, y = ds[i][:2]
            direct = preprocess.load(ds.paths[i], dm.contract)  # the contract the data module made (reduced decoding on)
            assert x.dtype == torch.float32 and x.shape == (1, 48, 48)
            assert torch.equal(x[0], torch.from_numpy(direct).float())
            assert float(y) == float(dm.tables[split]["label"].iloc[i])


def test_augmentation_only_on_train(synth_root: Path) -> None:
    torch.manual_seed(0)
    dm = FractureDataModule(root=str(synth_root), image_size=48, num_workers=0)
    dm.setup("fit")
    dm.setup("test")
    train, val, test = dm.datasets["train"], dm.datasets["val"], dm.datasets["test"]
    assert not torch.equal(train[0][0], train[0][0])
    assert not torch.equal(train[0][0][0], torch.from_numpy(train.pixels(0)).float())
    assert 0.0 <= float(train[0][0].min()) and float(train[0][0].max()) <= 255.0
    assert torch.equal(val[0][0], val[0][0]) and torch.equal(test[0][0], test[0][0])
    off = FractureDataModule(root=str(synth_root), image_size=48, num_workers=0, augmentation=Augmentation(enabled=False))
    off.setup("fit")
    assert torch.equal(off.datasets["train"][0][0], off.datasets["train"][0][0])


def test_disk_cache_is_reused_and_matches_memory(synth_root: Path, tmp_path: Path) -> None:
    paths = sorted(str(p) for p in (synth_root / "test" / "images").glob("*.png"))[:10]
    contract = Contract(image_size=40)
    mem, mem_sizes = build_cache(paths, contract, "memory", tmp_path, preprocess.DEFAULT_MAX_PIXELS)
    disk, disk_sizes = build_cache(paths, contract, "disk", tmp_path, preprocess.DEFAULT_MAX_PIXELS)
    assert len(list(tmp_path.glob("*.npy"))) == 2  # inputs + original sizes
    again, again_sizes = build_cache(paths, contract, "disk", tmp_path, preprocess.DEFAULT_MAX_PIXELS)
    assert isinstance(again, np.memmap)
    assert np.array_equal(mem, disk) and np.array_equal(mem, again)
    assert np.array_equal(mem_sizes, again_sizes) and tuple(mem_sizes[0]) == preprocess.read_image(paths[0]).shape
    build_cache(paths, Contract(image_size=32), "disk", tmp_path, preprocess.DEFAULT_MAX_PIXELS)
    assert len(list(tmp_path.glob("*.npy"))) == 4  # a new contract is a new cache


def test_unreadable_images_are_all_reported_before_training(synth_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "ds"
    shutil.copytree(synth_root, root)
    dm = FractureDataModule(root=str(root), image_size=48, num_workers=0)
    images = [Path(p) for p in dm.check()["train"]["path"][:2]]
    images[0].write_bytes(b"")
    images[1].write_bytes(b"garbage" * 10)
    with pytest.raises(DatasetError) as info:
        dm.setup("fit")
    assert "2 image(s) cannot be used" in str(info.value)
    assert images[0].name in str(info.value) and images[1].name in str(info.value)


def test_class_counts_come_from_train(synth_root: Path) -> None:
    dm = FractureDataModule(root=str(synth_root), image_size=48)
    counts = dm.class_counts
    labels = dm.tables["train"]["label"]
    assert counts == {"not_fractured": int((labels == 0).sum()), "fractured": int((labels == 1).sum())}
