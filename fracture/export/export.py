"""Checkpoint → one ONNX file that carries its preprocessing contract and thresholds.

    python -m fracture.export [--ckpt CKPT] [--out exports/fracture.onnx]
    python -m fracture.export --int8 --calibration DATASET_ROOT       # also write an INT8 file

The graph holds everything after the shared resize step: pixel scaling,
normalisation, the network and the sigmoid. Input ``image``: float32
``N x 1 x H x W`` raw pixel values (0..255) exactly as
``fracture.imaging.preprocess.load`` makes them; outputs ``probability`` and ``logit``
(``N``), and for ``localise`` models ``map`` (``N x H/8 x W/8`` fracture
probability per 8x8 cell, mirror TTA included when the model uses it). Metadata key ``fracture`` holds a JSON object with the contract,
thresholds, class names, training counts, validation metrics, checkpoint
sha256 and package version. Every export is checked with
``onnx.checker`` (full check) and for parity with the checkpoint on
onnxruntime at batch 1 and batch N; a failed check leaves no file behind.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fracture.deploy.metadata import file_sha256 as sha256
from fracture.export.graph import Deployable, ExportError, check_parity, install, parity_inputs, predict_probabilities, to_onnx, write_metadata
from fracture.export.quantize import quantize_int8
from fracture.imaging.contract import Contract
from fracture.scoring import metrics
from fracture.train.checkpoint import CheckpointError, latest_best, load_classifier, run_split
from fracture.train.module import FractureClassifier


def deployment_metadata(model: FractureClassifier, ckpt: str | os.PathLike | None, exporter: str, **extra: Any) -> dict[str, Any]:
    """Everything a deployer needs, as stored under the ``fracture`` metadata key."""
    return {
        **model.deployment_info(),
        "input": {"name": "image", "dtype": "float32", "layout": "N x 1 x H x W", "range": "0..255 raw pixels from fracture.imaging.preprocess.load"},
        "outputs": ["probability", "logit"],
        "decision": "fractured when probability > threshold",
        "checkpoint_sha256": sha256(ckpt) if ckpt else None,
        "checkpoint": Path(ckpt).name if ckpt else None,
        "exporter": exporter,
        **extra,
    }


def export(ckpt: str | os.PathLike, out: str | os.PathLike, parity_images: list[str] | None = None, heatmap: bool = False) -> dict[str, Any]:
    """Export, check and install one FP32 ONNX file from a checkpoint; returns its metadata."""
    return export_model(load_classifier(ckpt), out, ckpt, parity_images, heatmap)


def export_model(model: FractureClassifier, out: str | os.PathLike, ckpt: str | os.PathLike | None = None, parity_images: list[str] | None = None,
                 heatmap: bool = False) -> dict[str, Any]:
    """Export, check and install a loaded classifier (``ckpt`` names its source file, if any)."""
    out = Path(out)
    module = Deployable(model.evaluation_net, heatmap).eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".export-") as tmpdir:
        tmp = Path(tmpdir) / out.name
        exporter = to_onnx(module, model.contract.image_size, tmp)
        parity = check_parity(tmp, module, parity_inputs(model.contract, parity_images))
        extra = {"heatmap": {"output": "heatmap", "method": "Grad-CAM of the fracture logit on the last conv block", "range": "0..1 per image"}} if module.heatmap else {}
        if module.localise:
            extra["map"] = {"output": "map", "stride": 8, "range": "0..1 fracture probability per 8x8 input cell",
                            "boxes": "the map resized onto the image, then localisation.box_method: 'regions' = regions above box_threshold, "
                                     "at least min_area_fraction of the input; 'peaks' = up to max_boxes local maxima above box_threshold, "
                                     "each a box of box_size (fractions of the input side) centred on it"}
        extra["study_aggregation"] = study_aggregation(tmp, ckpt, model.contract)
        meta = deployment_metadata(model, ckpt, exporter, parity_max_abs_diff=parity, **extra)
        meta["outputs"] = module.output_names
        write_metadata(tmp, meta)
        install(tmp, out)
    return meta


def study_aggregation(onnx_path: Path, ckpt: str | os.PathLike | None, contract: Contract) -> dict[str, Any]:
    """How images of one study become one answer: chosen on the run's validation split when it has study keys."""
    val = run_split(Path(ckpt), "val", with_study=True) if ckpt else None
    if val is None or not any(val[2]):
        return {"method": "max", "chosen_on": "default: the validation split has no study keys"}
    keyed = np.flatnonzero(val[2] != "")
    paths = [val[0][i] for i in keyed]
    return metrics.choose_study_aggregation(predict_probabilities(onnx_path, paths, contract, desc="studies"), val[1][keyed], val[2][keyed])


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fracture.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", help="checkpoint to export (default: the best one of the latest run under checkpoints/)")
    parser.add_argument("--out", default="exports/fracture.onnx", help="output file (default: exports/fracture.onnx)")
    parser.add_argument("--parity-images", nargs="*", help="image files for the parity check (default: synthetic radiographs)")
    parser.add_argument("--heatmap", action="store_true", help="add a 'heatmap' output (Grad-CAM computed inside the graph)")
    parser.add_argument("--int8", action="store_true", help="also write an INT8 (static QDQ) file next to --out as NAME.int8.onnx")
    parser.add_argument("--calibration", type=Path, help="INT8 calibration: a dataset root (its train split) or a folder of images")
    parser.add_argument("--int8-eval", type=Path, help="labelled split folder for the INT8 check (default: the run's validation split)")
    ns = parser.parse_args(args)
    try:
        ckpt = Path(ns.ckpt) if ns.ckpt else latest_best()
        meta = export(ckpt, ns.out, ns.parity_images, ns.heatmap)
        print(f"exported {ckpt} → {ns.out} ({meta['exporter']} exporter; parity max |Δ| {meta['parity_max_abs_diff']})")
        print(f"thresholds: {meta['thresholds']}")
        if ns.int8:
            if ns.calibration is None:
                parser.error("--int8 needs --calibration DIR")
            out8 = Path(ns.out).with_suffix(".int8.onnx")
            report = quantize_int8(Path(ns.out), out8, ckpt, ns.calibration, ns.int8_eval)
            print(
                f"INT8 vs FP32 on {report['n']} labelled images: max |Δp| {report['max_abs_prob_diff']:.4f}, "
                f"AUROC {report['auroc_fp32']:.4f} → {report['auroc_int8']:.4f} (drop {report['auroc_drop']:+.4f})"
                + (f"; pointing on {report['pointing_images']} with boxes {report['pointing_fp32']:.3f} → {report['pointing_int8']:.3f}"
                   if "pointing_drop" in report else "")
            )
            print(f"{'operating point':<16}{'FP32 t':>9}{'sens/spec':>15}{'INT8 same t':>15}{'INT8 t':>9}{'sens/spec':>15}")
            for name, pt in report["operating_points"].items():
                f32, same, own = pt["fp32"], pt["int8_at_fp32_threshold"], pt["int8"]
                print(f"{name:<16}{pt['threshold_fp32']:>9.4f}{f32['sensitivity']:>8.3f}/{f32['specificity']:.3f}"
                      f"{same['sensitivity']:>8.3f}/{same['specificity']:.3f}{pt['threshold_int8']:>9.4f}{own['sensitivity']:>8.3f}/{own['specificity']:.3f}")
            print(f"kept {out8} (its thresholds re-chosen with the INT8 model on the same split)" if report["kept"]
                  else f"INT8 discarded: {report['reason']}; only {ns.out} was written")
    except (ExportError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
