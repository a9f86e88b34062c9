"""DICOM as a viewer shows it: every PACS-style variant of a picture decodes to that picture (pydicom written here)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import REPO

from fracture.data.synth import radiograph
from fracture.data.inputs import expand_inputs
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


@pytest.mark.parametrize("tags", [dict(RescaleSlope="NaN"), dict(RescaleIntercept="inf"), dict(RescaleSlope=0), dict(WindowCenter="NaN", WindowWidth=400),
                                  dict(WindowCenter=[100, "inf"], WindowWidth=[400, 400])], ids=["slope NaN", "intercept inf", "slope 0", "centre NaN", "second centre inf"])
def test_a_rescale_or_window_that_is_not_a_number_is_refused_not_shown_blank(picture: np.ndarray, tmp_path: Path, tags: dict) -> None:
    """NaN through the modality LUT made every pixel one value and the model was shown a blank picture (found by
    sending such a file to the DICOM node): now a reason."""
    variants._dataset(tmp_path / "x", picture.astype(np.uint16) * 16, 16, **tags).save_as(str(tmp_path / "odd.dcm"), enforce_file_format=True)
    with pytest.raises(preprocess.ImageError, match="display values .* cannot be applied"):
        preprocess.read_image(tmp_path / "odd.dcm")
    variants._dataset(tmp_path / "x", picture.astype(np.uint16) * 16, 16, RescaleSlope=1, RescaleIntercept=0, WindowCenter=2048,
                      WindowWidth=4096).save_as(str(tmp_path / "fine.dcm"), enforce_file_format=True)
    assert preprocess.read_image(tmp_path / "fine.dcm").std() > 10


def test_a_header_nested_too_deep_is_refused_before_anything_copies_it(picture: np.ndarray, tmp_path: Path) -> None:
    """Sequences nested hundreds deep parse, then overflow the stack of whatever copies or serialises them later
    (the node's ledger, highdicom): read_header refuses them by name."""
    import struct

    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info

    from fracture.imaging import dicom

    def nested(depth: int) -> bytes:
        variants._dataset(tmp_path / "x", picture, 8).save_as(str(tmp_path / "plain.dcm"), enforce_file_format=True)
        import pydicom

        ds = pydicom.dcmread(tmp_path / "plain.dcm")
        out = DicomBytesIO()
        out.is_little_endian, out.is_implicit_VR = True, False
        out.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(out, ds.file_meta)
        low, high = pydicom.Dataset(), pydicom.Dataset()
        for element in ds:
            (low if element.tag < 0x0040A730 else high).add(element)
        write_dataset(out, low)
        out.write(struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF))  # Content Sequence, undefined length, inside itself
        for _ in range(depth - 1):
            out.write(struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF))
        out.write((struct.pack("<HHI", 0xFFFE, 0xE0DD, 0) + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)) * (depth - 1))
        out.write(struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
        write_dataset(out, high)
        return out.getvalue()

    assert "ContentSequence" in dicom.read_header(nested(5))
    with pytest.raises(preprocess.ImageError, match="nested over 16 deep"):
        dicom.read_header(nested(40))
    with pytest.raises(preprocess.ImageError, match="unreadable DICOM header \\(RecursionError\\)"):  # pydicom's own stack gives out first
        dicom.read_header(nested(2000))


def test_a_private_blob_is_never_copied_by_the_gate_or_a_header_read(picture: np.ndarray, tmp_path: Path) -> None:
    """A modality's raw data or preview in a private tag (here 48 MB) used to be copied by every read — the gate's,
    the node's header read, the answers' header copy: six concurrent 250 MB instances took the node to 3.7 GB.
    Values over 1 MB are now left in the bytes (pydicom's deferred reading) unless asked for, as pixel data is."""
    import tracemalloc

    from fracture.deploy.pacs.source import header_of
    from fracture.imaging import dicom

    ds = variants._dataset(tmp_path / "x", picture, 8, SeriesInstanceUID="1.2.826.0.1.3680043.10.999.4")
    ds.add_new((0x0009, 0x0010), "LO", "VENDOR")
    ds.add_new((0x0009, 0x1001), "OB", bytes(48 << 20))
    ds.save_as(str(tmp_path / "blob.dcm"), enforce_file_format=True)
    data = (tmp_path / "blob.dcm").read_bytes()
    tracemalloc.start()
    try:
        header = dicom.read_header(data, "blob.dcm")
        copied = header_of(header)
        shown = preprocess.gate(data, "blob.dcm")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak / 2**20:.0f} MB held while reading a 48 MB blob that nobody needs"
    assert (0x0009, 0x1001) not in copied and str(copied.SOPInstanceUID) == str(ds.SOPInstanceUID)
    assert np.array_equal(shown.image, picture)  # the picture itself, as without the blob
