"""Does the data loader keep up with training? Loader images/s vs training-step images/s, one run.

    python scripts/benchmark_data.py [--root DIR] [--image-size 224] [--batch-size 32] [--workers 2]

Without --root it writes synthetic radiographs (about 300x300 px) to a temp dir.
Loader figures include the resized-image cache (built once, timed apart) and the
full train augmentation; the training step is forward + backward + Adam on the
default seed CNN. Target: loader >= 2x the training step.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from fracture.data import FractureDataModule
from fracture.module import FractureClassifier
from fracture.synth import write_dataset


def loader_rate(dm: FractureDataModule, batches: int) -> float:
    loader = dm.train_dataloader()
    it = iter(loader)
    next(it)  # worker start-up is a one-off cost
    start = time.perf_counter()
    n = 0
    for _ in range(batches):
        try:
            x, _ = next(it)
        except StopIteration:
            it = iter(loader)
            x, _ = next(it)
        n += len(x)
    return n / (time.perf_counter() - start)


def train_step_rate(image_size: int, batch_size: int, steps: int) -> float:
    model = FractureClassifier(image_size=image_size)
    opt = model.configure_optimizers()
    x = torch.rand(batch_size, 1, image_size, image_size) * 255
    y = (torch.rand(batch_size) > 0.5).float()
    model.train()
    for i in range(steps + 2):
        if i == 2:
            start = time.perf_counter()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", help="dataset root (default: synthetic data in a temp dir)")
    parser.add_argument("--n", type=int, default=600, help="synthetic images when --root is not given")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--steps", type=int, default=10)
    ns = parser.parse_args()
    root = ns.root
    if root is None:
        root = tempfile.mkdtemp(prefix="fracture-bench-")
        write_dataset(root, n=ns.n, seed=0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, image_size {ns.image_size}, batch {ns.batch_size}")
    dm = FractureDataModule(root=root, image_size=ns.image_size, batch_size=ns.batch_size, num_workers=0)
    start = time.perf_counter()
    dm.setup("fit")
    cached = len(dm.datasets["train"]) + len(dm.datasets["val"])
    print(f"cache build: {cached} images in {time.perf_counter() - start:.1f} s ({cached / (time.perf_counter() - start):.0f} images/s, once per run)")
    step = train_step_rate(ns.image_size, ns.batch_size, ns.steps)
    print(f"{'what':<32}{'images/s':>10}{'x train step':>14}")
    print(f"{'training step (fwd+bwd+Adam)':<32}{step:>10.1f}{1.0:>14.2f}")
    for workers in ns.workers:
        dm.num_workers = workers
        rate = loader_rate(dm, ns.batches)
        print(f"{f'loader, {workers} workers':<32}{rate:>10.1f}{rate / step:>14.2f}")


if __name__ == "__main__":
    main()
