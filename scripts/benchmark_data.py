"""Does the data path keep up with training? Loader images/s (both augmentation paths) vs training-step images/s, one run.

    python scripts/benchmark_data.py [--root DIR] [--image-size 224] [--batch-size 32] [--workers 0 2]
                                     [--net seed_cnn|resnet18] [--precision 32|bf16-mixed] [--channels-last]

Without --root it writes synthetic radiographs (about 300x300 px) to a temp dir. The cache of
resized images is built once (timed apart). ``cpu`` path: the loader's workers augment each image;
``device`` path: the loader hands uint8 batches (pinned on a GPU), they are moved to the device and
augmented there per image (:func:`fracture.augment.device_augment`). The training step is forward +
backward + optimiser on the same device. Target: the data path at >= 2x the training step.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from benchmark_train import train_step_rate

from fracture.data.synth import write_dataset
from fracture.machine import cpu_name
from fracture.train.data import FractureDataModule
from fracture.train.networks import ResNet, SeedCNN


def loader_rate(dm: FractureDataModule, batches: int, device: str) -> float:
    """Images/s delivered to ``device`` ready for the model (augmented on the device when ``dm.augment_on == 'device'``)."""
    loader = dm.train_dataloader()
    it = iter(loader)
    next(it)  # worker start-up is a one-off cost
    n = 0
    start = time.perf_counter()
    for _ in range(batches):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        batch = dm.on_after_batch_transfer(tuple(t.to(device, non_blocking=True) for t in batch), 0)
        n += len(batch[0])
    if device == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", help="dataset root (default: synthetic data in a temp dir)")
    parser.add_argument("--n", type=int, default=600, help="synthetic images when --root is not given")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--net", choices=["seed_cnn", "resnet18"], default="seed_cnn")
    parser.add_argument("--precision", choices=["32", "bf16-mixed"], default="32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ns = parser.parse_args()
    root = ns.root
    if root is None:
        root = tempfile.mkdtemp(prefix="fracture-bench-")
        write_dataset(root, n=ns.n, seed=0)
    where = torch.cuda.get_device_name() if ns.device == "cuda" else f"{cpu_name()}, ISA {torch.backends.cpu.get_cpu_capability()}"
    print(f"{where}; torch {torch.__version__}, {torch.get_num_threads()} threads; {ns.image_size} px, batch {ns.batch_size}")
    cache = tempfile.mkdtemp(prefix="fracture-cache-")  # built once here, memory-mapped by every loader below
    dm = FractureDataModule(root=root, image_size=ns.image_size, batch_size=ns.batch_size, num_workers=0, cache="disk", cache_dir=cache)
    start = time.perf_counter()
    dm.setup("fit")
    cached = len(dm.datasets["train"]) + len(dm.datasets["val"])
    print(f"cache build: {cached} images in {time.perf_counter() - start:.1f} s ({cached / (time.perf_counter() - start):.0f} images/s, once per run)")
    net = SeedCNN() if ns.net == "seed_cnn" else ResNet(18)
    step = train_step_rate(net, ns.image_size, ns.batch_size, ns.steps, ns.precision, ns.channels_last, ns.device)
    print("\n| what | images/s | × training step |\n|---|---|---|")
    layout = ", channels_last" if ns.channels_last else ""
    print(f"| training step ({net.name}, {ns.precision}{layout}, {ns.device}) | {step:.1f} | 1.00 |")
    for path in ("cpu", "device"):
        for workers in ns.workers:
            data = FractureDataModule(root=root, image_size=ns.image_size, batch_size=ns.batch_size, num_workers=workers, augment_on=path,
                                      cache="disk", cache_dir=cache)
            data.setup("fit")
            rate = loader_rate(data, ns.batches, ns.device)
            print(f"| augment on {path}, {workers} loader workers | {rate:.1f} | {rate / step:.2f} |", flush=True)


if __name__ == "__main__":
    main()
