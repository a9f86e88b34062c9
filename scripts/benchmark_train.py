"""Training-step speed: fp32 vs bf16-mixed, contiguous vs channels_last, for the seed CNN, resnet18 and EfficientNet-Lite0.

    python scripts/benchmark_train.py [--nets seed resnet18 lite0] [--image-size 224] [--batch-size 32] [--steps 6] [--device cpu|cuda]

One process, same inputs; forward + backward + optimiser step as in training (Lightning's
``bf16-mixed`` is ``torch.autocast`` with bfloat16 around forward and loss). Prints the CPU and
its instruction set (``torch.backends.cpu.get_cpu_capability()``): bf16 is fast only where the
CPU has bf16 instructions (AVX512-BF16 / AMX), so the answer differs between machines.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from fracture.machine import cpu_name
from fracture.train.losses import image_loss
from fracture.train.module import FractureClassifier
from fracture.train.networks import EfficientNetLite, Network, ResNet, SeedCNN

# random-init Lite0: the same arithmetic as the ImageNet weights, without the pretrained extra
NETS = {"seed": SeedCNN, "resnet18": lambda: ResNet(18), "lite0": lambda: EfficientNetLite(0, pretrained=False)}
from fracture.train.recipe import Recipe, configure


def train_step_rate(net: Network, image_size: int, batch_size: int, steps: int, precision: str = "32", channels_last: bool = False,
                    device: str = "cpu") -> float:
    """Images/s of full training steps (forward, loss, backward, optimiser) after two warm-up steps."""
    torch.manual_seed(0)
    model = FractureClassifier(net=net, image_size=image_size).to(device).train()
    optimizer = configure(Recipe(), model.net, total_steps=1, max_epochs=1)
    x = torch.rand(batch_size, 1, image_size, image_size, device=device) * 255
    y = (torch.rand(batch_size, device=device) > 0.5).float()
    if channels_last:
        model.net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16-mixed" else contextlib.nullcontext()
    for i in range(steps + 2):
        if i == 2:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        with autocast:
            loss = image_loss(model(x), y, 1.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nets", nargs="+", choices=list(NETS), default=list(NETS), help="classifier networks to time (default: all)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ns = parser.parse_args()
    where = torch.cuda.get_device_name() if ns.device == "cuda" else f"{cpu_name()}, ISA {torch.backends.cpu.get_cpu_capability()}"
    print(f"{where}; torch {torch.__version__}, {torch.get_num_threads()} threads; {ns.image_size} px, batch {ns.batch_size}, {ns.steps} timed steps\n")
    print("| network | precision | layout | images/s | × fp32 contiguous |")
    print("|---|---|---|---|---|")
    for net in (NETS[name]() for name in ns.nets):
        base = None
        for precision in ("32", "bf16-mixed"):
            for channels_last in (False, True):
                rate = train_step_rate(net, ns.image_size, ns.batch_size, ns.steps, precision, channels_last, ns.device)
                base = base or rate
                layout = "channels_last" if channels_last else "contiguous"
                print(f"| {net.name} | {'fp32' if precision == '32' else precision} | {layout} | {rate:.1f} | {rate / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
