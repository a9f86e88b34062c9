from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from fracture.data.annotations import Columns, DatasetError, load_splits, read_split, split_by_group
from fracture.data.labels import parse_label


def make_split(root: Path, rows: list[dict], header: list[str] | None = None, files: bool = True) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(rows, columns=header)
    if files:
        for name in table.iloc[:, 0]:
            path = root / "images" / name
            if ".." not in name and not Path(name).is_absolute():
                path.parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(path), np.full((8, 8), 100, np.uint8))
    table.to_csv(root / "annotations.csv", index=False)
    return root


@pytest.mark.parametrize(
    "value,expected",
    [("1", 1), ("0", 0), ("yes", 1), ("No", 0), ("TRUE", 1), ("false", 0), ("Fractured", 1), ("not fractured", 0),
     ("Not_Fractured", 0), ("non-fractured", 0), ("normal", 0), ("1.0", 1), ("0.0", 0), ("maybe", None), ("2", None), ("", None)],
)
def test_label_spellings(value: str, expected: int | None) -> None:
    assert parse_label(value) == expected


@pytest.mark.parametrize("image_col,label_col", [("image", "fracture"), ("filename", "label"), ("Path", "Fractured"), ("image_id", "target")])
def test_columns_are_detected(tmp_path: Path, image_col: str, label_col: str) -> None:
    make_split(tmp_path, [{image_col: "a.png", label_col: "yes"}, {image_col: "sub/b.png", label_col: "no"}])
    table = read_split(tmp_path)
    assert table["label"].tolist() == [1, 0]
    assert table["path"].tolist() == [os.path.abspath(tmp_path / "images" / n) for n in ("a.png", "sub/b.png")]


def test_explicit_columns_and_metadata_kept(tmp_path: Path) -> None:
    make_split(tmp_path, [{"pic": "a.png", "broken": "1", "kind": "oblique", "pid": "p1", "region": "hand"}])
    table = read_split(tmp_path, Columns(image="pic", label="broken", fracture_type="kind", group="pid"))
    row = table.iloc[0]
    assert (row["label"], row["fracture_type"], row["group"], row["region"]) == (1, "oblique", "p1", "hand")


def test_missing_file_names_the_rows(tmp_path: Path) -> None:
    make_split(tmp_path, [{"image": "a.png", "label": 1}, {"image": "gone.png", "label": 0}])
    (tmp_path / "images" / "gone.png").unlink()
    with pytest.raises(DatasetError, match=r"do not exist.*line 3: gone\.png"):
        read_split(tmp_path)


@pytest.mark.parametrize("name", ["../escape.png", "/etc/passwd", "sub/../../x.png"])
def test_paths_outside_the_split_are_refused(tmp_path: Path, name: str) -> None:
    make_split(tmp_path, [{"image": "a.png", "label": 1}, {"image": name, "label": 0}])
    with pytest.raises(DatasetError, match="must stay inside"):
        read_split(tmp_path)


def test_bad_label_names_line_and_value(tmp_path: Path) -> None:
    make_split(tmp_path, [{"image": "a.png", "label": "yes"}, {"image": "b.png", "label": "perhaps"}])
    with pytest.raises(DatasetError, match=r"line 3: 'perhaps'"):
        read_split(tmp_path)


def test_duplicate_rows_refused(tmp_path: Path) -> None:
    make_split(tmp_path, [{"image": "a.png", "label": 1}, {"image": "a.png", "label": 1}])
    with pytest.raises(DatasetError, match="more than once, lines 2, 3"):
        read_split(tmp_path)


def test_missing_label_column(tmp_path: Path) -> None:
    make_split(tmp_path, [{"image": "a.png", "score": 1}])
    with pytest.raises(DatasetError, match="fracture label column"):
        read_split(tmp_path)


def test_empty_and_non_utf8_files(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "annotations.csv").write_bytes(b"")
    with pytest.raises(DatasetError, match="empty file"):
        read_split(tmp_path)
    (tmp_path / "annotations.csv").write_bytes(b"image,label\n\xff\xfe.png,1\n")
    with pytest.raises(DatasetError, match="not UTF-8"):
        read_split(tmp_path)


def test_one_class_only_is_refused(tmp_path: Path) -> None:
    for split in ("train", "test"):
        make_split(tmp_path / split, [{"image": f"{i}.png", "label": 1} for i in range(10)])
    with pytest.raises(DatasetError, match="only fractured images"):
        load_splits(tmp_path)


def test_grouped_split_never_leaks_and_is_stratified() -> None:
    rng = np.random.default_rng(0)
    groups = np.repeat([f"p{i}" for i in range(200)], rng.integers(1, 4, 200))
    group_label = {g: int(rng.random() < 0.3) for g in set(groups)}
    table = pd.DataFrame({"path": [f"{i}.png" for i in range(len(groups))], "group": groups, "label": [group_label[g] for g in groups]})
    train, val = split_by_group(table, 0.2, seed=7)
    assert not set(train["group"]) & set(val["group"])
    assert len(train) + len(val) == len(table)
    assert abs(len(val) / len(table) - 0.2) < 0.03
    assert abs(val["label"].mean() - table["label"].mean()) < 0.05
    again, _ = split_by_group(table, 0.2, seed=7)
    other, _ = split_by_group(table, 0.2, seed=8)
    assert again["path"].tolist() == train["path"].tolist()
    assert other["path"].tolist() != train["path"].tolist()


def test_val_is_carved_from_train_without_touching_test(synth_root: Path) -> None:
    tables = load_splits(synth_root, val_fraction=0.25, seed=1)
    assert set(tables) == {"train", "val", "test"}
    assert not set(tables["train"]["group"]) & set(tables["val"]["group"])
    assert not set(tables["train"]["path"]) & set(tables["test"]["path"])
    original = read_split(synth_root / "train")
    assert len(tables["train"]) + len(tables["val"]) == len(original)


def test_without_a_group_column_duplicate_images_are_grouped_not_file_names(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = []
    (tmp_path / "train" / "images").mkdir(parents=True)
    for i in range(30):
        img = cv2.resize(rng.integers(0, 255, (12, 12)).astype(np.uint8), (64, 64), interpolation=cv2.INTER_CUBIC)
        label = i % 2
        cv2.imwrite(str(tmp_path / "train" / "images" / f"a{i}.png"), img)
        rows.append({"image": f"a{i}.png", "fracture": label})
        if i < 10:  # an exact copy and a re-encoded near copy under other names
            cv2.imwrite(str(tmp_path / "train" / "images" / f"b{i}.png"), img)
            cv2.imwrite(str(tmp_path / "train" / "images" / f"c{i}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 80])
            rows += [{"image": f"b{i}.png", "fracture": label}, {"image": f"c{i}.jpg", "fracture": label}]
    pd.DataFrame(rows).to_csv(tmp_path / "train" / "annotations.csv", index=False)
    make_split(tmp_path / "test", [{"image": "t0.png", "fracture": 0}, {"image": "t1.png", "fracture": 1}])
    tables = load_splits(tmp_path, val_fraction=0.4, seed=0)
    where = {Path(p).name: (split, g) for split in ("train", "val") for p, g in zip(tables[split]["path"], tables[split]["group"])}
    for i in range(10):
        assert where[f"a{i}.png"] == where[f"b{i}.png"] == where[f"c{i}.jpg"]  # one group, one side of the carve-out
    assert len({g for name, (_, g) in where.items() if name.startswith("a")}) == 30  # different images, different groups
    assert len(tables["val"]) > 0 and not set(tables["train"]["group"]) & set(tables["val"]["group"])
