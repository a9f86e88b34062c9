"""The localiser's training loop against its bare pace, and its validation against its training epoch — one run.

    python scripts/benchmark_loop.py DATA [--net resnet18|lite0] [--device cpu|cuda] [--precision bf16-mixed|32]
                                      [--batch-size 32] [--steps 20] [--augment-on cpu|device] [--workers 2]
    python scripts/benchmark_loop.py DATA --net lite0 --matrix [--runs checkpoints/release] [--batch-size 16 --steps 6]

``--matrix``: the release recipe's two networks at its resolutions (the classifier on 224 px whole images, the
localiser on 256 px crops of 448 px inputs), each in fp32 and bf16-mixed, contiguous and channels_last: bare
and loop images/s and their ratio, a training epoch extrapolated from the loop's pace, and, with ``--runs``
(the recipe's results folder), the epochs its stages really took (``perf/train_epoch_s``) beside it. The
fastest setting is marked, and what ``fit`` picks on this CPU by default (bf16-mixed with channels_last where
the CPU has native bf16, else fp32) is named. Validation is not timed in this mode.

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
from pathlib import Path

import numpy as np
import torch

from fracture.boxes import detection
from fracture.machine import cpu_name, native_bf16
from fracture.train.data import FractureDataModule
from fracture.train.module import FractureClassifier
from fracture.train.networks import EfficientNetLite, ResNet
from fracture.train.recipe import configure


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bare_pace(model: FractureClassifier, device: str, precision: str, batch: int, crop: int, steps: int, warm: int) -> float:
    """Images/s of the module's training step on random tensors already on the device (a classifier's input is
    ``crop`` px whole images: its batch is only images and labels)."""
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
    step = (x, y, mask, boxes, has) if model.localise else (x, y)
    cast = torch.autocast(device, dtype=torch.bfloat16) if precision.startswith("bf16") else contextlib.nullcontext()
    model.train()
    for i in range(warm + steps):
        if i == warm:
            sync(device)
            start = time.perf_counter()
        with cast:
            loss = model.training_step(step, i)
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


def loop_pace(model: FractureClassifier, dm: FractureDataModule, device: str, precision: str, steps: int, warm: int) -> float:
    """Images/s of Lightning's ``fit`` over the real data module, after the warm-up steps."""
    import lightning as L

    clock = Clock(warm, device)
    trainer = L.Trainer(accelerator=device, devices=1, precision=precision, max_steps=warm + steps, limit_val_batches=0,
                        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[clock])
    trainer.fit(model, datamodule=dm)
    return clock.pace()


def real_epochs(runs: Path | None, stage: str) -> str:
    """The median training epoch a recipe stage took (its metrics.csv), or what is missing."""
    log = runs / stage / "metrics.csv" if runs else None
    if not (log and log.is_file()):
        return "n/a"
    import pandas as pd

    epochs = pd.read_csv(log).get("perf/train_epoch_s", pd.Series(dtype=float)).dropna()
    return f"{epochs.median():.0f} s ({len(epochs)} epochs, {epochs.min():.0f}-{epochs.max():.0f})" if len(epochs) else "n/a"


def matrix(ns: argparse.Namespace) -> int:
    """The recipe's classifier and localiser in every precision x memory layout: bare, loop, epoch."""
    heads = (("classify", 224, None, "classify"), ("localise", ns.image_size, ns.crop, "localise-ft"))
    rows = []
    for head, size, crop, stage in heads:
        for precision in ("32", "bf16-mixed"):
            for channels_last in (False, True):
                torch.manual_seed(0)
                net = ResNet(18, head) if ns.net == "resnet18" else EfficientNetLite(0, head, pretrained=not ns.scratch)
                kwargs = {"image_size": size, "resize": "letterbox", "train_crop": crop, "reduced_decode": True, "channels_last": channels_last}
                model = FractureClassifier(net=net, **kwargs).to(ns.device)
                if channels_last:
                    model.net.to(memory_format=torch.channels_last)
                bare = bare_pace(model, ns.device, precision, ns.batch_size, crop or size, ns.steps, ns.warm)
                dm = FractureDataModule(root=ns.data, image_size=size, resize="letterbox", crop=crop, crop_on_box=0.75 if crop else 0.0,
                                        sampler="balanced" if crop else "shuffle", batch_size=ns.batch_size, num_workers=ns.workers, augment_on=ns.augment_on,
                                        reduced_decode=True)
                loop = loop_pace(FractureClassifier(net=net, **kwargs), dm, ns.device, precision, ns.steps, ns.warm)
                rows.append((head, size, crop, precision, channels_last, bare, loop, len(dm.datasets["train"]) / loop, stage))
                print(f"{head} {precision} {'channels_last' if channels_last else 'contiguous'}: bare {bare:.1f}, loop {loop:.1f} images/s", file=sys.stderr)
    device = torch.cuda.get_device_name() if ns.device == "cuda" else cpu_name()
    default = "bf16-mixed, channels_last" if native_bf16() else "32, channels_last"
    print(f"{ns.net}{' (random init)' if ns.scratch else ''}, batch {ns.batch_size}, {ns.steps} timed steps after {ns.warm}, augment on "
          f"{ns.augment_on}, {ns.workers} workers; {device} (native bf16: {'yes' if native_bf16() else 'no'}; fit's default here: {default})\n")
    print("| network | input | precision | layout | bare images/s | loop images/s | loop / bare | epoch at the loop's pace | the recipe's real epochs |")
    print("|---|---|---|---|---|---|---|---|---|")
    for head, size, crop, precision, channels_last, bare, loop, epoch, stage in rows:
        best = loop == max(r[6] for r in rows if r[0] == head)
        shape = f"{crop} px crops of {size} px" if crop else f"{size} px"
        print(f"| {head} | {shape} | {precision} | {'channels_last' if channels_last else 'contiguous'} | {bare:.1f} | "
              f"{'**' if best else ''}{loop:.1f}{'**' if best else ''} | {loop / bare:.2f} | {epoch:.0f} s | "
              f"{real_epochs(ns.runs, stage) if precision == 'bf16-mixed' and channels_last else ''} |")
    print("\n(**bold**: the fastest loop per network; the real epochs are the recipe's, run in fit's default setting, bf16-mixed with "
          "channels_last on this CPU; an epoch there also carries the balanced sampler's draw and logging)")
    return 0


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
    parser.add_argument("--matrix", action="store_true", help="both recipe networks x fp32/bf16-mixed x contiguous/channels_last (see above)")
    parser.add_argument("--runs", type=Path, help="with --matrix: the recipe's results folder, for its real epoch times")
    ns = parser.parse_args(args)
    if ns.matrix:
        warnings.filterwarnings("ignore")
        return matrix(ns)
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
    loop = loop_pace(loop_model, dm, ns.device, ns.precision, ns.steps, ns.warm)
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
