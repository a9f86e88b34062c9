from __future__ import annotations

from pathlib import Path

import numpy as np

from fracture.data.annotations import load_splits, read_split
from fracture.data.synth import FRACTURE_TYPES, write_dataset
from fracture.imaging import preprocess
from fracture.scoring import metrics


def test_same_seed_same_images(tmp_path: Path) -> None:
    write_dataset(tmp_path / "a", n=12, seed=5)
    write_dataset(tmp_path / "b", n=12, seed=5)
    write_dataset(tmp_path / "c", n=12, seed=6)
    files = sorted((tmp_path / "a").rglob("*.png"))
    assert len(files) == 12
    for f in files:
        assert f.read_bytes() == (tmp_path / "b" / f.relative_to(tmp_path / "a")).read_bytes()
    a = (tmp_path / "a" / "train" / "annotations.csv").read_text()
    assert a == (tmp_path / "b" / "train" / "annotations.csv").read_text()
    assert a != (tmp_path / "c" / "train" / "annotations.csv").read_text()


def test_written_in_the_dataset_format(synth_root: Path) -> None:
    tables = load_splits(synth_root)
    train = read_split(synth_root / "train")
    assert set(train.loc[train.label == 1, "fracture_type"]) <= set(FRACTURE_TYPES)
    assert set(train.loc[train.label == 0, "fracture_type"]) == {"none"}
    assert not set(tables["train"]["group"]) & set(tables["test"]["group"])
    depths = {preprocess.cv2.imread(p, preprocess.cv2.IMREAD_UNCHANGED).dtype for p in train["path"]}
    assert depths == {np.dtype(np.uint8), np.dtype(np.uint16)}


def _stats(path: str) -> np.ndarray:
    img = preprocess.read_image(path).astype(np.float64) / 255
    hist = np.histogram(img, bins=8, range=(0, 1))[0] / img.size
    return np.r_[img.mean(), img.std(), np.percentile(img, [5, 25, 50, 75, 95]), hist, img.shape]


def test_global_intensity_statistics_do_not_separate_the_classes(tmp_path: Path) -> None:
    """A logistic regression on histogram/percentile features must stay near chance (AUROC < 0.65)."""
    write_dataset(tmp_path, n=500, seed=11, test_fraction=0.4)
    train, test = read_split(tmp_path / "train"), read_split(tmp_path / "test")
    x_tr = np.stack([_stats(p) for p in train["path"]])
    x_te = np.stack([_stats(p) for p in test["path"]])
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-9
    x_tr, x_te = (x_tr - mu) / sd, (x_te - mu) / sd
    y = train["label"].to_numpy()
    w, b = np.zeros(x_tr.shape[1]), 0.0
    for _ in range(2000):
        p = 1 / (1 + np.exp(-(x_tr @ w + b)))
        w -= 0.1 * (x_tr.T @ (p - y) / len(y) + 1e-3 * w)
        b -= 0.1 * float(np.mean(p - y))
    train_auc = metrics.auroc(x_tr @ w + b, y)
    test_auc = metrics.auroc(x_te @ w + b, test["label"].to_numpy())
    assert train_auc > 0.5  # the classifier did fit something
    assert test_auc < 0.65, test_auc
