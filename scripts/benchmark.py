"""CPU inference benchmark: torch eager vs ONNX Runtime FP32 vs INT8, end-to-end predictor, cold start.

    python scripts/benchmark.py [--ckpt CKPT] [--threads 2] [--images 500]

One run, same model, same inputs, same thread count. Without --ckpt it uses the
default config's seed network (224 px, flatten head) with fresh weights: speed
does not depend on what the weights learned. The end-to-end figure decodes and
resizes a folder of synthetic JPEG radiographs of about 400x450 px. The
realistic-mix figure uses FracAtlas's sizes (93 % 373x454, 7 % 2880x2304 scans)
with the demo-sized seed CNN (128 px), with and without reduced JPEG decoding.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import torch

from fracture.data.synth import radiograph, write_jpegs
from fracture.deploy.predictor import Predictor
from fracture.export.export import export_model
from fracture.export.quantize import quantize_static_qdq
from fracture.train.checkpoint import load_classifier
from fracture.train.module import FractureClassifier
from fracture.train.networks import SeedCNN


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def measure(run, x1: np.ndarray, x32: np.ndarray, repeats: int) -> dict[str, float]:
    lat = timed(lambda: run(x1), repeats)
    thr = timed(lambda: run(x32), max(3, repeats // 10))
    return {"p50_ms": 1000 * statistics.median(lat), "p95_ms": 1000 * float(np.percentile(lat, 95)), "batch32_ips": 32 / statistics.median(thr)}


def write_mix(folder: Path, n: int, large_share: float = 0.07) -> list[str]:
    """JPEG radiographs at FracAtlas's sizes: mostly 373x454, some 2880x2304 (upscaled: decoding cost is what counts)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    paths = []
    for i in range(n):
        large = i < round(n * large_share)
        img = np.rint(radiograph(rng, i % 2 == 1, "oblique", shape=(576, 720) if large else (454, 373)) * 255).astype(np.uint8)
        if large:
            img = cv2.resize(img, (2304, 2880), interpolation=cv2.INTER_CUBIC)
        path = folder / f"mix{i:04d}.jpg"
        cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, 92])
        paths.append(str(path))
    return [paths[i] for i in rng.permutation(n)]


def realistic_mix(work: Path, n: int, threads: int, size: int = 128) -> dict[str, float]:
    """Predictor images/s on the size mix with full and with reduced JPEG decoding, and pure FP32 inference, one run."""
    from dataclasses import replace

    model = FractureClassifier(net=SeedCNN(pool="max"), image_size=size, reduced_decode=True).eval()
    path = work / "mix.onnx"
    export_model(model, path)
    jpegs = write_mix(work / "mix", n)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x32 = (np.random.default_rng(1).random((32, 1, size, size)) * 255).astype(np.float32)
    pure = 32 / statistics.median(timed(lambda: sess.run(["probability"], {"image": x32}), 10))
    out = {"pure_fp32_ips": pure}
    for name, reduced in (("full_decode", False), ("reduced_decode", True)):
        predictor = Predictor(path, threads=threads)
        predictor.contract = replace(predictor.contract, reduced_decode=reduced)
        list(predictor.predict(jpegs[:32], show_progress=False))  # warm-up
        start = time.perf_counter()
        rows = list(predictor.predict(jpegs, batch_size=32, show_progress=False))
        assert not any(r.error for r in rows)
        out[name] = len(rows) / (time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", help="checkpoint to benchmark (default: fresh default-config seed network)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--images", type=int, default=500, help="JPEGs for the end-to-end run")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--mix-images", type=int, default=300, help="JPEGs in the realistic size mix (0 = skip)")
    ns = parser.parse_args()
    torch.set_num_threads(ns.threads)
    model = load_classifier(ns.ckpt) if ns.ckpt else FractureClassifier().eval()
    size = model.contract.image_size
    work = Path(tempfile.mkdtemp(prefix="fracture-bench-"))
    jpegs = write_jpegs(work / "jpegs", ns.images)
    fp32, int8 = work / "model.onnx", work / "model.int8.onnx"
    export_model(model, fp32, ns.ckpt)
    quantize_static_qdq(fp32, int8, jpegs[:128], model.contract)

    rng = np.random.default_rng(1)
    x32 = (rng.random((32, 1, size, size)) * 255).astype(np.float32)
    x1 = x32[:1]
    net = model.net.eval()

    def torch_run(x: np.ndarray) -> None:
        with torch.inference_mode():
            torch.sigmoid(net(torch.from_numpy(x)))

    def ort_runner(path: Path):
        options = ort.SessionOptions()
        options.intra_op_num_threads = ns.threads
        sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return lambda x: sess.run(["probability"], {"image": x})

    results = {
        "torch eager (CPU)": measure(torch_run, x1, x32, ns.repeats),
        "ONNX Runtime FP32": measure(ort_runner(fp32), x1, x32, ns.repeats),
        "ONNX Runtime INT8": measure(ort_runner(int8), x1, x32, ns.repeats),
    }
    predictor = Predictor(fp32, threads=ns.threads)
    start = time.perf_counter()
    rows = list(predictor.predict(jpegs, batch_size=32, show_progress=False))
    e2e = len(rows) / (time.perf_counter() - start)
    assert not any(r.error for r in rows)
    cold = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "fracture.predict", str(fp32), jpegs[0], "--quiet", "--threads", str(ns.threads)], check=True, capture_output=True)
        cold.append(time.perf_counter() - start)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; threads {ns.threads}; "
          f"torch {torch.__version__}, onnxruntime {ort.__version__}; model {'checkpoint ' + ns.ckpt if ns.ckpt else 'seed CNN (default config)'}, {size} px")
    base = results["torch eager (CPU)"]["batch32_ips"]
    print("\n| engine | p50 latency (ms) | p95 latency (ms) | batch-32 images/s | × torch eager |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['batch32_ips']:.1f} | {r['batch32_ips'] / base:.2f} |")
    fp = results["ONNX Runtime FP32"]["batch32_ips"]
    print(f"\nINT8 / FP32 throughput: {results['ONNX Runtime INT8']['batch32_ips'] / fp:.2f}")
    print(f"end-to-end predictor on {len(jpegs)} JPEGs (~400x450 px, decode + resize + inference): {e2e:.1f} images/s = {e2e / fp:.0%} of pure FP32 inference")
    print(f"predictor cold start (process start → first result, 1 image): median {statistics.median(cold):.2f} s of {', '.join(f'{c:.2f}' for c in cold)}")
    if ns.mix_images:
        mix = realistic_mix(work, ns.mix_images, ns.threads)
        print(f"\nrealistic size mix ({ns.mix_images} JPEGs: 93 % 373x454, 7 % 2880x2304), seed CNN at 128 px; pure FP32 inference {mix['pure_fp32_ips']:.0f} images/s:")
        print("| decoding | images/s | × pure FP32 inference |\n|---|---|---|")
        for name in ("full_decode", "reduced_decode"):
            print(f"| {name.replace('_', ' ')} | {mix[name]:.1f} | {mix[name] / mix['pure_fp32_ips']:.2f} |")


if __name__ == "__main__":
    main()
