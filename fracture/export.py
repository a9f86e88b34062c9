"""Checkpoint → one ONNX file that carries its preprocessing contract and thresholds.

    python -m fracture.export [--ckpt CKPT] [--out exports/fracture.onnx]
    python -m fracture.export --int8 --calibration DATASET_ROOT       # also write an INT8 file

The graph holds everything after the shared resize step: pixel scaling,
normalisation, the network and the sigmoid. Input ``image``: float32
``N x 1 x H x W`` raw pixel values (0..255) exactly as
``fracture.preprocess.load`` makes them; outputs ``probability`` and ``logit``
(``N``), and for ``localise`` models ``map`` (``N x H/8 x W/8`` fracture
probability per 8x8 cell, mirror TTA included when the model uses it). Metadata key ``fracture`` holds a JSON object with the contract,
thresholds, class names, training counts, validation metrics, checkpoint
sha256 and package version. Every export is checked with
``onnx.checker`` (full check) and for parity with the checkpoint on
onnxruntime at batch 1 and batch N; a failed check leaves no file behind.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from fracture import metrics, preprocess
from fracture import networks
from fracture.model import MirrorTTA, cam_from_features, is_localise, normalise_cam
from fracture.module import FractureClassifier
from fracture.predict import file_sha256 as sha256
from fracture.progress import progress
from fracture.runio import newest
from fracture.synth import radiograph

METADATA_KEY = "fracture"
PARITY_ATOL = 1e-5


class ExportError(Exception):
    """An export that must not be shipped; printed without a traceback."""


class Deployable(nn.Module):
    """Raw pixels → (probability, logit[, heatmap | map]): the function the ONNX file computes."""

    def __init__(self, net: nn.Module, heatmap: bool = False) -> None:
        super().__init__()
        self.localise = is_localise(net)
        if self.localise:
            heatmap = False  # its fracture map is the heatmap; no Grad-CAM needed
        if heatmap and isinstance(net, MirrorTTA):
            raise ExportError("--heatmap with test-time augmentation is not supported; export without one of them")
        self.net = net
        self.heatmap = heatmap

    @property
    def output_names(self) -> list[str]:
        return ["probability", "logit"] + (["heatmap"] if self.heatmap else []) + (["map"] if self.localise else [])

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.localise:
            pooled, joint, maps = self.net.forward_maps(image)
            logit = self.net.fuse(pooled, joint)
            return torch.sigmoid(logit), logit, torch.sigmoid(maps)
        if not self.heatmap:
            logit = self.net(image)
            return torch.sigmoid(logit), logit
        logit, cam = cam_from_features(self.net, self.net.forward_features(image))
        return torch.sigmoid(logit), logit, normalise_cam(cam)


LEGACY_KEYS = ("arch", "weights", "head", "widths", "dense", "dropout", "dense_dropout", "pool")
RECIPE_KEYS = ("optimizer", "lr", "weight_decay", "scheduler", "warmup_epochs")


def upgrade(checkpoint: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(hyperparameters, weights) of a checkpoint in today's form; older ones had flat network and recipe options
    and kept EMA weights as a submodule (``ema.module.*``, which is what they evaluated and exported)."""
    hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not k.startswith("_")}  # LightningCLI's _instantiator
    state = dict(checkpoint["state_dict"])
    if "net" not in hparams:
        hparams["net"] = networks.from_legacy(hparams).config()
        hparams["recipe"] = {k: hparams[k] for k in RECIPE_KEYS if k in hparams}
        hparams = {k: v for k, v in hparams.items() if k not in LEGACY_KEYS + RECIPE_KEYS}
    if any(k.startswith("ema.module.") for k in state):
        state = {"net." + k[len("ema.module."):]: v for k, v in state.items() if k.startswith("ema.module.")}
    state = {k: v for k, v in state.items() if not k.startswith("ema.") and k != "pos_weight"}
    return hparams, state


def load_classifier(ckpt: str | os.PathLike) -> FractureClassifier:
    """Load a checkpoint (today's or an older one) without unpickling arbitrary objects."""
    try:
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
        hparams, state = upgrade(checkpoint)
        model = FractureClassifier(**hparams)  # a stored network config drops `weights`: the checkpoint holds them
        model.on_load_checkpoint(checkpoint)
        model.load_state_dict(state)
    except FileNotFoundError:
        raise ExportError(f"{ckpt}: checkpoint not found") from None
    except Exception as exc:  # a truncated or foreign file fails in many ways
        raise ExportError(f"{ckpt}: not a usable fracture checkpoint ({type(exc).__name__}: {exc})") from None
    return model.eval()


def latest_best(output_dir: str | os.PathLike = "checkpoints") -> Path:
    """The best checkpoint of the most recent run."""
    found = newest(output_dir, "best-*.ckpt")
    if found is None:
        raise ExportError(f"no best-*.ckpt under {output_dir}/; train first (python -m fracture.fit) or pass --ckpt")
    return found


def deployment_metadata(model: FractureClassifier, ckpt: str | os.PathLike | None, exporter: str, **extra: Any) -> dict[str, Any]:
    """Everything a deployer needs, as stored under the ``fracture`` metadata key."""
    return {
        **model.deployment_info(),
        "input": {"name": "image", "dtype": "float32", "layout": "N x 1 x H x W", "range": "0..255 raw pixels from fracture.preprocess.load"},
        "outputs": ["probability", "logit"],
        "decision": "fractured when probability > threshold",
        "checkpoint_sha256": sha256(ckpt) if ckpt else None,
        "checkpoint": Path(ckpt).name if ckpt else None,
        "exporter": exporter,
        **extra,
    }


def _to_onnx(module: Deployable, size: int, path: Path) -> str:
    """Export with the dynamo exporter, falling back to the legacy one; returns which one worked."""
    example = (torch.zeros(2, 1, size, size),)
    outputs = module.output_names
    names = {"input_names": ["image"], "output_names": outputs}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module, example, dynamo=True, dynamic_shapes={"image": {0: torch.export.Dim("batch", min=1, max=4096)}}, optimize=True, verbose=False, **names
            )
        program.save(str(path))
        return "dynamo"
    except Exception as exc:  # noqa: BLE001 - any dynamo failure falls back, and we say so
        print(f"dynamo exporter failed ({type(exc).__name__}: {str(exc)[:200]}); using the legacy TorchScript exporter", file=sys.stderr)
    torch.onnx.export(module, example, str(path), dynamo=False, opset_version=17, dynamic_axes={n: {0: "batch"} for n in ["image", *outputs]}, **names)
    return "torchscript"


def parity_inputs(contract: preprocess.Contract, images: list[str] | None = None, n: int = 8, seed: int = 0) -> np.ndarray:
    """Model inputs for the parity check: given image files, else synthetic radiographs."""
    if images:
        batch = [preprocess.load(p, contract) for p in images[:n]]
    else:
        rng = np.random.default_rng(seed)
        batch = [preprocess.resize(np.rint(radiograph(rng, i % 2 == 1, "oblique") * 255).astype(np.uint8), contract) for i in range(n)]
    return preprocess.as_batch(batch)


def session(path: str | os.PathLike, threads: int | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_parity(onnx_path: Path, module: Deployable, inputs: np.ndarray) -> dict[str, float]:
    """Max |ONNX - torch| of probabilities (limit 1e-5) and heatmaps / maps (1e-4) at batch 1 and batch N."""
    sess = session(onnx_path)
    names = [n for n in module.output_names if n != "logit"]
    with torch.no_grad():
        out = dict(zip(module.output_names, module(torch.from_numpy(inputs))))
    expected = {n: out[n].numpy() for n in names}
    one = [sess.run(names, {"image": inputs[i : i + 1]}) for i in range(len(inputs))]
    full = sess.run(names, {"image": inputs})
    report, limits = {}, {"probability": PARITY_ATOL, "heatmap": 1e-4, "map": 1e-4}
    for k, name in enumerate(names):
        report[f"{name}_batch_1"] = float(np.abs(np.concatenate([o[k] for o in one]) - expected[name]).max())
        report[f"{name}_batch_{len(inputs)}"] = float(np.abs(full[k] - expected[name]).max())
    bad = {k: v for k, v in report.items() if not v <= limits[k.rsplit("_batch", 1)[0]]}  # NaN fails too
    if bad:
        raise ExportError(f"ONNX outputs differ from the checkpoint's by {bad} (limits {limits}); not shipping {onnx_path.name}")
    return report


def _write_metadata(path: Path, meta: dict[str, Any]) -> None:
    model = onnx.load(str(path))
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta, sort_keys=True)
    model.producer_name = "fracture"
    model.doc_string = "Bone-fracture classifier (fractured = positive). Research tool, not a medical device."
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)


def _install(tmp: Path, out: Path) -> None:
    """Atomic replace: a killed export leaves the old file or none, never half a file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, out)


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
        exporter = _to_onnx(module, model.contract.image_size, tmp)
        parity = check_parity(tmp, module, parity_inputs(model.contract, parity_images))
        extra = {"heatmap": {"output": "heatmap", "method": "Grad-CAM of the fracture logit on the last conv block", "range": "0..1 per image"}} if module.heatmap else {}
        if module.localise:
            extra["map"] = {"output": "map", "stride": 8, "range": "0..1 fracture probability per 8x8 input cell",
                            "boxes": "regions of the map resized onto the image above localisation.box_threshold, at least min_area_fraction of the input"}
        extra["study_aggregation"] = study_aggregation(tmp, ckpt, model.contract)
        meta = deployment_metadata(model, ckpt, exporter, parity_max_abs_diff=parity, **extra)
        meta["outputs"] = module.output_names
        _write_metadata(tmp, meta)
        _install(tmp, out)
    return meta


class _Calibration:
    """onnxruntime CalibrationDataReader over preprocessed images."""

    def __init__(self, paths: list[str], contract: preprocess.Contract, batch: int = 16) -> None:
        self.batches = iter([paths[i : i + batch] for i in range(0, len(paths), batch)])
        self.contract = contract

    def get_next(self) -> dict[str, np.ndarray] | None:
        chunk = next(self.batches, None)
        if chunk is None:
            return None
        return {"image": preprocess.load_batch(chunk, self.contract)}


def _image_files(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if p.is_file() and preprocess.is_image_file(p))


def _run_split(ckpt: Path, split: str, with_study: bool = False) -> tuple | None:
    """Paths and labels (and study keys, "" when none) of one split of the checkpoint's run, from its splits.csv."""
    table = ckpt.parent / "splits.csv"
    if not table.is_file():
        return None
    import pandas as pd

    rows = pd.read_csv(table, keep_default_na=False, dtype={"study": str})
    rows = rows[rows["split"] == split]
    if not len(rows):
        return None
    found = (rows["path"].tolist(), rows["label"].to_numpy().astype(int))
    return (*found, rows["study"].to_numpy() if "study" in rows.columns else np.full(len(rows), "")) if with_study else found


def study_aggregation(onnx_path: Path, ckpt: str | os.PathLike | None, contract: preprocess.Contract) -> dict[str, Any]:
    """How images of one study become one answer: chosen on the run's validation split when it has study keys."""
    val = _run_split(Path(ckpt), "val", with_study=True) if ckpt else None
    if val is None or not any(val[2]):
        return {"method": "max", "chosen_on": "default: the validation split has no study keys"}
    keyed = np.flatnonzero(val[2] != "")
    paths = [val[0][i] for i in keyed]
    return metrics.choose_study_aggregation(_predict_all(onnx_path, paths, contract, desc="studies"), val[1][keyed], val[2][keyed])


def _predict_all(path: Path, paths: list[str], contract: preprocess.Contract, batch: int = 32, desc: str = "check") -> np.ndarray:
    sess = session(path)
    out = []
    for i in progress(range(0, len(paths), batch), desc=desc):
        x = preprocess.load_batch(paths[i : i + batch], contract)
        out.append(sess.run(["probability"], {"image": x})[0])
    return np.concatenate(out)


def quantize_static_qdq(fp32: Path, out: Path, calibration: list[str], contract: preprocess.Contract) -> None:
    """Static QDQ INT8: per-channel int8 weights, int8 activations, MinMax calibration on ``calibration``.

    Conv, ReLU, pooling and hidden dense layers run in int8; the last dense layer
    and the sigmoid stay float so probabilities keep their resolution (no ties).
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
            _Calibration(calibration, contract),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=[n.name for n in nodes[last_dense:]],
            calibrate_method=CalibrationMethod.MinMax,
        )


def quantize_int8(fp32: Path, out: Path, ckpt: Path, calibration: Path, eval_split: Path | None = None, max_calibration: int = 256, max_auroc_drop: float = 0.01) -> dict[str, Any]:
    """INT8 calibrated on training images, installed only if it keeps its promises on a labelled split.

    Kept when AUROC drops by at most ``max_auroc_drop`` and, at every operating point (re-chosen for the
    INT8 model on that split and stored in its metadata), sensitivity stays within ``MAX_SENSITIVITY_LOSS``
    of FP32's.

    Calibration images: ``calibration/train/annotations.csv`` when it is a dataset
    root, else every image under ``calibration``. Evaluation: ``eval_split`` (a
    split folder with annotations.csv), else the checkpoint run's validation split.
    """
    from fracture.annotations import read_split

    meta = json.loads(session(fp32).get_modelmeta().custom_metadata_map[METADATA_KEY])
    contract = preprocess.Contract.from_dict(meta["contract"])
    if (calibration / "train" / "annotations.csv").is_file():
        calib = read_split(calibration / "train")["path"].tolist()
    else:
        calib = _image_files(calibration)
    if not calib:
        raise ExportError(f"no calibration images under {calibration}")
    calib = [calib[i] for i in np.random.default_rng(0).permutation(len(calib))[:max_calibration]]
    if eval_split is not None:
        table = read_split(eval_split)
        labelled = (table["path"].tolist(), table["label"].to_numpy())
    else:
        labelled = _run_split(ckpt, "val")
    if labelled is None:
        raise ExportError("--int8 needs a labelled split to check AUROC: pass --int8-eval SPLIT_DIR (a folder with images/ and annotations.csv)")
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".int8-") as tmpdir:
        tmp = Path(tmpdir) / out.name
        quantize_static_qdq(fp32, tmp, calib, contract)
        p32 = _predict_all(fp32, labelled[0], contract)
        p8 = _predict_all(tmp, labelled[0], contract)
        report = {
            "n": int(len(p32)),
            "calibration_images": len(calib),
            "max_abs_prob_diff": float(np.abs(p32 - p8).max()),
            "auroc_fp32": metrics.auroc(p32, labelled[1]),
            "auroc_int8": metrics.auroc(p8, labelled[1]),
        }
        report["auroc_drop"] = report["auroc_fp32"] - report["auroc_int8"]
        points, rechosen = int8_operating_points(p32, p8, labelled[1], meta["thresholds"], float(meta.get("screening_sensitivity", 0.95)))
        report["operating_points"] = points
        lost = [n for n, pt in points.items() if pt["int8"]["sensitivity"] < pt["fp32"]["sensitivity"] - MAX_SENSITIVITY_LOSS]
        report["kept"] = bool(report["auroc_drop"] <= max_auroc_drop and not lost)
        if lost:
            report["reason"] = f"INT8 sensitivity at {', '.join(lost)} fell more than {MAX_SENSITIVITY_LOSS} below FP32's"
        elif not report["kept"]:
            report["reason"] = f"AUROC dropped by more than {max_auroc_drop}"
        if report["kept"]:
            _write_metadata(tmp, {**meta, "thresholds": rechosen, "thresholds_fp32": meta["thresholds"],
                                  "quantization": {"format": "QDQ", "weights": "int8 per-channel", "activations": "int8", **report}})
            _install(tmp, out)
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
            )
            print(f"{'operating point':<16}{'FP32 t':>9}{'sens/spec':>15}{'INT8 same t':>15}{'INT8 t':>9}{'sens/spec':>15}")
            for name, pt in report["operating_points"].items():
                f32, same, own = pt["fp32"], pt["int8_at_fp32_threshold"], pt["int8"]
                print(f"{name:<16}{pt['threshold_fp32']:>9.4f}{f32['sensitivity']:>8.3f}/{f32['specificity']:.3f}"
                      f"{same['sensitivity']:>8.3f}/{same['specificity']:.3f}{pt['threshold_int8']:>9.4f}{own['sensitivity']:>8.3f}/{own['specificity']:.3f}")
            print(f"kept {out8} (its thresholds re-chosen with the INT8 model on the same split)" if report["kept"]
                  else f"INT8 discarded: {report['reason']}; only {ns.out} was written")
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
