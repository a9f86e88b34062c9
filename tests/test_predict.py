from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch
from conftest import REPO
from torchmetrics.functional.classification import binary_accuracy, binary_auroc, binary_f1_score, binary_precision, binary_recall, binary_specificity

from fracture.boxes import heatmap
from fracture.data import inputs
from fracture.deploy import predict
from fracture.deploy.predictor import ModelError, Predictor
from fracture.export.graph import Deployable
from fracture.imaging import preprocess
from fracture.train.checkpoint import load_classifier

BLOCKER = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'torch', 'lightning', 'torchvision', 'torchmetrics', 'pandas', 'matplotlib'}:
            raise ImportError('blocked in this test: ' + name)
sys.meta_path.insert(0, _Block())
"""
BLOCK_TRAINING_LIBS = BLOCKER + "from fracture.deploy.predict import main\nsys.exit(main(sys.argv[1:]))\n"


def test_predictions_equal_the_checkpoint_on_files(synth_root: Path, tiny_ckpt: Path, tiny_onnx: Path) -> None:
    model = load_classifier(tiny_ckpt)
    paths = sorted(str(p) for p in (synth_root / "test" / "images").glob("*.png"))[:9]
    rows = list(Predictor(tiny_onnx).predict(paths, batch_size=4, show_progress=False))
    x = np.stack([preprocess.load(p, model.contract) for p in paths])[:, None].astype(np.float32)
    with torch.no_grad():
        expected = Deployable(model.net).eval()(torch.from_numpy(x))[0].numpy()
    assert [r.path for r in rows] == paths
    np.testing.assert_allclose([r.probability for r in rows], expected, atol=1e-5, rtol=0)


def test_predictor_runs_with_training_libraries_blocked(synth_root: Path, tiny_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "preds.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", BLOCK_TRAINING_LIBS, str(tiny_onnx), str(synth_root / "test" / "images"), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())
    assert len(rows) == len(list((synth_root / "test" / "images").glob("*.png")))
    assert all(0.0 <= r["probability"] <= 1.0 and r["prediction"] in {"fractured", "not_fractured"} for r in rows)


def test_bad_files_become_error_rows_and_exit_1(synth_root: Path, tiny_onnx: Path, tmp_path: Path) -> None:
    good = sorted((synth_root / "test" / "images").glob("*.png"))[:2]
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "noise.jpg").write_bytes(np.random.default_rng(1).bytes(2000))
    ok, buf = cv2.imencode(".jpg", np.full((50, 50), 128, np.uint8))
    (tmp_path / "cut.jpg").write_bytes(buf.tobytes()[:-40])
    inputs = [str(good[0]), str(tmp_path / "zero.png"), str(tmp_path / "noise.jpg"), str(tmp_path / "cut.jpg"), str(tmp_path / "absent.png"), str(good[1])]
    out = tmp_path / "preds.csv"
    assert predict.main([str(tiny_onnx), *inputs, "--out", str(out), "--quiet"]) == 1
    lines = out.read_text().splitlines()[1:]
    assert len(lines) == 6
    errors = {Path(line.split(",")[0]).name: line for line in lines}
    assert "empty file" in errors["zero.png"] and "not a decodable image" in errors["noise.jpg"]
    assert "truncated JPEG" in errors["cut.jpg"] and "not found" in errors["absent.png"]
    assert lines[0].split(",")[1] and lines[-1].split(",")[1]  # the good ones have probabilities


def test_label_metrics_equal_torchmetrics(synth_root: Path, tiny_onnx: Path, capsys: pytest.CaptureFixture) -> None:
    csv = synth_root / "test" / "annotations.csv"
    labels = inputs.read_labels(csv)
    predictor = Predictor(tiny_onnx)
    rows = list(predictor.predict(inputs.expand_inputs([str(csv)]), show_progress=False))
    ours, n = predict.labelled_metrics(rows, labels, 0.5)
    assert n == len(rows) == len(labels)
    p = torch.tensor([r.probability for r in rows])
    y = torch.tensor([labels[os.path.realpath(r.path)] for r in rows])
    theirs = {"accuracy": binary_accuracy(p, y), "precision": binary_precision(p, y), "sensitivity": binary_recall(p, y),
              "specificity": binary_specificity(p, y), "f1": binary_f1_score(p, y), "auroc": binary_auroc(p, y)}
    for name, value in theirs.items():
        assert ours[name] == pytest.approx(float(value), abs=1e-6), name
    assert predict.main([str(tiny_onnx), str(csv), "--labels", str(csv), "--quiet"]) == 0
    assert "sensitivity" in capsys.readouterr().out


def test_thresholds_by_value_and_by_operating_point(tiny_onnx: Path) -> None:
    predictor = Predictor(tiny_onnx)
    assert predictor.threshold(0.3) == ("custom", 0.3)
    assert predictor.threshold(operating_point="screening") == ("screening", predictor.thresholds["screening"])
    with pytest.raises(ModelError, match="not in this model"):
        predictor.threshold(operating_point="aggressive")


def test_folders_globs_and_csv_inputs(synth_root: Path) -> None:
    folder = synth_root / "test" / "images"
    pngs = sorted(str(p) for p in folder.glob("*.png"))
    assert inputs.expand_inputs([str(folder)]) == pngs
    assert inputs.expand_inputs([str(folder / "*_v0.png")]) == [p for p in pngs if p.endswith("_v0.png")]
    from_csv = inputs.expand_inputs([str(synth_root / "test" / "annotations.csv")])
    assert sorted(from_csv) == pngs


def _with_metadata(src: Path, dst: Path, edit) -> Path:
    model = onnx.load(str(src))
    meta = json.loads(model.metadata_props[0].value)
    edit(meta)
    model.metadata_props[0].value = json.dumps(meta)
    onnx.save(model, str(dst))
    return dst


def test_tampered_or_foreign_models_are_refused(tiny_onnx: Path, tmp_path: Path) -> None:
    resized = _with_metadata(tiny_onnx, tmp_path / "resized.onnx", lambda m: m["contract"].update(image_size=128))
    with pytest.raises(ModelError, match="altered or mixed up"):
        Predictor(resized)
    truncated = tmp_path / "cut.onnx"
    truncated.write_bytes(tiny_onnx.read_bytes()[:5000])
    with pytest.raises(ModelError, match="truncated or corrupt"):
        Predictor(truncated)
    bare = onnx.load(str(tiny_onnx))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    with pytest.raises(ModelError, match="no 'fracture' metadata"):
        Predictor(tmp_path / "bare.onnx")
    assert predict.main([str(tmp_path / "bare.onnx"), str(tmp_path)]) == 2


def test_dicom_round_trip(tmp_path: Path, tiny_onnx: Path) -> None:
    pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    rng = np.random.default_rng(0)
    pixels = (np.add.outer(np.arange(80), np.arange(60)) * 4095 // 138).astype(np.uint16)
    pixels[20:30, 10:50] = rng.integers(3000, 4095, (10, 40))

    def write(name: str, photometric: str, data: np.ndarray, slope: float = 1.0, intercept: float = 0.0) -> Path:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(tmp_path / name), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID = "DX", "anon"
        ds.Rows, ds.Columns = data.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = data.astype(np.uint16).tobytes()
        ds.save_as(str(tmp_path / name), enforce_file_format=True)
        return tmp_path / name

    expected = np.rint(pixels * (255 / 4095)).astype(np.uint8)
    mono2 = preprocess.read_image(write("mono2.dcm", "MONOCHROME2", pixels))
    mono1 = preprocess.read_image(write("mono1.dcm", "MONOCHROME1", 4095 - pixels))
    assert np.abs(mono2.astype(int) - expected).max() <= 1
    assert np.abs(mono1.astype(int) - expected).max() <= 1  # inverted back to bone-bright
    cv2.imwrite(str(tmp_path / "same.png"), expected)
    rows = list(Predictor(tiny_onnx).predict([str(tmp_path / "mono2.dcm"), str(tmp_path / "same.png")], show_progress=False))
    assert not rows[0].error and abs(rows[0].probability - rows[1].probability) < 1e-3


def test_rows_stream_to_out_and_resume_completes_a_killed_run(synth_root: Path, tiny_onnx: Path, tmp_path: Path) -> None:
    sources = sorted((synth_root / "test" / "images").glob("*.png"))
    (tmp_path / "many").mkdir()
    images = []  # enough distinct files that the run cannot finish between two polls
    for k in range(240):
        images.append(tmp_path / "many" / f"{k:03d}_{sources[k % len(sources)].name}")
        images[-1].symlink_to(sources[k % len(sources)])
    out = tmp_path / "preds.csv"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # a run killed mid-way (SIGKILL after the first rows reach the file) keeps what it wrote
    slow = subprocess.Popen([sys.executable, "-m", "fracture.predict", str(tiny_onnx), *map(str, images), "--out", str(out), "--batch-size", "1", "--quiet"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not out.is_file() or len(out.read_text().splitlines()) < 4):
        time.sleep(0.05)
    slow.kill()
    slow.wait()
    kept = list(csv.DictReader(open(out)))
    assert 3 <= len(kept) < len(images) and all(r["probability"] for r in kept)
    sha = Predictor(tiny_onnx).sha256
    assert {r["model_sha256"] for r in kept} == {sha}
    with open(out, "a") as f:
        f.write(str(images[-1])[:20])  # the half row a kill mid-write leaves
    assert predict.main([str(tiny_onnx), *map(str, images), "--out", str(out), "--resume", "--quiet"]) == 0
    rows = list(csv.DictReader(open(out)))
    assert sorted(r["path"] for r in rows) == sorted(map(str, images))  # each image once: done rows skipped, the rest added
    fresh = {r.path: r.probability for r in Predictor(tiny_onnx).predict(list(map(str, images)), show_progress=False)}
    assert all(abs(float(r["probability"]) - fresh[r["path"]]) < 1e-6 for r in rows)
    jsonl = tmp_path / "preds.jsonl"
    assert predict.main([str(tiny_onnx), *map(str, images[:3]), "--out", str(jsonl), "--quiet"]) == 0
    assert [json.loads(line)["model_sha256"] for line in jsonl.read_text().splitlines()] == [sha] * 3


def test_overlays_of_same_named_files_in_two_folders_do_not_overwrite(tmp_path: Path) -> None:
    image = np.full((40, 40), 100, np.uint8)
    for folder in ("a", "b"):
        heatmap.write_overlay(tmp_path / "maps", str(tmp_path / folder / "IMG001.jpg"), image, np.ones((40, 40)), 0.5)
    assert len(list((tmp_path / "maps").glob("IMG001_*_heatmap.png"))) == 2
