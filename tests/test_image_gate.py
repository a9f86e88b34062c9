"""The image gate: a file's declared size (and frame count) is known before a pixel is decoded, for every
format, or the file is refused; a small bomb never costs more than a bounded amount of memory."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import REPO

from fracture.imaging import preprocess

PEAK_BOUND_MB = 60  # over a child process that imported the same modules and decoded nothing
spec = importlib.util.spec_from_file_location("hostile_inputs", REPO / "scripts" / "hostile_inputs.py")
hostile = importlib.util.module_from_spec(spec)
spec.loader.exec_module(hostile)


CHILD = """
import json, resource, sys
from fracture.imaging import preprocess
import cv2, numpy, PIL.Image
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    preprocess.read_image(sys.argv[1])
    said = "decoded"
except preprocess.ImageError as exc:
    said = str(exc)
print(json.dumps({"said": said, "peak_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024}))
"""


@pytest.mark.parametrize("name", ["webp", "jp2", "png-size", "png-text", "apng", "tiff-pages", "pnm", "unknown", "dicom-deflate"])
def test_small_bombs_are_refused_before_decoding_within_a_memory_bound(name: str, tmp_path: Path) -> None:
    path, reason = hostile.write_bombs(tmp_path)[name]
    assert path.stat().st_size < 600_000  # each claims hundreds of MB to GB
    done = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["said"] != "decoded" and reason in result["said"], result
    assert result["peak_mb"] < PEAK_BOUND_MB, result


def test_the_gate_reads_sizes_only_so_the_pixels_are_unchanged(tmp_path: Path) -> None:
    img = (np.add.outer(np.arange(90), np.arange(70)) % 251).astype(np.uint8)
    for suffix in (".png", ".webp", ".jp2", ".bmp", ".tiff"):
        path = tmp_path / f"x{suffix}"
        params = [cv2.IMWRITE_WEBP_QUALITY, 101] if suffix == ".webp" else []
        path.write_bytes(cv2.imencode(suffix, img, params)[1].tobytes())
        assert np.array_equal(preprocess.read_image(path), cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_GRAYSCALE)), suffix


def test_opencv_has_its_own_pixel_limit_behind_the_gate() -> None:
    code = "import fracture, os, cv2; print(os.environ['OPENCV_IO_MAX_IMAGE_PIXELS'])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert int(done.stdout) == 200_000_000 > preprocess.DEFAULT_MAX_PIXELS


pydicom = pytest.importorskip("pydicom") if importlib.util.find_spec("pydicom") else None


@pytest.mark.skipif(pydicom is None, reason="pydicom (the dicom extra) is not installed")
def test_dicom_deflated_is_refused_palette_is_coloured_and_preamble_less_files_read(tmp_path: Path) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

    def dataset(pixels: np.ndarray, syntax: str, photometric: str = "MONOCHROME2") -> Dataset:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1.1", generate_uid()
        meta.TransferSyntaxUID = syntax
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit, ds.PixelRepresentation = 7, 0
        ds.PixelData = pixels.tobytes()
        return ds

    img = (np.add.outer(np.arange(64), np.arange(48)) % 200).astype(np.uint8)
    dataset(img, DeflatedExplicitVRLittleEndian).save_as(str(tmp_path / "deflated.dcm"), enforce_file_format=True)
    with pytest.raises(preprocess.ImageError, match="Deflated transfer syntax"):
        preprocess.read_image(tmp_path / "deflated.dcm")
    # PALETTE COLOR: each index shown as its table colour, then gray (not the index itself)
    pal = dataset(img, ExplicitVRLittleEndian, "PALETTE COLOR")
    red, green, blue = (np.arange(256) * 257).astype(np.uint16), np.zeros(256, np.uint16), (255 - np.arange(256)).astype(np.uint16) * 257
    for name, table in (("Red", red), ("Green", green), ("Blue", blue)):
        setattr(pal, f"{name}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(pal, f"{name}PaletteColorLookupTableData", table.tobytes())
    pal.save_as(str(tmp_path / "palette.dcm"), enforce_file_format=True)
    rgb = np.stack([red[img], green[img], blue[img]], -1)
    expected = cv2.cvtColor(np.rint(rgb / 257).astype(np.uint8), cv2.COLOR_RGB2GRAY)
    assert np.abs(preprocess.read_image(tmp_path / "palette.dcm").astype(int) - expected).max() <= 1
    # a .dcm without the 128-byte preamble and DICM: read all the same
    whole = tmp_path / "plain.dcm"
    dataset(img, ExplicitVRLittleEndian).save_as(str(whole), enforce_file_format=True)
    bare = tmp_path / "bare.dcm"
    bare.write_bytes(whole.read_bytes()[132:])
    assert np.array_equal(preprocess.read_image(bare), preprocess.read_image(whole))
