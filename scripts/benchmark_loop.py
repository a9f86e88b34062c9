"""The localiser's training loop against its bare pace, and its validation against its training epoch — one run.

    python scripts/benchmark_loop.py DATA [--net resnet18|lite0] [--device cpu|cuda] [--precision bf16-mixed|32]
                                      [--batch-size 32] [--steps 20] [--augment-on cpu|device] [--workers 2]

1. **bare**: the localise module's own training step (forward, its losses, backward, AdamW) on random tensors
   already on the device — same network, precision, memory layout, optimiser, batch size and crop size.
2. **loop**: Lightning's ``fit`` over the real data module (cache, balanced sampler, crops on boxes, augmentation,
   transfer) for the same number of steps after the same warm-up. Prints both images/s and their ratio.
3. **validation** over the whole validation carve-out: the forward pass, then what the box choice costs — the
   grid search as it was (region peaks by ``np.maximum.at``), the search now, and a validation that holds the
   decoding — each against a training epoch at the loop's pace (``perf/val_s`` vs ``perf/train_epoch_s``).

DATA: a dataset with boxes (``python -m fracture.datasets import fracatlas …``). Needs the training extra, and
for ``--net lite0`` the pretrained extra (``--scratch`` starts it from random weights instead).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import warnings

import numpy as np
import torch

from fracture.boxes import detection
from fracture.machine import cpu_name
from fracture.train.data import FractureDataModule
from fracture.train.module import FractureClassifier
from fracture.train.networks import EfficientNetLite, ResNet
from fracture.train.recipe import configure


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bare_pace(model: FractureClassifier, device: str, precision: str, batch: int, crop: int, steps: int, warm: int) -> float:
    """Images/s of the module's training step on random tensors already on the device."""
    optimizer = configure(model.recipe, model.net, total_steps=1, max_epochs=1)  # what configure_optimizers gives, without a trainer
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    x = torch.rand(batch, 1, crop, crop, device=device) * 255
    y = (torch.arange(batch, device=device) % 2).float()
    mask = torch.zeros(batch, 1, crop, crop, device=device)
    mask[::2, :, crop // 3 : crop // 2, crop // 3 : crop // 2] = 1
    boxes = torch.full((batch, 4, 4), -1.0, device=device)
    boxes[::2, 0] = torch.tensor([crop / 3, crop / 3, crop / 2, crop / 2], device=device)
    has = (torch.arange(batch, device=device) % 2 == 0)
    if model.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    cast = torch.autocast(device, dtype=torch.bfloat16) if precision.startswith("bf16") else contextlib.nullcontext()
    model.train()
    for i in range(warm + steps):
        if i == warm:
            sync(device)
            start = time.perf_counter()
        with cast:
            loss = model.training_step((x, y, mask, boxes, has), i)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync(device)
    return steps * batch / (time.perf_counter() - start)


class Clock(__import__("lightning").Callback):
    """Wall time of the steps after the warm-up, as the loop runs them."""

    def __init__(self, warm: int, device: str) -> None:
        self.warm, self.device, self.start, self.images = warm, device, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warm:
            sync(self.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.start is not None:
            self.images += len(batch[0])

    def pace(self) -> float:
        sync(self.device)
        return self.images / (time.perf_counter() - self.start)


def old_region_peaks(labels: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Region peaks as the code had them before (every pixel through np.maximum.at): the 'before' of item 1."""
    peaks = np.full(n, -np.inf)
    np.maximum.at(peaks, labels.ravel(), values.ravel())
    return peaks


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/benchmark_loop.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data")
    parser.add_argument("--net", choices=["resnet18", "lite0"], default="resnet18")
    parser.add_argument("--scratch", action="store_true", help="lite0 from random weights (no pretrained extra needed)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warm", type=int, default=3)
    parser.add_argument("--augment-on", choices=["cpu", "device"], default="device")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--val-limit", type=int, default=0, help="at most this many validation batches (0: all)")
    ns = parser.parse_args(args)
    import lightning as L

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    net = ResNet(18, "localise") if ns.net == "resnet18" else EfficientNetLite(0, "localise", pretrained=not ns.scratch)
    model = FractureClassifier(net=net, image_size=ns.image_size, resize="letterbox", train_crop=ns.crop, reduced_decode=True, channels_last=ns.channels_last).to(ns.device)
    model.channels_last = ns.channels_last
    if ns.channels_last:
        model.net.to(memory_format=torch.channels_last)
    bare = bare_pace(model, ns.device, ns.precision, ns.batch_size, ns.crop, ns.steps, ns.warm)

    dm = FractureDataModule(root=ns.data, image_size=ns.image_size, resize="letterbox", crop=ns.crop, crop_on_box=0.75, sampler="balanced",
                            batch_size=ns.batch_size, num_workers=ns.workers, augment_on=ns.augment_on, reduced_decode=True)
    loop_model = FractureClassifier(net=net, image_size=ns.image_size, resize="letterbox", train_crop=ns.crop, reduced_decode=True, channels_last=ns.channels_last)
    clock = Clock(ns.warm, ns.device)
    trainer = L.Trainer(accelerator=ns.device, devices=1, precision=ns.precision, max_steps=ns.warm + ns.steps, limit_val_batches=0,
                        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[clock])
    trainer.fit(loop_model, datamodule=dm)
    loop = clock.pace()
    n_train = len(dm.datasets["train"])

    loop_model.eval().to(ns.device)
    items, start = [], time.perf_counter()
    with torch.no_grad():
        for k, batch in enumerate(dm.val_dataloader()):
            if ns.val_limit and k >= ns.val_limit:
                break
            x, y, _, boxes, _ = (t.to(ns.device) for t in batch)
            pooled, joint, maps = loop_model.net.forward_maps(x)
            for label, p, j, m, b in zip(y.cpu().numpy(), pooled.float().cpu().numpy(), joint.float().cpu().numpy(),
                                         torch.sigmoid(maps.float()).cpu().numpy(), boxes.cpu().numpy()):
                items.append((int(label), (float(p), float(j)), m, b[b[:, 0] >= 0]))
    sync(ns.device)
    forward = time.perf_counter() - start
    choice = {}
    new_peaks = detection.region_peaks
    for label, search, peaks in (("search, before (np.maximum.at)", True, old_region_peaks), ("search, now", True, new_peaks),
                                 ("decoding held, now", False, new_peaks)):
        detection.region_peaks = peaks
        start = time.perf_counter()
        loop_model.choose_localisation(items, search=search)
        choice[label] = time.perf_counter() - start
    detection.region_peaks = new_peaks

    device = torch.cuda.get_device_name() if ns.device == "cuda" else cpu_name()
    epoch = n_train / loop
    print(f"{ns.net} localiser{' (random init)' if ns.scratch else ''}, {ns.image_size} px letterbox, {ns.crop} px crops, batch {ns.batch_size}, "
          f"{ns.precision}, channels_last {ns.channels_last}, augment on {ns.augment_on}, {ns.workers} workers; {device}")
    print(f"\n| | images/s |\n|---|---|\n| bare (random tensors on the device) | {bare:.1f} |\n| loop (Lightning fit, real data) | {loop:.1f} |")
    print(f"\nloop / bare = **{loop / bare:.2f}**; a training epoch ({n_train} images) at the loop's pace: {epoch:.1f} s")
    print(f"\nvalidation, {len(items)} images: forward {forward:.1f} s\n\n| box choice | s | validation / training epoch |\n|---|---|---|")
    for label, seconds in choice.items():
        print(f"| {label} | {seconds:.2f} | {(forward + seconds) / epoch:.2f} |")
    print("\n(a validation holds the decoding except at the first, the last, one about to be the best, and every model.box_search_every)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
