"""What a training run's folder says about its epochs: time, throughput, memory, validation, test.

    python scripts/epoch_summary.py checkpoints/RUN [GPU_UTIL_CSV]

Reads ``metrics.csv`` (the ``perf/*`` figures of ``fracture.fit.Throughput`` and the validation curve) and,
when there, ``test_metrics.json``; GPU_UTIL_CSV is ``nvidia-smi --query-gpu=utilization.gpu,memory.used
--format=csv,noheader,nounits -l 1`` sampled during the run. Used by the GPU scripts (``gpu_check.sh``,
``train_release.sh``) so their reports read alike.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd


def main(args: list[str]) -> int:
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    run = Path(args[0])
    if not (run / "metrics.csv").is_file():
        print(f"{run}: no metrics.csv (the run did not finish an epoch)")
        return 1
    logs = pd.read_csv(run / "metrics.csv")
    logs["epoch"] = logs["epoch"].astype("Int64")
    fmt = {"float_format": lambda v: f"{v:.4f}", "index": False}
    if "perf/images_per_s" in logs:
        perf = logs.dropna(subset=["perf/images_per_s"])
        print(perf[[c for c in ("epoch", "perf/train_epoch_s", "perf/images_per_s", "perf/peak_gpu_mem_gib") if c in perf]].to_string(**fmt))
        memory = f", peak {perf['perf/peak_gpu_mem_gib'].max():.2f} GiB" if "perf/peak_gpu_mem_gib" in perf else ""
        print(f"{run}: {len(perf)} epochs, median {perf['perf/train_epoch_s'].median():.2f} s/epoch, "
              f"{perf['perf/images_per_s'].median():.1f} images/s{memory}")
    if len(args) > 1 and Path(args[1]).is_file() and Path(args[1]).stat().st_size:
        gpu = pd.read_csv(args[1], header=None, names=["util", "mem"])
        print(f"GPU utilisation: mean {gpu['util'].mean():.0f} %, peak {gpu['util'].max():.0f} %; memory used peak {gpu['mem'].max():.0f} MiB")
    if "val/loss" in logs:
        val = logs.dropna(subset=["val/loss"])  # every validation (its AUROC is undefined when a tiny one holds one class)
        print(val[[c for c in ("epoch", "val/auroc", "val/froc_mean", "val/pointing", "val/box_search", "perf/val_s") if c in val]].to_string(**fmt))
        if "perf/val_s" in val and "perf/train_epoch_s" in logs:
            print(f"validation {val['perf/val_s'].median():.2f} s (median) against a training epoch's {logs['perf/train_epoch_s'].median():.2f} s")
    if (run / "test_metrics.json").is_file():
        test = json.loads((run / "test_metrics.json").read_text())
        for name, point in test["operating_points"].items():
            print(f"test {name:<9} threshold {point['threshold']:.3f}  AUROC {point['auroc']:.3f}  "
                  f"sensitivity {point['sensitivity']:.3f}  specificity {point['specificity']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
