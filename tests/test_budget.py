"""The byte budget: what a decode will hold is worked out from headers, bounds the real peak, refuses the files
that hold GBs while declaring few pixels, admits real radiographs, and the conversions it assumes are exact."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import REPO

from fracture.data.synth import dicom_bytes
from fracture.imaging import budget, pixels, preprocess

spec = importlib.util.spec_from_file_location("hostile_inputs", REPO / "scripts" / "hostile_inputs.py")
hostile = importlib.util.module_from_spec(spec)
spec.loader.exec_module(hostile)
pydicom = pytest.importorskip("pydicom")

# decode a small file of the same kind first (decoder libraries load lazily), reset the peak (Linux: clear_refs 5),
# then measure the real one from the resident memory before it
CHILD = """
import gc, json, sys
from fracture.imaging import preprocess
def kb(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))
try:
    preprocess.read_image(sys.argv[2])
except preprocess.ImageError:
    pass
gc.collect()
open("/proc/self/clear_refs", "w").write("5")
base = kb("VmRSS")
try:
    preprocess.read_image(sys.argv[1], max_bytes=int(sys.argv[3]))
    said = "decoded"
except preprocess.ImageError as exc:
    said = str(exc)
print(json.dumps({"said": said, "peak_mb": (kb("VmHWM") - base) / 1024}))
"""


def peak(path: Path, warm: Path, max_bytes: int = preprocess.DEFAULT_MAX_BYTES) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(path), str(warm), str(max_bytes)], capture_output=True, text=True,
                          timeout=180, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


@pytest.mark.parametrize("name", ["png-16bit-rgba", "tiff-float32", "dicom-16bit-windowed-rle", "dicom-rle-rgb-16bit",
                                  "dicom-j2k-inner-16000", "dicom-jpeg-inner-16000"])
def test_byte_bombs_are_refused_from_their_headers(name: str, tmp_path: Path) -> None:
    """Within the pixel limit (or lying inside about their size), each would hold 0.4-3.6 GB if decoded."""
    bombs = hostile.write_byte_bombs(tmp_path)
    path, reason = bombs[name]
    assert path.stat().st_size < 5_000_000
    warm = tmp_path / "warm.png"
    cv2.imwrite(str(warm), np.zeros((32, 32), np.uint8))
    result = peak(path, warm)
    assert reason in result["said"] and "install" not in result["said"], result
    assert result["peak_mb"] < 60, result


def _files(tmp: Path) -> dict[str, tuple[Path, Path, int]]:
    """Admitted files of each decode path, with a small warm-up file of the same kind and the gate's estimate."""
    rng = np.random.default_rng(0)
    side = 1400
    grey = cv2.resize(rng.integers(0, 255, (70, 70), dtype=np.uint8), (side, side), interpolation=cv2.INTER_LINEAR)
    deep = grey.astype(np.uint16) * 257
    out = {}

    def image(name: str, suffix: str, img: np.ndarray, params: tuple = ()) -> None:
        big, small = tmp / f"{name}{suffix}", tmp / f"{name}-warm{suffix}"
        cv2.imwrite(str(big), img, list(params))
        cv2.imwrite(str(small), img[:40, :40], list(params))
        out[name] = (big, small)

    image("png-grey", ".png", grey)
    image("png-16bit-rgba", ".png", cv2.merge([deep, deep, deep, deep]))
    image("tiff-float32", ".tiff", grey.astype(np.float32) / 255)
    image("tiff-16bit-rgb", ".tiff", cv2.merge([deep, deep, deep]))
    image("bmp-colour", ".bmp", cv2.merge([grey, grey, grey]))
    image("jpeg-colour", ".jpg", cv2.merge([grey, grey, grey]))
    image("webp", ".webp", grey)
    image("jp2", ".jp2", grey)

    def dicom(name: str, img: np.ndarray, syntax: str, **kw) -> None:
        from pydicom.uid import UID

        files = []
        for suffix, a in (("", img), ("-warm", img[:40, :40])):
            path = tmp / f"{name}{suffix}.dcm"
            ds = pydicom.dcmread(io.BytesIO(dicom_bytes(a.shape[0], a.shape[1], np.ascontiguousarray(a).tobytes(),
                                                                "1.2.840.10008.1.2.1", bits=8 * a.itemsize, **kw)))
            if syntax != "1.2.840.10008.1.2.1":
                ds.compress(UID(syntax))
            ds.save_as(str(path), enforce_file_format=True)
            files.append(path)
        out[name] = tuple(files)

    dicom("dicom-native-16bit-window", deep, "1.2.840.10008.1.2.1", WindowCenter=30000, WindowWidth=40000)
    dicom("dicom-j2k-16bit", deep, "1.2.840.10008.1.2.4.90")
    dicom("dicom-rle-rgb", cv2.merge([grey, grey, grey]), "1.2.840.10008.1.2.5", samples=3, photometric="RGB")
    return out


def test_the_estimate_bounds_the_real_peak_on_every_decode_path(tmp_path: Path) -> None:
    """The budget is only as good as its estimate: for each format and DICOM codec, the memory a decode really
    held (peak RSS of a child, decoder libraries already loaded) is at most what the gate worked out beforehand."""
    files = _files(tmp_path)
    for name, (path, warm) in files.items():
        try:
            preprocess.read_image(path, max_bytes=10**12)
        except preprocess.ImageError as exc:
            pytest.fail(f"{name}: {exc}")
        cost = _estimate_mb(path)
        result = peak(path, warm, 10**12)
        assert result["said"] == "decoded", (name, result)
        assert result["peak_mb"] <= cost + 4, (name, result, cost)  # + a few MB of allocator and page-table noise


def _estimate_mb(path: Path) -> float:
    """The gate's estimate, read back from its refusal at a budget of the file's own size."""
    try:
        preprocess.read_image(path, max_bytes=path.stat().st_size)
    except preprocess.ImageError as exc:
        return float(str(exc).split("needs about ")[1].split(" MB")[0].replace(",", ""))
    raise AssertionError("not refused")


def test_the_default_budget_admits_real_radiographs(tmp_path: Path) -> None:
    """4,300 x 4,300 16-bit DX, 3,000 x 2,500 CR, FracAtlas's largest originals — and a 4,300^2 16-bit JPEG 2000 DX."""
    for name, path in hostile.write_radiograph_sizes(tmp_path).items():
        img = preprocess.read_image(path)
        assert img.dtype == np.uint8 and min(img.shape) >= 2300, name
    assert budget.dicom_cost(4300, 4300, 1, 16, "1.2.840.10008.1.2.4.90", 20 << 20) < preprocess.DEFAULT_MAX_BYTES
    assert budget.image_cost(2304, 2880, 3, 1, "JPEG") < preprocess.DEFAULT_MAX_BYTES


def test_conversions_through_tables_are_exact() -> None:
    """uint8 by a table of the value range gives what the float64 formula gives, for every integer type."""
    rng = np.random.default_rng(3)
    for dtype in (np.uint16, np.int16, np.int32, np.uint32, np.int8):
        info = np.iinfo(dtype)
        img = rng.integers(info.min, info.max, (130, 70), dtype=dtype, endpoint=True)
        expected = np.clip(np.rint((img.astype(np.float64) - info.min) * (255.0 / (info.max - info.min))), 0, 255).astype(np.uint8)
        assert np.array_equal(pixels.to_uint8(img), expected), dtype
    floats = rng.normal(0, 1000, (300, 40)).astype(np.float32)
    lo, hi = float(floats.min()), float(floats.max())
    assert np.array_equal(pixels.to_uint8(floats), np.rint((floats.astype(np.float64) - lo) * (255.0 / (hi - lo))).astype(np.uint8))


def test_dicom_windowing_through_a_table_equals_pydicom_on_the_whole_image(tmp_path: Path) -> None:
    """Modality LUT, window or VOI LUT, MONOCHROME1 and padding: the table gives pydicom's own result, pixel for pixel."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    dicom_variants = importlib.util.spec_from_file_location("dicom_variants", REPO / "scripts" / "dicom_variants.py")
    module = importlib.util.module_from_spec(dicom_variants)
    dicom_variants.loader.exec_module(module)
    picture = (np.add.outer(np.arange(90), np.arange(80) * 2) % 256).astype(np.uint8)
    for name, path in module.write_variants(picture, tmp_path).items():
        ds = pydicom.dcmread(str(path))
        values = apply_modality_lut(ds.pixel_array, ds)
        if ds.get("VOILUTSequence"):
            lo, hi, values = 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1), apply_voi_lut(values, ds, index=0)
        else:
            from fracture.imaging.dicom import _display_range

            lo, hi = _display_range(ds)
            if ds.get("WindowWidth") is not None:
                values = apply_voi_lut(values, ds, index=0, prefer_lut=False)
        expected = np.clip(np.rint((np.asarray(values, np.float64) - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            expected = 255 - expected
        if "PixelPaddingValue" in ds:
            expected[ds.pixel_array == ds.PixelPaddingValue] = 0
        assert np.array_equal(preprocess.read_image(path), expected), name


def test_a_file_over_the_budget_is_not_even_read(tmp_path: Path) -> None:
    path = tmp_path / "huge.png"
    with open(path, "wb") as f:
        f.truncate(64 << 20)  # sparse: 64 MB claimed, nothing written
    with pytest.raises(preprocess.ImageError, match="over the 16 MB decode budget"):
        preprocess.read_image(path, max_bytes=16 << 20)


def test_reading_a_study_key_never_inflates_a_deflated_dicom(tmp_path: Path) -> None:
    """The predictor groups DICOM by study before decoding: that header read is bounded too (it was 1.1 GB)."""
    bomb, _ = hostile.write_bombs(tmp_path)["dicom-deflate"]
    code = ("import resource, sys\nfrom fracture.imaging import dicom\nbase = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "key = dicom.dicom_study_key(sys.argv[1])\nprint(repr(key), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)")
    done = subprocess.run([sys.executable, "-c", code, str(bomb)], capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    key, peak = done.stdout.split()
    assert key == "''" and float(peak) < 60, done.stdout + done.stderr
