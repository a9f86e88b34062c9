"""DICOM as a viewer shows it: every PACS-style variant of a picture decodes to that picture (pydicom written here)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import REPO

from fracture.data.synth import radiograph
from fracture.deploy.predict import expand_inputs
from fracture.deploy.predictor import Predictor
from fracture.imaging import preprocess

pytest.importorskip("pydicom")
spec = importlib.util.spec_from_file_location("dicom_variants", REPO / "scripts" / "dicom_variants.py")
variants = importlib.util.module_from_spec(spec)
spec.loader.exec_module(variants)


@pytest.fixture(scope="module")
def picture() -> np.ndarray:
    return np.rint(radiograph(np.random.default_rng(5), True, "oblique", shape=(120, 100)) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def files(picture: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return variants.write_variants(picture, tmp_path_factory.mktemp("dicom"))


def test_every_variant_decodes_to_the_picture_a_viewer_shows(picture: np.ndarray, files: dict[str, Path]) -> None:
    expected = {"mono2_8bit", "mono1_8bit", "windowed_12bit_markers", "rescaled_window", "voi_lut", "padding", "IM000001"}
    assert expected <= set(files)
    for name, path in files.items():
        out = preprocess.read_image(path)
        assert np.abs(out.astype(int) - variants.expected_picture(picture, name)).max() <= 1, name


def test_jpeg2000_lossless_is_decoded_by_the_dicom_extra(picture: np.ndarray, files: dict[str, Path]) -> None:
    if "jpeg2000_lossless" not in files:
        pytest.fail("no JPEG 2000 encoder/decoder: the [dicom] extra must install pylibjpeg-openjpeg")
    assert np.array_equal(preprocess.read_image(files["jpeg2000_lossless"]), picture)


def test_probabilities_match_the_original_and_extensionless_files_are_found(picture: np.ndarray, files: dict[str, Path], tiny_onnx: Path, tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "original.png"), picture)
    predictor = Predictor(tiny_onnx)
    base = next(predictor.predict([str(tmp_path / "original.png")], show_progress=False)).probability
    found = expand_inputs([str(files["IM000001"].parent)])
    assert set(map(str, files.values())) <= set(found)  # DICOM found by its preamble, whatever its name
    for row in predictor.predict(found, show_progress=False):
        assert not row.error and abs(row.probability - base) <= 0.02, (row.path, row.probability, base)


def test_multiframe_and_oversized_dicom_are_refused_by_name(picture: np.ndarray, tmp_path: Path) -> None:
    ds = variants._dataset(tmp_path / "x", np.stack([picture, picture]), 8, NumberOfFrames=2)
    ds.save_as(str(tmp_path / "cine.dcm"), enforce_file_format=True)
    with pytest.raises(preprocess.ImageError, match="multi-frame DICOM \\(2 frames\\)"):
        preprocess.read_image(tmp_path / "cine.dcm")
    variants._dataset(tmp_path / "x", picture, 8).save_as(str(tmp_path / "big.dcm"), enforce_file_format=True)
    with pytest.raises(preprocess.ImageError, match="over the 0 MP limit"):
        preprocess.read_image(tmp_path / "big.dcm", max_pixels=5000)
    variants._dataset(tmp_path / "x", picture[:10, :10], 8).save_as(str(tmp_path / "tiny.dcm"), enforce_file_format=True)
    with pytest.raises(preprocess.ImageError, match="too small"):
        preprocess.read_image(tmp_path / "tiny.dcm")
