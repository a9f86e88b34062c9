"""Two ONNX files of one model side by side on this CPU: size, batch-1 latency and the predictor's end-to-end rate.

    python scripts/benchmark_release.py exports/fracatlas-v2.onnx checkpoints/release/fp32.onnx [--images 60] [--repeats 30]

One run, same inputs (synthetic JPEG radiographs of about 400x450 px, decoded, resized and boxed by the
torch-free predictor), same thread count, the files measured in turn within each repeat so a noisy shared
machine slows both alike; the ratio to the first file is the figure to compare across machines.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from fracture.data.synth import write_jpegs
from fracture.deploy.predictor import Predictor
from fracture.imaging import preprocess
from fracture.machine import cpu_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=30, help="batch-1 runs per file")
    parser.add_argument("--threads", type=int, default=2)
    ns = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(tmp, ns.images, seed=1)
        predictors = [Predictor(m, threads=ns.threads) for m in ns.models]
        x = preprocess.load_batch(paths[:1], predictors[0].contract)
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = ns.threads
        sessions = [ort.InferenceSession(str(m), options, providers=["CPUExecutionProvider"]) for m in ns.models]
        for s in sessions:
            s.run(None, {"image": x})  # warm-up
        latency = [[] for _ in ns.models]
        for _ in range(ns.repeats):
            for k, s in enumerate(sessions):
                t = time.perf_counter()
                s.run(None, {"image": x})
                latency[k].append(1000 * (time.perf_counter() - t))
        rates = []
        for p in predictors:
            t = time.perf_counter()
            rows = list(p.predict(paths, show_progress=False))
            rates.append(len(rows) / (time.perf_counter() - t))
    print(f"{cpu_name()}, {ns.threads} threads, onnxruntime {ort.__version__}; {ns.repeats} batch-1 runs, {ns.images} JPEGs end to end")
    print("| file | size (MB) | batch-1 p50 (ms) | p95 (ms) | predictor images/s (decode + resize + model + boxes) | x first file |")
    print("|---|---|---|---|---|---|")
    for k, m in enumerate(ns.models):
        p50, p95 = np.percentile(latency[k], [50, 95])
        print(f"| {m.name} | {m.stat().st_size / 1e6:.1f} | {p50:.0f} | {p95:.0f} | {rates[k]:.1f} | {rates[k] / rates[0]:.2f} |")


if __name__ == "__main__":
    main()
