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

SHIPPED = REPO / "exports" / "fracatlas-v1.onnx"
CARD = REPO / "exports" / "fracatlas-v1.md"
RECORD = REPO / "tests" / "release" / "fracatlas-v1.json"


def test_the_shipped_file_is_the_one_its_card_names() -> None:
    stated = re.search(r"sha256 `([0-9a-f]{64})`", CARD.read_text())
    assert stated, "the card states the file's sha256"
    assert release.sha256(SHIPPED) == stated.group(1) == json.loads(RECORD.read_text())["sha256"]
    assert SHIPPED.stat().st_size <= 25 * 2**20
    stamped = release.Predictor(SHIPPED).metadata["release"]
    assert stamped["name"] == "fracatlas-v1" and stamped["card"] == "exports/fracatlas-v1.md" and re.fullmatch(r"[0-9a-f]{40}", stamped["training_commit"])


def test_the_shipped_model_answers_as_recorded_in_the_torch_free_install(tmp_path: Path) -> None:
    """Probabilities, maps and boxes on generated PNG/16-bit/JPEG/EXIF-rotated radiographs, with torch,
    pandas and matplotlib unimportable: any drift in decoding or preprocessing beyond the tolerances fails."""
    code = BLOCKER + "from fracture.deploy.release import main\nsys.exit(main(sys.argv[1:]))\n"
    done = subprocess.run([sys.executable, "-c", code, "check", str(SHIPPED), str(RECORD)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    recorded = json.loads(RECORD.read_text())
    assert any(a["file"].endswith("exif6.jpg") for a in recorded["answers"])
    assert all("map" in a and "boxes" in a for a in recorded["answers"])  # it answers where, not only whether


def test_a_changed_answer_or_file_fails_the_check(tiny_onnx: Path, tmp_path: Path) -> None:
    recorded = release.record(tiny_onnx)
    assert release.check(tiny_onnx, recorded) == []
    moved = json.loads(json.dumps(recorded))
    moved["answers"][2]["probability"] += 0.03  # what a resize or decoding change of that size would do
    assert any("2-png16.png: probability" in p for p in release.check(tiny_onnx, moved))
    resized = json.loads(json.dumps(recorded))
    resized["answers"][5]["size"] = resized["answers"][5]["size"][::-1]  # EXIF orientation ignored
    assert any("5-exif6.jpg: original size" in p for p in release.check(tiny_onnx, resized))
    other = json.loads(json.dumps(recorded))
    other["sha256"] = "0" * 64
    assert "is not the released file's" in release.check(tiny_onnx, other)[0]
