from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from fracture.data import audit, duplicates
from fracture.data.annotations import DatasetError
from fracture.data.synth import write_dataset
from fracture.deploy.release import with_exif_orientation
from fracture.train.data import FractureDataModule

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


def test_fit_refuses_exact_and_near_copies_across_splits_even_with_a_patient_column(planted: Path) -> None:
    (planted / "train" / "images" / "truncated.jpg").unlink()
    table = pd.read_csv(planted / "train" / "annotations.csv", dtype=str)
    table[table["image"] != "truncated.jpg"].to_csv(planted / "train" / "annotations.csv", index=False)
    # every row has its own patient_id, so the patient check alone passes: the copies are found from the pixels
    with pytest.raises(DatasetError, match=r"duplicates across splits: .*exact_copy\.png \(test, line \d+\)") as err:
        FractureDataModule(root=str(planted)).check()
    assert "allow_leakage" in str(err.value) and "fracture.datasets import" in str(err.value)
    allowed = FractureDataModule(root=str(planted), allow_leakage=True).check()
    assert any("exact_copy.png" in p for p in allowed["train"].attrs["leakage"])
    # a re-encoded, brightened copy of a train image moved into test (not byte-identical) is refused too
    test = pd.read_csv(planted / "test" / "annotations.csv", dtype=str)
    test[test["image"] != "exact_copy.png"].to_csv(planted / "test" / "annotations.csv", index=False)
    (planted / "test" / "images" / "exact_copy.png").unlink()
    FractureDataModule(root=str(planted)).check()  # clean again: unrelated synthetic radiographs never fire
    train = pd.read_csv(planted / "train" / "annotations.csv", dtype=str)
    img = cv2.imread(str(planted / "train" / "images" / train["image"][5]), cv2.IMREAD_GRAYSCALE)
    copy = cv2.imencode(".jpg", np.clip(img.astype(int) * 1.05 + 4, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 70])[1].tobytes()
    _add(planted, "test", "re_encoded.jpg", int(train["fracture"][5] == "yes"), copy)
    with pytest.raises(DatasetError, match=r"re_encoded\.jpg \(test"):
        FractureDataModule(root=str(planted)).check()


@pytest.mark.skipif(not SHARED.is_dir(), reason="FracAtlas copy not present")
def test_fracatlas_copy_defects_are_found(tmp_path: Path) -> None:
    from fracture.data.datasets import import_dataset

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
    facts, _ = duplicates.inspect(str(tmp_path / "cut.jpg"))
    out, err = capfd.readouterr()
    assert "Premature end of JPEG file" not in err + out
    assert facts.problem.startswith("truncated JPEG") and "decoder: Premature end of JPEG file" in facts.problem


def test_a_second_exposure_of_one_limb_is_not_called_a_copy_but_a_re_encoded_one_is(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    write_dataset(root, n=4, seed=5)
    src = sorted((root / "train" / "images").iterdir())[0]
    img = cv2.imread(str(src), cv2.IMREAD_GRAYSCALE)
    h, w = img.shape
    copy = cv2.resize(img, (w * 3 // 4, h * 3 // 4), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(tmp_path / "copy.jpg"), np.clip(copy * 1.1 - 6, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 60])
    # the same limb placed again: shifted by 6 % and turned 4 degrees, as a second exposure would be
    moved = cv2.warpAffine(img, cv2.getRotationMatrix2D((w / 2, h / 2), 4, 1.0) + np.array([[0, 0, 0.06 * w], [0, 0, 0]]), (w, h),
                           borderMode=cv2.BORDER_REPLICATE)
    cv2.imwrite(str(tmp_path / "again.png"), moved)
    assert duplicates.same_radiograph(str(src), str(tmp_path / "copy.jpg"))
    assert not duplicates.same_radiograph(str(src), str(tmp_path / "again.png"))


def _remove_planted_defects(planted: Path) -> None:
    """The planted set less its truncated JPEG and its exact copy: clean again, for one more planted problem."""
    for split, name in (("train", "truncated.jpg"), ("test", "exact_copy.png")):
        (planted / split / "images" / name).unlink()
        table = pd.read_csv(planted / split / "annotations.csv", dtype=str)
        table[table["image"] != name].to_csv(planted / split / "annotations.csv", index=False)


def test_a_look_alike_exposure_across_splits_is_reported_not_refused(planted: Path) -> None:
    _remove_planted_defects(planted)
    train = pd.read_csv(planted / "train" / "annotations.csv", dtype=str)
    img = cv2.imread(str(planted / "train" / "images" / train["image"][3]), cv2.IMREAD_GRAYSCALE)
    h, w = img.shape  # the limb placed again, 1 % across and turned 1 degree: thumbnails alike (r 0.97), outlines not
    again = cv2.warpAffine(img, cv2.getRotationMatrix2D((w / 2, h / 2), 1, 1.0) + np.array([[0, 0, 0.01 * w], [0, 0, 0]]), (w, h),
                           borderMode=cv2.BORDER_REPLICATE)
    _add(planted, "test", "again.png", int(train["fracture"][3] == "yes"), cv2.imencode(".png", again)[1].tobytes())
    tables = FractureDataModule(root=str(planted)).check()
    assert any("again.png (test" in pair for pair in tables["train"].attrs["similar_across_splits"])
    assert tables["train"].attrs["leakage"] == []



@pytest.mark.parametrize("how", ["exif-6", "turned-90", "mirrored", "turned-270-mirrored"])
def test_rotated_or_mirrored_re_saves_across_splits_are_refused(planted: Path, how: str) -> None:
    """A test image re-saved turned or mirrored (pixels turned with an EXIF orientation that turns them back, or
    turned outright) under a new patient id is found as a copy, not accepted into train."""
    _remove_planted_defects(planted)
    test = pd.read_csv(planted / "test" / "annotations.csv", dtype=str)
    img = cv2.imread(str(planted / "test" / "images" / test["image"][0]), cv2.IMREAD_GRAYSCALE)
    turned = {"exif-6": np.rot90(img, 1), "turned-90": np.rot90(img, -1), "mirrored": img[:, ::-1], "turned-270-mirrored": np.rot90(img, 1)[::-1]}[how]
    data = cv2.imencode(".jpg", np.ascontiguousarray(turned), [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    if how == "exif-6":  # stored turned a quarter left; orientation 6 shows it upright, as training reads it
        data = with_exif_orientation(data, 6)
        from fracture.imaging import preprocess

        assert np.abs(preprocess.decode(data, "x.jpg")[0].astype(int) - img).mean() < 3
    _add(planted, "train", f"resaved-{how}.jpg", int(test["fracture"][0] == "yes"), data)
    with pytest.raises(DatasetError, match=rf"resaved-{how}\.jpg \(train"):
        FractureDataModule(root=str(planted)).check()


def test_the_demos_synthetic_set_passes_the_copy_check(tmp_path: Path) -> None:
    """README command 1's data (1,000 generated radiographs, seed 0) holds a pair that match only transposed
    (thumbnails r 0.986, outlines 0.852): a look-alike, not a copy; a turned match needs outlines >= 0.95."""
    write_dataset(tmp_path / "synthetic", n=1000, seed=0)
    tables = FractureDataModule(root=str(tmp_path / "synthetic")).check()
    assert tables["train"].attrs["leakage"] == []
    a, b = tmp_path / "synthetic" / "train" / "images" / "p00638_v0.png", tmp_path / "synthetic" / "test" / "images" / "p00602_v0.png"
    assert a.is_file() and b.is_file() and not duplicates.same_radiograph(str(a), str(b))
    assert duplicates.same_radiograph(str(a), str(a))
