from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from fracture import audit
from fracture.annotations import DatasetError
from fracture.data import FractureDataModule
from fracture.synth import write_dataset

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "fracatlas-dev"


def _add(root: Path, split: str, name: str, label: int, data: bytes) -> None:
    (root / split / "images" / name).write_bytes(data)
    table = pd.read_csv(root / split / "annotations.csv", dtype=str)
    row = {"image": name, "fracture": str(label), "fracture_type": "none", "patient_id": name, "view": "AP"}
    pd.concat([table, pd.DataFrame([row])]).to_csv(root / split / "annotations.csv", index=False)


@pytest.fixture()
def planted(tmp_path: Path) -> Path:
    """A clean synthetic set plus: an exact copy in test, a re-encoded near copy with the other label, a truncated JPEG."""
    root = tmp_path / "ds"
    write_dataset(root, n=40, seed=2)
    train = pd.read_csv(root / "train" / "annotations.csv", dtype=str)
    first = root / "train" / "images" / train["image"][0]
    second = root / "train" / "images" / train["image"][1]
    _add(root, "test", "exact_copy.png", 1 if train["fracture"][0] == "yes" else 0, first.read_bytes())
    img = cv2.imread(str(second), cv2.IMREAD_GRAYSCALE)
    near = cv2.imencode(".jpg", np.clip(img.astype(int) + 6, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 80])[1].tobytes()
    _add(root, "train", "near_copy.jpg", 0 if train["fracture"][1] == "yes" else 1, near)
    whole = cv2.imencode(".jpg", img)[1].tobytes()
    _add(root, "train", "truncated.jpg", 0, whole[: len(whole) * 2 // 3])
    return root


def test_audit_finds_every_planted_problem(planted: Path) -> None:
    report = audit.audit(planted)
    defective = {Path(d["path"]).name: d["problem"] for d in report["defective"]}
    assert list(defective) == ["truncated.jpg"] and "truncated JPEG" in defective["truncated.jpg"]
    groups = [{Path(m["path"]).name for m in g["members"]} for g in report["duplicate_groups"]]
    assert any("exact_copy.png" in g for g in groups) and any("near_copy.jpg" in g for g in groups)
    assert report["exact_pairs"] >= 1 and report["near_pairs"] >= 1
    assert report["test_leaks"] == 1 and report["conflicting_groups"] == 1
    assert report["balance"]["test"]["images"] == len(pd.read_csv(planted / "test" / "annotations.csv"))


def test_audit_exit_codes(planted: Path, tmp_path: Path) -> None:
    assert audit.main([str(planted), "--out", str(tmp_path / "a.json")]) == 1
    assert audit.main([str(planted), "--out", str(tmp_path / "a.json"), "--allow"]) == 0
    clean = tmp_path / "clean"
    write_dataset(clean, n=30, seed=9)
    assert audit.main([str(clean)]) == 0 and (clean / "audit.json").is_file()


def test_shortcut_column_is_flagged(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    write_dataset(root, n=60, seed=4)
    for split in ("train", "test"):
        table = pd.read_csv(root / split / "annotations.csv")
        table["hardware"] = np.where(table["fracture"] == "yes", 1, 0)
        table.to_csv(root / split / "annotations.csv", index=False)
    report = audit.audit(root)
    assert report["shortcuts"]["by"]["metadata:hardware"]["auroc_alone"] == 1.0
    assert any("hardware" in w for w in report["shortcuts"]["warnings"])


def test_fit_refuses_byte_identical_images_across_splits(planted: Path) -> None:
    (planted / "train" / "images" / "truncated.jpg").unlink()
    table = pd.read_csv(planted / "train" / "annotations.csv", dtype=str)
    table[table["image"] != "truncated.jpg"].to_csv(planted / "train" / "annotations.csv", index=False)
    with pytest.raises(DatasetError, match="byte-identical"):
        FractureDataModule(root=str(planted)).check()
    assert len(FractureDataModule(root=str(planted), allow_leakage=True).check()["test"]) > 0


@pytest.mark.skipif(not SHARED.is_dir(), reason="FracAtlas copy not present")
def test_fracatlas_copy_defects_are_found(tmp_path: Path) -> None:
    from fracture.datasets import import_dataset

    report = import_dataset("fracatlas", SHARED, tmp_path / "fa")
    assert any("IMG0003298" in note for note in report["label_disagreements"])
    found = audit.audit(tmp_path / "fa")
    truncated = [d for d in found["defective"] if "truncated JPEG" in d["problem"]]
    assert len(truncated) >= 10
    labels = pd.concat([pd.read_csv(tmp_path / "fa" / s / "annotations.csv") for s in ("train", "test")]).set_index("image")["fracture"]
    assert all(labels[Path(d["path"]).name] == 0 for d in truncated)  # the damaged ones are non-fractured
    assert found["conflicting_groups"] >= 1 and found["test_leaks"] == 0
    assert any("hardware" in w for w in found["shortcuts"]["warnings"])


def test_libjpeg_warnings_become_the_files_reason_not_terminal_noise(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    img = (np.add.outer(np.arange(200), np.arange(160)) % 256).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", img)
    (tmp_path / "cut.jpg").write_bytes(buf.tobytes()[: len(buf) * 2 // 3])
    capfd.readouterr()
    facts, _ = audit.inspect(str(tmp_path / "cut.jpg"))
    out, err = capfd.readouterr()
    assert "Premature end of JPEG file" not in err + out
    assert facts.problem.startswith("truncated JPEG") and "decoder: Premature end of JPEG file" in facts.problem
