"""Re-choose a model's operating points on a site's own labelled images, torch-free.

    python -m fracture.calibrate MODEL.onnx LABELLED.csv --out MODEL.site.onnx [--screening-sensitivity 0.95]

A hospital's scanners, protocols and case mix shift a model's probabilities.
With a few hundred labelled local images (``LABELLED.csv``: an image column and
a fracture label, paths relative to the CSV's ``images/`` folder or the CSV),
this predicts them with MODEL, picks ``screening`` (the highest threshold
whose sensitivity on these images is at least the target) and ``balanced``
(Youden's J) again on all of them, and writes a NEW ONNX file whose metadata holds the new
thresholds and where they came from: image count, fractured count, sha256 of
the labelled list, the parent model's sha256 and its old thresholds. MODEL is
never modified. The sensitivity and specificity it reports are **out of sample**: cross-fitted over
``--folds`` stratified folds, each image decided by thresholds chosen on the other folds (with 95 %
bootstrap intervals); the in-sample figures of the shipped thresholds, which flatter them, are printed
beside. Needs numpy, OpenCV, onnxruntime and onnx only.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from fracture.data.inputs import InputError, csv_images, read_labels
from fracture.deploy.metadata import write as write_metadata
from fracture.deploy.predictor import ModelError, Predictor
from fracture.scoring import metrics

MIN_LABELLED = 20  # fewer images, or fewer than 5 of a class, cannot place a threshold worth shipping


def list_sha256(paths: list[str], labels: list[int]) -> str:
    """sha256 of the labelled list as used: one ``file-name<TAB>label`` line per image, in order."""
    text = "".join(f"{os.path.basename(p)}\t{y}\n" for p, y in zip(paths, labels))
    return hashlib.sha256(text.encode()).hexdigest()


def cross_fitted(probs: np.ndarray, labels: np.ndarray, target: float, folds: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    """Each image's decision at each operating point, made by thresholds chosen on the other folds (stratified,
    seeded): what the points do on images they were not chosen on."""
    fold = metrics.stratified_folds(labels, folds, seed)
    decisions: dict[str, np.ndarray] = {}
    for k in range(folds):
        held, rest = fold == k, fold != k
        for name, t in metrics.operating_points(probs[rest], labels[rest], target).items():
            decisions.setdefault(name, np.zeros(len(labels), bool))[held] = probs[held] > t
    return decisions


def calibrate(model: Path, labelled: Path, out: Path, screening_sensitivity: float | None = None, n_boot: int = 1000, seed: int = 0,
              folds: int = 5) -> dict[str, Any]:
    """Predict the labelled images, re-choose the thresholds, write ``out``; returns the calibration record."""
    if out.resolve() == model.resolve():
        raise ModelError("--out must be a new file: the original model is never modified")
    predictor = Predictor(model)
    labels_by_path = read_labels(labelled)
    paths = csv_images(labelled)
    rows = list(predictor.predict(paths, show_progress=len(paths) >= 50))
    failed = [r for r in rows if r.error]
    if failed:
        raise ModelError(f"{len(failed)} labelled image(s) could not be read, e.g. {failed[0].error}; fix or remove them")
    probs = np.array([r.probability for r in rows])
    labels = np.array([labels_by_path[os.path.realpath(p)] for p in paths])
    counts = np.bincount(labels, minlength=2)
    if len(labels) < MIN_LABELLED or counts.min() < 5:
        raise ModelError(f"{labelled}: {len(labels)} images ({counts[1]} fractured): need at least {MIN_LABELLED} with 5 of each class")
    target = screening_sensitivity or float(predictor.metadata.get("screening_sensitivity", 0.95))
    new = metrics.operating_points(probs, labels, target)
    outside = cross_fitted(probs, labels, target, folds, seed)
    report: dict[str, Any] = {}
    for name, t in new.items():
        decided = outside[name].astype(float)  # 1.0 = called fractured by thresholds chosen without this image
        point = metrics.binary_metrics(decided, labels, 0.5)
        cis = metrics.bootstrap(decided, labels, 0.5, n=n_boot, seed=seed)
        inside = metrics.binary_metrics(probs, labels, t)
        report[name] = {"threshold": t, **{k: point[k] for k in ("sensitivity", "specificity")},
                        "ci95": {k: cis.get(k) for k in ("sensitivity", "specificity")},
                        "in_sample": {k: inside[k] for k in ("sensitivity", "specificity")},
                        "before": {"threshold": predictor.thresholds.get(name),
                                   **({k: metrics.binary_metrics(probs, labels, predictor.thresholds[name])[k] for k in ("sensitivity", "specificity")}
                                      if name in predictor.thresholds else {})}}
    record = {
        "images": int(len(labels)), "fractured": int(counts[1]), "list_sha256": list_sha256(paths, labels.tolist()), "list": labelled.name,
        "parent_model_sha256": predictor.sha256, "parent_thresholds": dict(predictor.thresholds), "screening_sensitivity": target,
        "auroc": metrics.auroc(probs, labels), "operating_points": report, "estimated": f"cross-fitted over {folds} stratified folds",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    meta = {**predictor.metadata, "thresholds": dict(new), "screening_sensitivity": target,
            "calibrations": [*predictor.metadata.get("calibrations", []), record]}
    write_metadata(model, out, meta)
    return record


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fracture.calibrate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="ONNX file from python -m fracture.export")
    parser.add_argument("labelled", type=Path, help="CSV of local images with a fracture label (annotations.csv style)")
    parser.add_argument("--out", type=Path, required=True, help="the new, site-calibrated ONNX file")
    parser.add_argument("--screening-sensitivity", type=float, help="sensitivity the screening threshold must reach (default: the model's, else 0.95)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals (default 1000)")
    parser.add_argument("--folds", type=int, default=5, help="cross-fitting folds for the out-of-sample figures (default 5)")
    ns = parser.parse_args(args)
    try:
        record = calibrate(ns.model, ns.labelled, ns.out, ns.screening_sensitivity, ns.bootstrap, folds=ns.folds)
    except (ModelError, InputError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{record['images']} labelled images ({record['fractured']} fractured), AUROC {record['auroc']:.3f}")
    print(f"sensitivity and specificity out of sample ({record['estimated']}); in-sample figures flatter the thresholds")
    print(f"{'point':<11}{'threshold (before)':>22}  {'sensitivity (95 % CI)':>26}  {'specificity (95 % CI)':>26}  in-sample  before: sens / spec")
    for name, r in record["operating_points"].items():
        ci = r["ci95"]
        b = r["before"]
        before = f"{b['sensitivity']:.3f} / {b['specificity']:.3f}" if "sensitivity" in b else "-"
        prev = f"{b['threshold']:.4f}" if b["threshold"] is not None else "-"
        sens = f"{r['sensitivity']:.3f} ({ci['sensitivity'][0]:.3f}-{ci['sensitivity'][1]:.3f})" if ci["sensitivity"] else f"{r['sensitivity']:.3f}"
        spec = f"{r['specificity']:.3f} ({ci['specificity'][0]:.3f}-{ci['specificity'][1]:.3f})" if ci["specificity"] else f"{r['specificity']:.3f}"
        inside = f"{r['in_sample']['sensitivity']:.3f} / {r['in_sample']['specificity']:.3f}"
        print(f"{name:<11}{r['threshold']:>10.4f} ({prev:>8})  {sens:>26}  {spec:>26}  {inside}  {before}")
    print(f"wrote {ns.out} (parent {record['parent_model_sha256'][:12]}…, list sha256 {record['list_sha256'][:12]}…); {ns.model} unchanged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
