"""Study-level answers: several views of one study are one clinical question."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from fracture.deploy import predict
from fracture.report import evaluate
from fracture.scoring import metrics


def test_aggregations_on_a_hand_computed_case() -> None:
    probs = np.array([0.9, 0.2, 0.5, 0.5, 0.1])
    studies = np.array(["a", "a", "b", "b", "c"])
    labels = np.array([1, 0, 0, 0, 0])
    keys, p, y = metrics.aggregate_studies(probs, studies, "max", labels)
    assert list(keys) == ["a", "b", "c"] and np.allclose(p, [0.9, 0.5, 0.1]) and list(y) == [1, 0, 0]
    assert np.allclose(metrics.aggregate_studies(probs, studies, "mean")[1], [0.55, 0.5, 0.1])
    assert np.allclose(metrics.aggregate_studies(probs, studies, "noisy_or")[1], [1 - 0.1 * 0.8, 0.75, 0.1])
    with pytest.raises(ValueError):
        metrics.aggregate_studies(probs, studies, "median")


def test_choice_prefers_the_best_study_auroc_and_defaults_to_max() -> None:
    # study x: one clear view and one normal-looking view of a fracture; max sees it, mean dilutes it below study y
    probs = np.array([0.95, 0.05, 0.6, 0.6, 0.1, 0.1])
    studies = np.array(["x", "x", "y", "y", "z", "z"])
    labels = np.array([1, 1, 0, 0, 0, 0])
    chosen = metrics.choose_study_aggregation(probs, labels, studies)
    assert chosen["method"] in ("max", "noisy_or") and chosen["val_study_auroc"]["max"] == 1.0 > chosen["val_study_auroc"]["mean"]
    assert metrics.choose_study_aggregation(probs, labels, np.array(list("abcdef")))["method"] == "max"


def test_export_chooses_the_aggregation_on_validation_studies(tiny_onnx: Path) -> None:
    meta = json.loads(ort.InferenceSession(str(tiny_onnx)).get_modelmeta().custom_metadata_map["fracture"])
    chosen = meta["study_aggregation"]
    assert chosen["method"] in metrics.STUDY_AGGREGATIONS and chosen["chosen_on"].startswith("validation split")
    assert set(chosen["val_study_auroc"]) == set(metrics.STUDY_AGGREGATIONS)


def test_predictor_writes_one_answer_per_study_from_csv_and_dicom(synth_root: Path, tiny_onnx: Path, tmp_path: Path) -> None:
    site = synth_root / "test" / "annotations.csv"
    out = tmp_path / "p.csv"
    assert predict.main([str(tiny_onnx), str(site), "--out", str(out), "--quiet"]) == 0
    images = list(csv.DictReader(open(out)))
    studies = list(csv.DictReader(open(tmp_path / "p.studies.csv")))
    rows = list(csv.DictReader(open(site)))
    assert len(studies) == len({r["study_id"] for r in rows})
    method = json.loads(ort.InferenceSession(str(tiny_onnx)).get_modelmeta().custom_metadata_map["fracture"])["study_aggregation"]["method"]
    by_path = {Path(r["path"]).name: float(r["probability"]) for r in images}
    for st in studies:
        members = [by_path[r["image"]] for r in rows if r["study_id"] == st["study"]]
        expected = metrics.aggregate_studies(np.array(members), np.zeros(len(members)), method)[1][0]
        assert float(st["probability"]) == pytest.approx(expected) and int(st["images"]) == len(members)

    pydicom = pytest.importorskip("pydicom")
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("dicom_variants", REPO / "scripts" / "dicom_variants.py")
    variants = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(variants)
    picture = np.full((80, 64), 90, np.uint8)
    for name, study in (("A1", "1.2.3"), ("A2", "1.2.3"), ("B1", "1.2.4")):
        ds = variants._dataset(tmp_path / "x", picture, 8)
        ds.StudyInstanceUID = study
        (tmp_path / "pacs").mkdir(exist_ok=True)
        ds.save_as(str(tmp_path / "pacs" / name), enforce_file_format=True)
    assert pydicom is not None
    assert predict.main([str(tiny_onnx), str(tmp_path / "pacs"), "--out", str(tmp_path / "d.csv"), "--quiet"]) == 0
    dicom_studies = {r["study"]: int(r["images"]) for r in csv.DictReader(open(tmp_path / "d.studies.csv"))}
    assert dicom_studies == {"1.2.3": 2, "1.2.4": 1}


def test_evaluate_reports_study_level_metrics(synth_root: Path, tiny_ckpt: Path, tmp_path: Path) -> None:
    assert evaluate.main(["--ckpt", str(tiny_ckpt), "--root", str(synth_root), "--out", str(tmp_path), "--bootstrap", "50"]) == 0
    st = json.loads((tmp_path / "metrics.json").read_text())["study_level"]
    assert 0 < st["studies"] < st["images"] and st["aggregation"] in metrics.STUDY_AGGREGATIONS
    assert "## Study level" in (tmp_path / "report.md").read_text()


def test_evaluate_groups_dicom_files_by_their_study_uid(synth_root: Path, tiny_ckpt: Path, tmp_path: Path) -> None:
    pytest.importorskip("pydicom")
    import importlib.util

    import cv2
    from conftest import REPO

    spec = importlib.util.spec_from_file_location("dicom_variants", REPO / "scripts" / "dicom_variants.py")
    variants = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(variants)
    rows = list(csv.DictReader(open(synth_root / "test" / "annotations.csv")))[:24]
    (tmp_path / "ds" / "test" / "images").mkdir(parents=True)
    for r in rows:
        ds = variants._dataset(tmp_path / "x", cv2.imread(str(synth_root / "test" / "images" / r["image"]), cv2.IMREAD_GRAYSCALE), 8)
        ds.StudyInstanceUID = "1.2." + r["study_id"][1:].lstrip("0")
        ds.save_as(str(tmp_path / "ds" / "test" / "images" / (r["image"][:-4] + ".dcm")), enforce_file_format=True)
    with open(tmp_path / "ds" / "test" / "annotations.csv", "w") as f:  # no study column: the DICOM headers have it
        f.write("image,fracture\n" + "".join(f"{r['image'][:-4]}.dcm,{r['fracture']}\n" for r in rows))
    assert evaluate.main(["--ckpt", str(tiny_ckpt), "--root", str(tmp_path / "ds"), "--out", str(tmp_path / "r"), "--bootstrap", "20"]) == 0
    st = json.loads((tmp_path / "r" / "metrics.json").read_text())["study_level"]
    assert st["studies"] == len({r["study_id"] for r in rows}) and st["images"] == len(rows)
