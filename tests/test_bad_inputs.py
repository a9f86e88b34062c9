"""Every kind of odd input, through every entry point: a clear message, never a crash or a silent mistake."""

from __future__ import annotations

import shutil
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from conftest import tiny_fit_args

from fracture.data.annotations import DatasetError
from fracture.deploy import predict
from fracture.imaging import preprocess
from fracture.report import evaluate
from fracture.train import fit
from fracture.train.data import FractureDataModule


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but carries almost no data (a decompression bomb's shape)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def make(kind: str, folder: Path) -> Path:
    base = (np.add.outer(np.arange(64), np.arange(48)) * 2).astype(np.uint8)
    path = folder / {"cmyk": "cmyk.jpg", "truncated": "truncated.jpg", "random": "random.jpg"}.get(kind, f"{kind}.png")
    if kind == "zero":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(3000))
    elif kind == "truncated":
        data = cv2.imencode(".jpg", base)[1].tobytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "png16":
        cv2.imwrite(str(path), base.astype(np.uint16) * 257)
    elif kind == "rgba":
        cv2.imwrite(str(path), np.dstack([base, base, base, np.full_like(base, 200)]))
    elif kind == "cmyk":
        from PIL import Image

        Image.fromarray(base).convert("CMYK").save(path)
    elif kind == "tiny":
        cv2.imwrite(str(path), np.full((1, 1), 128, np.uint8))
    elif kind == "huge":
        path.write_bytes(_png_header_only(20000, 20000))
    return path


ACCEPTED = ["png16", "rgba", "cmyk"]
REFUSED = {"zero": "empty file", "random": "not a decodable image", "truncated": "truncated JPEG", "tiny": "too small", "huge": "megapixels"}


@pytest.mark.parametrize("kind", ACCEPTED)
def test_odd_but_valid_images_become_the_same_gray_input(kind: str, tmp_path: Path) -> None:
    img = preprocess.read_image(make(kind, tmp_path))
    reference = (np.add.outer(np.arange(64), np.arange(48)) * 2).astype(np.uint8)
    assert img.shape == reference.shape and np.abs(img.astype(int) - reference).max() <= 2


@pytest.mark.parametrize("kind,reason", REFUSED.items())
def test_bad_images_are_refused_with_the_reason(kind: str, reason: str, tmp_path: Path) -> None:
    path = make(kind, tmp_path)
    with pytest.raises(preprocess.ImageError, match=reason) as info:
        preprocess.read_image(path)
    assert path.name in str(info.value)


def test_predictor_keeps_going_past_every_bad_kind(tmp_path: Path, tiny_onnx: Path) -> None:
    paths = [make(kind, tmp_path) for kind in [*ACCEPTED, *REFUSED]]
    out = tmp_path / "preds.csv"
    assert predict.main([str(tiny_onnx), *map(str, paths), "--out", str(out), "--quiet"]) == 1
    rows = pd.read_csv(out, keep_default_na=False).set_index("path")
    for kind, path in zip([*ACCEPTED, *REFUSED], paths):
        row = rows.loc[str(path)]
        if kind in ACCEPTED:
            assert row["error"] == "" and 0 <= float(row["probability"]) <= 1
        else:
            assert REFUSED[kind] in row["error"]


def _dataset_with(tmp_path: Path, synth_root: Path, kind: str, split: str = "train") -> tuple[Path, Path]:
    root = tmp_path / "ds"
    shutil.copytree(synth_root, root)
    bad = make(kind, root / split / "images")
    table = pd.read_csv(root / split / "annotations.csv", dtype=str)
    row = {"image": bad.name, "fracture": "no", "fracture_type": "none", "patient_id": "bad", "view": "AP"}
    pd.concat([table, pd.DataFrame([row])]).to_csv(root / split / "annotations.csv", index=False)
    return root, bad


@pytest.mark.parametrize("kind", ["huge", "tiny"])
def test_data_module_names_the_bad_file(kind: str, tmp_path: Path, synth_root: Path) -> None:
    root, bad = _dataset_with(tmp_path, synth_root, kind, split="test")
    dm = FractureDataModule(root=str(root), image_size=48, num_workers=0)
    with pytest.raises(DatasetError, match=REFUSED[kind]) as info:
        dm.setup("test")
    assert bad.name in str(info.value)


def test_fit_stops_before_training_on_a_bad_image(tmp_path: Path, synth_root: Path, capsys: pytest.CaptureFixture) -> None:
    root, bad = _dataset_with(tmp_path, synth_root, "random")
    assert fit.main(tiny_fit_args(root, tmp_path / "out", "--data.val_fraction", "0.01")) == 2
    err = capsys.readouterr().err
    assert bad.name in err and "Traceback" not in err
    assert not list((tmp_path / "out").rglob("*.ckpt"))


def test_evaluate_names_a_bad_test_image(tmp_path: Path, synth_root: Path, tiny_ckpt: Path, capsys: pytest.CaptureFixture) -> None:
    root, bad = _dataset_with(tmp_path, synth_root, "truncated", split="test")
    assert evaluate.main(["--ckpt", str(tiny_ckpt), "--root", str(root), "--out", str(tmp_path / "r")]) == 2
    assert bad.name in capsys.readouterr().err


def test_one_class_split_reports_undefined_auroc_instead_of_crashing(tmp_path: Path, synth_root: Path, tiny_ckpt: Path) -> None:
    root = tmp_path / "ds"
    shutil.copytree(synth_root, root)
    table = pd.read_csv(root / "test" / "annotations.csv", dtype=str)
    table[table["fracture"] == "no"].to_csv(root / "test" / "annotations.csv", index=False)
    out = tmp_path / "r"
    assert evaluate.main(["--ckpt", str(tiny_ckpt), "--root", str(root), "--out", str(out), "--bootstrap", "50"]) == 0
    report = (out / "report.md").read_text()
    assert "| auroc | n/a | n/a | n/a |" in report and "| sensitivity | n/a" in report
