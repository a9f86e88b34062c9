"""INT8 (static QDQ) from an FP32 ONNX file, kept only when it keeps its promises on labelled images.

Operating points are re-checked with the INT8 model and re-chosen for it; the file is kept only if AUROC
drops by at most 0.01 and no operating point loses more than ``MAX_SENSITIVITY_LOSS`` sensitivity.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pandas as pd

from fracture.boxes import detection, heatmap
from fracture.deploy.metadata import ModelMetadata
from fracture.export.graph import ExportError, install, predict_probabilities, write_metadata
from fracture.imaging import preprocess
from fracture.imaging.contract import Contract
from fracture.scoring import metrics
from fracture.train.checkpoint import run_split


class Calibration:
    """onnxruntime CalibrationDataReader over preprocessed images."""

    def __init__(self, paths: list[str], contract: Contract, batch: int = 16) -> None:
        self.batches = iter([paths[i : i + batch] for i in range(0, len(paths), batch)])
        self.contract = contract

    def get_next(self) -> dict[str, np.ndarray] | None:
        chunk = next(self.batches, None)
        if chunk is None:
            return None
        return {"image": preprocess.load_batch(chunk, self.contract)}


def image_files(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if p.is_file() and preprocess.is_image_file(p))


def quantize_static_qdq(fp32: Path, out: Path, calibration: list[str], contract: Contract) -> None:
    """Static QDQ INT8: per-channel int8 weights, int8 activations, MinMax calibration on ``calibration``.

    Conv, ReLU, pooling and hidden dense layers run in int8; the last dense layer
    and the sigmoid stay float so probabilities keep their resolution (no ties).
    int8 activations (S8S8): onnxruntime's documented default, free of the saturation below. uint8 activations (U8S8) ran fracatlas-v2 1.7x
    faster at batch 1 on a VNNI Xeon (onnxruntime left a third of its 1x1 convolutions unfused under S8S8)
    and held the guard there, but without VNNI (AVX2, older AVX-512) the u8 x s8 instruction saturates 16-bit
    sums, and the 7-bit weights that avoid it failed the guard: docs/results.md, 2026-12-07.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".int8-") as tmpdir:
        pre = Path(tmpdir) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        nodes = list(onnx.load(str(pre)).graph.node)
        last_dense = max(i for i, n in enumerate(nodes) if n.op_type in ("Gemm", "MatMul", "Conv"))
        quantize_static(
            str(pre),
            str(out),
            Calibration(calibration, contract),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=[n.name for n in nodes[last_dense:]],
            calibrate_method=CalibrationMethod.MinMax,
        )


MAX_POINTING_DROP = 0.02  # a localise model's pointing game on the same labelled images


def labelled_boxes(paths: list[str], ckpt: Path, eval_split: Path | None) -> list[list]:
    """The true boxes (normalised) of ``paths``: from ``eval_split``'s annotations, else from the checkpoint run's
    dataset (its config's ``data.root``: train and val annotations, where validation images come from)."""
    import yaml

    from fracture.boxes.detection import parse_boxes
    from fracture.data.annotations import read_split

    if eval_split is not None:
        dirs = [eval_split]
    else:
        root = Path(yaml.safe_load((ckpt.parent / "config.yaml").read_text())["data"]["root"])
        dirs = [root / s for s in ("train", "val") if (root / s / "annotations.csv").is_file()]
    table = pd.concat([read_split(d) for d in dirs]).set_index("path")
    if "boxes" not in table.columns:
        raise ExportError(f"{', '.join(map(str, dirs))}: no boxes column: the INT8 map cannot be checked against the true boxes")
    return [parse_boxes(table.loc[p, "boxes"]) if p in table.index else [] for p in paths]


def pointing_rate(path: Path, paths: list[str], truths: list[list], contract: Contract) -> float:
    """Share of images (with boxes) whose map maximum, on the original image, lies in a true box."""
    from fracture.deploy.predictor import Predictor

    hits = []
    for row, truth in zip(Predictor(path).predict(paths, keep_maps=True), truths):
        h, w = row.size
        mask = heatmap.box_mask([tuple(int(round(v)) for v in b) for b in detection.to_pixels(truth, h, w)], h, w)
        hits.append(heatmap.pointing(heatmap.to_original(row.raw_map, h, w, contract), mask)["hit"])
    return float(np.mean(hits)) if hits else float("nan")


def quantize_int8(fp32: Path, out: Path, ckpt: Path, calibration: Path, eval_split: Path | None = None, max_calibration: int = 256, max_auroc_drop: float = 0.01) -> dict[str, Any]:
    """INT8 calibrated on training images, installed only if it keeps its promises on a labelled split.

    Kept when AUROC drops by at most ``max_auroc_drop`` and, at every operating point (re-chosen for the
    INT8 model on that split and stored in its metadata), sensitivity stays within ``MAX_SENSITIVITY_LOSS``
    of FP32's.

    A localise model is also kept only when its pointing game on the same images' boxes drops by at most
    ``MAX_POINTING_DROP``. Calibration images: ``calibration/train/annotations.csv`` when it is a dataset
    root (less the run's validation images), else every image under ``calibration``. Evaluation: ``eval_split`` (a split folder with
    annotations.csv, never one named ``test``: that split is a release's, scored once), else the checkpoint
    run's validation split.
    """
    from fracture.data.annotations import read_split

    if eval_split is not None and Path(eval_split).name == "test":
        raise ExportError(f"--int8-eval {eval_split}: the test split is scored once, for a release's final figure; check INT8 on "
                          "validation (the default: the run's validation split) or another labelled split")

    read = ModelMetadata.read(fp32)
    meta, contract = read.fields, read.contract
    trained = run_split(ckpt, "train")
    if (calibration / "train" / "annotations.csv").is_file():  # its train split, less the run's validation images (the check's)
        calib = read_split(calibration / "train")["path"].tolist()
        if trained is not None:
            kept = {os.path.abspath(p) for p in trained[0]}
            calib = [p for p in calib if os.path.abspath(p) in kept] or calib
    else:
        calib = image_files(calibration)
    if not calib:
        raise ExportError(f"no calibration images under {calibration}")
    calib = [calib[i] for i in np.random.default_rng(0).permutation(len(calib))[:max_calibration]]
    if eval_split is not None:
        table = read_split(eval_split)
        labelled = (table["path"].tolist(), table["label"].to_numpy())
    else:
        labelled = run_split(ckpt, "val")
    if labelled is None:
        raise ExportError("--int8 needs a labelled split to check AUROC: pass --int8-eval SPLIT_DIR (a folder with images/ and annotations.csv)")
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".int8-") as tmpdir:
        tmp = Path(tmpdir) / out.name
        quantize_static_qdq(fp32, tmp, calib, contract)
        p32 = predict_probabilities(fp32, labelled[0], contract)
        p8 = predict_probabilities(tmp, labelled[0], contract)
        report = {
            "n": int(len(p32)),
            "calibration_images": len(calib),
            "max_abs_prob_diff": float(np.abs(p32 - p8).max()),
            "auroc_fp32": metrics.auroc(p32, labelled[1]),
            "auroc_int8": metrics.auroc(p8, labelled[1]),
        }
        report["auroc_drop"] = report["auroc_fp32"] - report["auroc_int8"]
        if "map" in meta:
            truths = labelled_boxes(labelled[0], ckpt, eval_split)
            boxed = [i for i, t in enumerate(truths) if t]
            args = ([labelled[0][i] for i in boxed], [truths[i] for i in boxed], contract)
            report.update({"pointing_images": len(boxed), "pointing_fp32": pointing_rate(fp32, *args), "pointing_int8": pointing_rate(tmp, *args)})
            report["pointing_drop"] = report["pointing_fp32"] - report["pointing_int8"]
        points, rechosen = int8_operating_points(p32, p8, labelled[1], meta["thresholds"], float(meta.get("screening_sensitivity", 0.95)))
        report["operating_points"] = points
        lost = [n for n, pt in points.items() if pt["int8"]["sensitivity"] < pt["fp32"]["sensitivity"] - MAX_SENSITIVITY_LOSS]
        pointing_lost = report.get("pointing_drop", 0.0) > MAX_POINTING_DROP
        report["kept"] = bool(report["auroc_drop"] <= max_auroc_drop and not lost and not pointing_lost)
        if pointing_lost:
            report["reason"] = f"the pointing game fell by {report['pointing_drop']:.3f} (more than {MAX_POINTING_DROP})"
        elif lost:
            report["reason"] = f"INT8 sensitivity at {', '.join(lost)} fell more than {MAX_SENSITIVITY_LOSS} below FP32's"
        elif not report["kept"]:
            report["reason"] = f"AUROC dropped by more than {max_auroc_drop}"
        if report["kept"]:
            write_metadata(tmp, {**meta, "thresholds": rechosen, "thresholds_fp32": meta["thresholds"],
                                  "quantization": {"format": "QDQ", "weights": "int8 per-channel", "activations": "int8", **report}})
            install(tmp, out)
    return report


MAX_SENSITIVITY_LOSS = 0.02  # on the validation split, at each operating point re-chosen for the INT8 model


def int8_operating_points(p32: np.ndarray, p8: np.ndarray, labels: np.ndarray, thresholds: dict[str, float],
                          screening_sensitivity: float) -> tuple[dict[str, Any], dict[str, float]]:
    """Each stored operating point checked with the INT8 model and re-chosen for it on the same labelled split.

    Returns the per-point report (FP32 at its threshold, INT8 at the same threshold, INT8 at its own) and
    the INT8 thresholds to store.
    """
    rechosen = {**thresholds, **metrics.operating_points(p8, labels, screening_sensitivity)}
    keep = ("sensitivity", "specificity")
    points = {}
    for name, t in thresholds.items():
        m32, same, own = (metrics.binary_metrics(p, labels, th) for p, th in ((p32, t), (p8, t), (p8, rechosen[name])))
        points[name] = {"threshold_fp32": t, "fp32": {k: m32[k] for k in keep}, "int8_at_fp32_threshold": {k: same[k] for k in keep},
                        "threshold_int8": rechosen[name], "int8": {k: own[k] for k in keep}}
    return points, rechosen
