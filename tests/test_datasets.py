from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from fracture.data.annotations import load_splits, read_split
from fracture.data.datasets import import_dataset, main
from fracture.data.synth import radiograph


def _img(path: Path, seed: int, fractured: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = radiograph(np.random.default_rng(seed), fractured, "oblique", shape=(96, 80))
    cv2.imwrite(str(path), np.rint(img * 255).astype(np.uint8))


def test_fracatlas_importer_labels_by_folder_and_reports_disagreements(tmp_path: Path) -> None:
    src = tmp_path / "fa"
    rows = []
    for i in range(30):
        fractured = i % 3 == 0
        name = f"IMG{i:07d}.jpg"
        _img(src / "images" / ("Fractured" if fractured else "Non_fractured") / name, i, fractured)
        csv_label = int(fractured) if i != 3 else 0  # upstream disagrees for one image
        rows.append({"image_id": name, "hand": int(i % 2 == 0), "leg": int(i % 2 == 1), "hip": 0, "shoulder": 0, "mixed": 0, "hardware": int(fractured),
                     "multiscan": 0, "fractured": csv_label, "fracture_count": int(fractured), "frontal": 1, "lateral": 0, "oblique": 0})
    pd.DataFrame(rows).to_csv(src / "dataset.csv", index=False)
    duplicate = src / "images" / "Non_fractured" / "IMG0000099.jpg"
    duplicate.write_bytes((src / "images" / "Non_fractured" / "IMG0000001.jpg").read_bytes())
    report = import_dataset("fracatlas", src, tmp_path / "out", test_fraction=0.3)
    assert report["label_disagreements"] == ["IMG0000003.jpg: dataset.csv says fractured=0 but the image is in Fractured/ (folder kept)", "IMG0000099.jpg: not in dataset.csv"]
    tables = load_splits(tmp_path / "out")
    train = read_split(tmp_path / "out" / "train")
    assert {"region", "hardware", "view", "fracture_count"} <= set(train.columns)
    everything = pd.concat([read_split(tmp_path / "out" / s).assign(split=s) for s in ("train", "test")])
    assert everything.set_index("path")["label"].rename(lambda p: Path(p).name).to_dict()["IMG0000003.jpg"] == 1
    pair = everything[everything["path"].str.contains("IMG0000001|IMG0000099")]
    assert pair["split"].nunique() == 1  # exact duplicates never straddle splits
    assert os.path.islink(train["path"][0]) and abs(len(tables["test"]) / 31 - 0.3) < 0.15


def test_copy_mode_keeps_bytes(tmp_path: Path) -> None:
    src = tmp_path / "fa"
    for i in range(8):
        _img(src / "images" / ("Fractured" if i < 3 else "Non_fractured") / f"IMG{i}.jpg", i, i < 3)
    import_dataset("fracatlas", src, tmp_path / "out", copy=True, test_fraction=0.25)
    for split in ("train", "test"):
        for path in read_split(tmp_path / "out" / split)["path"]:
            assert not os.path.islink(path)
            original = next(src.rglob(Path(path).name))
            assert Path(path).read_bytes() == original.read_bytes()


def test_folders_importer_keeps_splits_and_reads_spelling_variants(tmp_path: Path) -> None:
    src = tmp_path / "kaggle"
    layout = {("Train", "Fractured"): 1, ("train", "not_fractured"): 0, ("valid", "fractured"): 1, ("valid", "Normal"): 0,
              ("TEST", "FRACTURED"): 1, ("TEST", "non-fractured"): 0}
    for k, ((split, cls), label) in enumerate(layout.items()):
        for i in range(3):
            _img(src / split / cls / f"{cls}_{i}.png", 10 * k + i, bool(label))
    assert main(["import", "folders", str(src), "--out", str(tmp_path / "out")]) == 0
    tables = load_splits(tmp_path / "out")
    assert {s: len(t) for s, t in tables.items()} == {"train": 6, "val": 6, "test": 6}
    assert all(t["label"].sum() == 3 for t in tables.values())


def test_yolo_importer_reads_boxes_and_class_names(tmp_path: Path) -> None:
    src = tmp_path / "yolo"
    (src / "labels").mkdir(parents=True)
    (src / "classes.txt").write_text("elbow fracture\nfinger fracture\n")
    for i in range(12):
        _img(src / "images" / f"x{i}.jpg", i, i < 5)
        if i < 5:
            (src / "labels" / f"x{i}.txt").write_text(f"{i % 2} 0.5 0.5 0.1 0.1\n")
        elif i < 8:
            (src / "labels" / f"x{i}.txt").write_text("")
    report = import_dataset("yolo", src, tmp_path / "out", test_fraction=0.25)
    both = pd.concat([read_split(tmp_path / "out" / s) for s in ("train", "test")])
    assert both["label"].sum() == 5 and report["images_found"] == 12
    kinds = dict(zip(both["path"].map(lambda p: Path(p).name), both["fracture_type"]))
    assert kinds["x0.jpg"] == "elbow fracture" and kinds["x1.jpg"] == "finger fracture" and kinds["x6.jpg"] == "none"


def test_fracatlas_and_yolo_importers_carry_boxes(tmp_path: Path) -> None:
    src = tmp_path / "fa"
    (src / "Annotations" / "YOLO").mkdir(parents=True)
    for i in range(12):
        fractured = i < 4
        _img(src / "images" / ("Fractured" if fractured else "Non_fractured") / f"IMG{i}.jpg", i, fractured)
        if fractured:
            (src / "Annotations" / "YOLO" / f"IMG{i}.txt").write_text("0 0.5 0.25 0.2 0.1\n3 0.1 0.9 0.1 0.1\n" if i == 0 else "0 0.3 0.6 0.2 0.2\n")
    (src / "Annotations" / "YOLO" / "IMG7.txt").write_text("")  # non-fractured: empty file
    import_dataset("fracatlas", src, tmp_path / "out", test_fraction=0.25)
    both = pd.concat([read_split(tmp_path / "out" / s) for s in ("train", "test")]).set_index("path").rename(lambda p: Path(p).name)
    assert both.loc["IMG0.jpg", "boxes"] == "0.400000 0.200000 0.600000 0.300000;0.050000 0.850000 0.150000 0.950000"
    assert (both["boxes"] != "").sum() == 4 and both.loc["IMG7.jpg", "boxes"] == ""

    yolo = tmp_path / "yolo"
    (yolo / "labels").mkdir(parents=True)
    for i in range(8):
        _img(yolo / "images" / f"x{i}.jpg", i, i < 3)
        if i < 3:
            (yolo / "labels" / f"x{i}.txt").write_text("0 0.5 0.5 0.2 0.4\n")
    import_dataset("yolo", yolo, tmp_path / "yout", test_fraction=0.25)
    both = pd.concat([read_split(tmp_path / "yout" / s) for s in ("train", "test")])
    assert sorted(both["boxes"]) == [""] * 5 + ["0.400000 0.300000 0.600000 0.700000"] * 3
