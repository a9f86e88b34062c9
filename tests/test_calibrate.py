"""Local recalibration: new thresholds from a site's labelled images, in a new file with its lineage; torch-free."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from conftest import REPO
from test_predict import BLOCKER

from fracture.deploy.calibrate import list_sha256, main
from fracture.data.inputs import csv_images, read_labels
from fracture.deploy.metadata import file_sha256
from fracture.deploy.predictor import Predictor
from fracture.scoring import metrics

BLOCKED_CALIBRATE = BLOCKER + "from fracture.deploy.calibrate import main\nsys.exit(main(sys.argv[1:]))\n"


def test_calibrate_rechooses_thresholds_into_a_new_file_with_lineage(synth_root: Path, tiny_onnx: Path, tmp_path: Path) -> None:
    site = synth_root / "test" / "annotations.csv"
    before = file_sha256(tiny_onnx)
    out = tmp_path / "tiny.site.onnx"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", BLOCKED_CALIBRATE, str(tiny_onnx), str(site), "--out", str(out), "--screening-sensitivity", "0.9",
                           "--bootstrap", "100"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert file_sha256(tiny_onnx) == before  # the original is untouched
    paths = csv_images(site)
    labels_by_path = read_labels(site)
    labels = np.array([labels_by_path[os.path.realpath(p)] for p in paths])
    probs = np.array([r.probability for r in Predictor(tiny_onnx).predict(paths, show_progress=False)])
    expected = metrics.operating_points(probs, labels, 0.9)
    meta = json.loads(ort.InferenceSession(str(out)).get_modelmeta().custom_metadata_map["fracture"])
    old = json.loads(ort.InferenceSession(str(tiny_onnx)).get_modelmeta().custom_metadata_map["fracture"])
    assert meta["thresholds"] == expected and meta["thresholds"] != old["thresholds"]
    record = meta["calibrations"][-1]
    assert record["parent_model_sha256"] == before and record["parent_thresholds"] == old["thresholds"]
    assert record["images"] == len(paths) and record["fractured"] == int(labels.sum())
    assert record["list_sha256"] == list_sha256(paths, labels.tolist())
    screening = record["operating_points"]["screening"]
    assert screening["sensitivity"] >= 0.9 and screening["ci95"]["sensitivity"][0] <= screening["sensitivity"] <= screening["ci95"]["sensitivity"][1]
    assert Predictor(out).thresholds == expected and meta["contract"] == old["contract"]  # the rest of the model is the same
    assert "screening" in done.stdout and "unchanged" in done.stdout


def test_calibrate_refuses_to_overwrite_its_input_or_use_too_few_images(synth_root: Path, tiny_onnx: Path, tmp_path: Path) -> None:
    assert main([str(tiny_onnx), str(synth_root / "test" / "annotations.csv"), "--out", str(tiny_onnx)]) == 2
    few = tmp_path / "few.csv"
    lines = (synth_root / "test" / "annotations.csv").read_text().splitlines()
    few.write_text("\n".join(lines[:6]) + "\n")
    (tmp_path / "images").symlink_to(synth_root / "test" / "images")
    assert main([str(tiny_onnx), str(few), "--out", str(tmp_path / "x.onnx")]) == 2
    assert not (tmp_path / "x.onnx").exists()


def test_calibration_figures_are_cross_fitted_so_no_image_judges_its_own_threshold() -> None:
    from fracture.deploy.calibrate import cross_fitted

    rng = np.random.default_rng(4)
    labels = (rng.random(200) < 0.3).astype(int)
    probs = np.clip(0.35 * labels + rng.random(200) * 0.65, 0, 1)
    base = cross_fitted(probs, labels, 0.95, folds=5, seed=0)
    # images that share image 7's fold were decided by thresholds chosen without image 7: moving it changes none of them
    moved = probs.copy()
    moved[7] = 1.0 - moved[7]
    again = cross_fitted(moved, labels, 0.95, folds=5, seed=0)
    changed = {name: np.flatnonzero(base[name] != again[name]) for name in base}
    rng_fold = np.random.default_rng(0)  # the same stratified assignment cross_fitted makes
    fold = np.empty(200, int)
    for label in (0, 1):
        idx = np.flatnonzero(labels == label)
        fold[idx[rng_fold.permutation(len(idx))]] = np.arange(len(idx)) % 5
    assert all(fold[i] != fold[7] or i == 7 for name in changed for i in changed[name])
    # read off the set, the screening point reaches its target there by construction; out of sample it need not
    from fracture.scoring import metrics
    t = metrics.operating_points(probs, labels, 0.95, n_boot=0)["screening"]
    assert metrics.binary_metrics(probs, labels, t)["sensitivity"] >= 0.95
    assert base["screening"][labels == 1].mean() < 1.0
