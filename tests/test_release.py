"""The shipped model: its bytes are the card's, and its answers on generated radiographs are the recorded ones."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO
from test_predict import BLOCKER

from fracture.deploy import release
from fracture.imaging import preprocess

SHIPPED = REPO / "exports" / "fracatlas-v2.onnx"
CARD = REPO / "exports" / "fracatlas-v2.md"
RECORD = REPO / "tests" / "release" / "fracatlas-v2.json"
# the guard's tolerances live here, not in the record they guard (docs/release.md: how they were measured)
TOLERANCE = {"probability": 0.02, "map": 0.05, "box_iou": 0.5}


def test_the_shipped_file_is_the_one_its_card_names() -> None:
    stated = re.search(r"sha256 `([0-9a-f]{64})`", CARD.read_text())
    assert stated, "the card states the file's sha256"
    assert release.sha256(SHIPPED) == stated.group(1) == json.loads(RECORD.read_text())["sha256"]
    assert SHIPPED.stat().st_size <= 25 * 2**20
    stamped = release.Predictor(SHIPPED).metadata["release"]
    assert stamped["name"] == "fracatlas-v2" and stamped["card"] == "exports/fracatlas-v2.md" and re.fullmatch(r"[0-9a-f]{40}", stamped["training_commit"])


def test_the_shipped_model_answers_as_recorded_in_the_torch_free_install(tmp_path: Path) -> None:
    """Probabilities, maps and boxes on generated PNG/16-bit/JPEG/EXIF-rotated radiographs, with torch,
    pandas and matplotlib unimportable: any drift in decoding or preprocessing beyond the tolerances fails."""
    code = BLOCKER + "from fracture.deploy.release import main\nsys.exit(main(sys.argv[1:]))\n"
    done = subprocess.run([sys.executable, "-c", code, "check", str(SHIPPED), str(RECORD)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    recorded = json.loads(RECORD.read_text())
    assert "tolerance" not in recorded and release.TOLERANCE == TOLERANCE
    kinds = {a["file"].split("-", 1)[1] for a in recorded["answers"]}
    assert {"exif6.jpg", "jpeg-large.jpg", "png16.png", "tiff.tiff", "bmp.bmp", "dcm-mono1.dcm", "dcm-16bit-window.dcm", "dcm-j2k.dcm"} <= kinds
    assert all("map" in a and "boxes" in a for a in recorded["answers"])  # it answers where, not only whether
    large = next(a for a in recorded["answers"] if a["file"].endswith("jpeg-large.jpg"))
    contract = release.Predictor(SHIPPED).contract
    assert contract.reduced_decode and preprocess.jpeg_reduction(*large["size"][::-1], contract) > 1  # the reduced path is guarded


def test_the_answer_does_not_depend_on_the_container() -> None:
    """The same pixels as PNG, JPEG q100, TIFF and DICOM (8- and 16-bit): one answer (the issue asks within 0.02;
    every container takes the JPEG's own reduced decoding, so they agree exactly)."""
    import cv2
    import numpy as np

    from fracture.data.synth import dicom_bytes, radiograph

    img = np.rint(radiograph(np.random.default_rng(5), True, "oblique", shape=(3000, 2500)) * 255).astype(np.uint8)
    files = {".png": cv2.imencode(".png", img)[1].tobytes(), ".jpg": cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 100])[1].tobytes(),
             ".tiff": cv2.imencode(".tiff", img)[1].tobytes(),
             "-8.dcm": dicom_bytes(*img.shape, img.tobytes(), "1.2.840.10008.1.2.1", bits=8),
             "-16.dcm": dicom_bytes(*img.shape, (img.astype(np.uint16) * 257).tobytes(), "1.2.840.10008.1.2.1")}
    predictor = release.Predictor(SHIPPED)
    probs = {}
    for suffix, data in files.items():
        x, _, _ = preprocess.load_bytes(data, f"x{suffix}", predictor.contract)
        probs[suffix] = float(predictor.run([x], maps=False)[0][0])
    assert max(probs.values()) - min(probs.values()) <= 1e-6 < TOLERANCE["probability"], probs


def test_a_changed_answer_or_file_fails_the_check(tiny_onnx: Path, tmp_path: Path) -> None:
    recorded = release.record(tiny_onnx)
    assert release.check(tiny_onnx, recorded, TOLERANCE) == []
    loose = json.loads(json.dumps(recorded))
    loose["tolerance"] = {"probability": 1.0, "map": 1.0, "box_iou": 0.0}  # a record cannot loosen its own guard
    loose["answers"][2]["probability"] += 0.03
    assert release.check(tiny_onnx, loose, TOLERANCE)
    moved = json.loads(json.dumps(recorded))
    moved["answers"][2]["probability"] += 0.03  # what a resize or decoding change of that size would do
    assert any("2-png16.png: probability" in p for p in release.check(tiny_onnx, moved, TOLERANCE))
    resized = json.loads(json.dumps(recorded))
    resized["answers"][5]["size"] = resized["answers"][5]["size"][::-1]  # EXIF orientation ignored
    assert any("5-exif6.jpg: original size" in p for p in release.check(tiny_onnx, resized, TOLERANCE))
    other = json.loads(json.dumps(recorded))
    other["sha256"] = "0" * 64
    assert "is not the released file's" in release.check(tiny_onnx, other)[0]


def test_a_new_box_fails_the_check_as_a_lost_one_does() -> None:
    recorded = json.loads(RECORD.read_text())
    assert release.differences(recorded, recorded["answers"], TOLERANCE) == []
    now = json.loads(json.dumps(recorded["answers"]))
    now[0]["boxes"].append([5.0, 5.0, 60.0, 60.0, 0.99])  # a confident box that was never there
    assert any("0-png8.png" in p and "is new" in p for p in release.differences(recorded, now, TOLERANCE))
    lost = json.loads(json.dumps(recorded["answers"]))
    shown = next(i for i, a in enumerate(lost) if any(b[4] > release.SHOWN for b in a["boxes"]))
    lost[shown]["boxes"] = []
    assert any("is gone" in p for p in release.differences(recorded, lost, TOLERANCE))
