"""The GPU researcher's path, on the CPU: device-side augmentation, shared caches, bf16, 2-process DDP with EMA."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, tiny_fit_args, val_auroc_of

from fracture.data.synth import radiograph
from fracture.imaging import preprocess
from fracture.train import fit
from fracture.train.augment import device_augment
from fracture.train.data import FractureDataModule
from fracture.train.dataset import Augmentation

GEOMETRY = Augmentation(rotation=15.0, translate=0.1, scale_min=0.8, scale_max=1.2, hflip=0.5, brightness=0.0, contrast=0.0, noise_std=0.0)


def _batch(n: int = 8, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    img = np.rint(radiograph(np.random.default_rng(0), True, "oblique", shape=(size, size)) * 255).astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[20:36, 24:44] = 1
    return torch.from_numpy(img).expand(n, 1, size, size).clone(), torch.from_numpy(mask).expand(n, 1, size, size).clone()


def test_device_augmentation_draws_differently_for_every_image() -> None:
    x, mask = _batch()
    y, boxes = torch.ones(8), torch.ones(8, dtype=torch.bool)
    out, _, _ = device_augment(x, mask, y, boxes, Augmentation(), generator=torch.Generator().manual_seed(0))
    flat = out.flatten(1)
    assert out.dtype == torch.float32 and 0 <= float(out.min()) and float(out.max()) <= 255
    assert all(not torch.allclose(flat[i], flat[j]) for i in range(8) for j in range(i + 1, 8))  # same image in, 8 different draws out
    same, _, _ = device_augment(x, mask, y, boxes, Augmentation(enabled=False))
    assert torch.equal(same, x.float())


def test_device_augmentation_moves_the_mask_with_the_pixels_and_relabels_lost_crops() -> None:
    _, mask = _batch(16)
    picture = mask * 255  # the image is its own box: wherever the pixels go, the mask must follow
    y, boxes = torch.ones(16), torch.ones(16, dtype=torch.bool)
    out, moved, _ = device_augment(picture, mask, y, boxes, GEOMETRY, generator=torch.Generator().manual_seed(1))
    assert ((out > 127).float() == moved).float().mean() > 0.99 and not torch.equal(moved, mask.float())
    out, cut, label = device_augment(picture, mask, y, boxes, GEOMETRY, crop=24, crop_on_box=0.0, generator=torch.Generator().manual_seed(2))
    kept = cut.flatten(1).sum(1)
    assert out.shape == (16, 1, 24, 24) and ((out[label == 1] > 127).float() == cut[label == 1]).float().mean() > 0.99
    assert set(label.tolist()) == {0.0, 1.0}  # some crops miss the fracture, some keep it
    assert bool((kept[label == 0] == 0).all()) and bool((kept[label == 1] > 0).all())
    _, mask = _batch(64)
    y, boxes = torch.ones(64), torch.ones(64, dtype=torch.bool)
    kept = [device_augment(mask * 255, mask, y, boxes, Augmentation(enabled=False), crop=24, crop_on_box=p, generator=torch.Generator().manual_seed(3))[2].mean()
            for p in (0.0, 1.0)]
    assert kept[1] > kept[0] + 0.3  # crops placed over the box keep the fracture far more often


def test_a_shared_cache_is_built_once_and_memory_mapped_by_every_process(synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def made(world: int) -> FractureDataModule:
        dm = FractureDataModule(root=str(synth_root), image_size=32, num_workers=0, cache="memory", cache_dir=str(tmp_path / "cache"))
        dm.trainer = SimpleNamespace(world_size=world)
        return dm

    made(2).prepare_data()  # what Lightning runs on the first process of each machine, before a barrier
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len([f for f in files if not f.endswith(".sizes.npy")]) == 3 and not any(f.startswith(".") for f in files)
    monkeypatch.setattr(preprocess, "load_with_size", lambda *a, **k: pytest.fail("a second process decoded an image"))
    other = made(2)  # another rank: finds the files and maps them
    other.setup("fit")
    assert isinstance(other.datasets["train"].images, np.memmap) and len(other.datasets["val"]) > 0
    single = made(1)
    assert single._cache_mode() == "memory"


def test_bf16_device_augmented_channels_last_smoke_fit(synth_root: Path, tmp_path: Path) -> None:
    args = tiny_fit_args(synth_root, tmp_path, "--trainer.precision", "bf16-mixed", "--data.augment_on", "device", "--model.channels_last", "true",
                         "--test_after_fit", "false", "--trainer.check_val_every_n_epoch", "2", epochs=2)
    assert fit.main(args) == 0
    logs = pd.read_csv(tmp_path / "tiny" / "metrics.csv")
    assert logs["val/auroc"].notna().sum() == 1 and np.isfinite(logs["train/loss_epoch"].dropna()).all()
    # timed once per epoch, also the epoch that is not validated
    assert (logs["perf/images_per_s"].dropna() > 0).sum() == 2 and (logs["perf/train_epoch_s"].dropna() > 0).all()
    # trained in bf16, validated in fp32: the logged AUROC is the one the fp32 weights (and the ONNX file) give
    assert val_auroc_of(tmp_path / "tiny" / "last.ckpt", synth_root) == pytest.approx(logs["val/auroc"].dropna().iloc[-1], abs=1e-6)


def _fit_process(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "fracture.fit", *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, **kw)


def test_two_process_ddp_with_ema_trains_validates_averaged_weights_and_resumes_after_a_kill(synth_root: Path, tmp_path: Path) -> None:
    ddp = ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--model.ema_decay", "0.9", "--test_after_fit", "false"]
    run = tmp_path / "tiny"
    proc = _fit_process(tiny_fit_args(synth_root, tmp_path, *ddp, epochs=30))
    deadline = time.monotonic() + 300
    while not (run / "last.ckpt").is_file():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 5 minutes"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # both ranks die mid-run
    proc.wait()
    killed_at = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)["epoch"]
    resumed = _fit_process(tiny_fit_args(synth_root, tmp_path, *ddp, "--ckpt_path", "last", epochs=killed_at + 2))
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    ckpt = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == killed_at + 1 and "current_model_state" in ckpt and "averaging_state" in ckpt
    assert not any(k.startswith("ema.") for k in ckpt["state_dict"])  # the averaged copy is not a submodule: out of the optimiser and DDP
    logs = pd.read_csv(run / "metrics.csv")
    epochs = logs.dropna(subset=["val/auroc"])["epoch"].astype(int).tolist()
    assert epochs == list(range(killed_at + 2))  # every epoch once: the killed run's rows kept, none duplicated
    # the 2-process validation (each image once, averaged weights) equals one process scoring the checkpoint's averaged weights
    assert val_auroc_of(run / "last.ckpt", synth_root) == pytest.approx(logs["val/auroc"].dropna().iloc[-1], abs=1e-6)


def test_a_fine_tune_naming_imagenet_weights_starts_from_a_checkpoint_that_stores_none() -> None:
    """A checkpoint stores ``pretrained=False`` (its own weights load without the extra); the release recipe's fine-tune
    names ``pretrained=True`` like the stage before it. The same architecture either way; another one is refused."""
    from fracture.train import networks

    stored = networks.EfficientNetLite(head="localise", pretrained=False).config()
    named = {**stored, "init_args": {**stored["init_args"], "pretrained": True}}
    assert networks.architecture(stored) == networks.architecture(named)
    other = {**stored, "init_args": {**stored["init_args"], "variant": 1}}
    assert networks.architecture(other) != networks.architecture(named)
    assert networks.architecture({**stored, "init_args": {**stored["init_args"], "head": "classify"}}) != networks.architecture(stored)
    assert networks.from_config(named).args["pretrained"] is False  # a stored config never asks for the weights package


def test_the_machine_is_named_and_its_native_bf16_read_from_its_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    from fracture import machine

    lines = {"model name": "Example CPU 9000", "flags": "fpu sse4_2 avx512f amx_bf16 amx_tile"}
    monkeypatch.setattr(machine, "_cpuinfo", lines.get)
    assert machine.cpu_name() == "Example CPU 9000" and machine.native_bf16()
    lines["flags"] = "fpu sse4_2 avx512f avx512bw avx512_vnni"  # AVX-512 without bf16: fp32 trains faster there
    assert not machine.native_bf16()
    lines["flags"] = "fpu avx512_bf16"
    assert machine.native_bf16()
    monkeypatch.setattr(machine, "_cpuinfo", lambda key: None)  # no /proc/cpuinfo (macOS, Windows)
    assert machine.cpu_name() and not machine.native_bf16()


def test_unset_precision_picks_bf16_only_on_a_cpu_that_computes_it_natively(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(fit, "native_bf16", lambda: True)
    assert fit.default_precision("auto") == fit.default_precision("cpu") == "bf16-mixed"
    assert fit.default_precision("gpu") == "32-true"
    monkeypatch.setattr(fit, "native_bf16", lambda: False)
    assert fit.default_precision("cpu") == "32-true"
