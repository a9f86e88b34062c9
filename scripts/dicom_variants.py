"""Write one radiograph as the DICOM variants a PACS produces, and check the predictor sees the same picture.

    python scripts/dicom_variants.py MODEL.onnx [IMAGE] [--out DIR]

Variants of the 8-bit picture: MONOCHROME2 and MONOCHROME1 8-bit; 12-bit with a
window (Window Center/Width) and burned-in marker pixels; stored values rescaled
(slope 2, intercept -1024) with the window in rescaled units; a VOI LUT table;
pixel padding; JPEG 2000 lossless (when an encoder is installed); and a file
without an extension. Prints, per variant, the largest pixel difference from
the original after ``fracture.preprocess`` and the probability difference
under MODEL. Needs ``fracture[dicom]`` (pydicom and decoders).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def _dataset(path: Path, stored: np.ndarray, bits: int, photometric: str = "MONOCHROME2", **tags: object):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.StudyInstanceUID = "DX", "anon", generate_uid()
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    allocated = 8 if bits == 8 else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = allocated, bits, bits - 1, 0
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = stored.astype(np.uint8 if allocated == 8 else np.uint16).tobytes()
    return ds


def write_variants(picture: np.ndarray, out: Path) -> dict[str, Path]:
    """The variants of an 8-bit ``picture``; returns name → file. Each one shows ``picture`` in a viewer."""
    from pydicom.dataset import Dataset

    out.mkdir(parents=True, exist_ok=True)
    p = picture.astype(np.int64)
    files: dict[str, Path] = {}

    def save(name: str, ds) -> None:
        ds.save_as(str(out / name), enforce_file_format=True)
        files[name.split(".")[0]] = out / name

    save("mono2_8bit.dcm", _dataset(out / "x", p, 8))
    save("mono1_8bit.dcm", _dataset(out / "x", 255 - p, 8, "MONOCHROME1"))
    marked = p * 16 + 8
    marked[4:8, 4:14] = 4095  # burned-in marker: white in any viewer, outside the window
    save("windowed_12bit_markers.dcm", _dataset(out / "x", marked, 12, WindowCenter=2048.5, WindowWidth=4081))
    save("rescaled_window.dcm", _dataset(out / "x", p * 8 + 512, 12, RescaleSlope=2, RescaleIntercept=-1024, RescaleType="US",
                                         WindowCenter=2040.5, WindowWidth=4081))
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 16]
    lut.LUTData = [min(i // 16, 255) * 257 for i in range(4096)]
    lut["LUTData"].VR = "US"
    ds = _dataset(out / "x", p * 16, 12)
    ds.VOILUTSequence = [lut]
    save("voi_lut.dcm", ds)
    padded = p * 16
    border = np.zeros(p.shape, bool)
    border[:, :3] = border[:, -3:] = True
    padded[border] = 4095
    save("padding.dcm", _dataset(out / "x", padded, 12, PixelPaddingValue=4095))
    try:
        from pydicom.uid import JPEG2000Lossless

        ds = _dataset(out / "x", p, 8)
        ds.compress(JPEG2000Lossless)
        save("jpeg2000_lossless.dcm", ds)
    except Exception as exc:  # noqa: BLE001 - no encoder installed: say so, keep the rest
        print(f"(no JPEG 2000 variant: {type(exc).__name__}: {str(exc)[:120]})", file=sys.stderr)
    save("IM000001", _dataset(out / "x", p, 8))  # PACS-style: no extension
    return files


def expected_picture(picture: np.ndarray, name: str) -> np.ndarray:
    """What a viewer shows for the variant: the picture, with the burned-in marker or black padding."""
    p = picture.copy()
    if name == "windowed_12bit_markers":
        p[4:8, 4:14] = 255
    if name == "padding":
        p[:, :3] = p[:, -3:] = 0
    return p


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/dicom_variants.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("image", nargs="?", type=Path, help="an 8-bit radiograph (default: a synthetic one)")
    parser.add_argument("--out", type=Path, default=Path("reports/dicom_variants"))
    ns = parser.parse_args(args)
    from fracture.data.inputs import expand_inputs
    from fracture.deploy.predictor import Predictor
    from fracture.imaging import preprocess

    if ns.image:
        picture = preprocess.read_image(ns.image)
    else:
        from fracture.data.synth import radiograph

        picture = np.rint(radiograph(np.random.default_rng(0), True, "oblique") * 255).astype(np.uint8)
    files = write_variants(picture, ns.out / "dicom")
    import cv2

    cv2.imwrite(str(ns.out / "original.png"), picture)
    predictor = Predictor(ns.model)
    found = set(expand_inputs([str(ns.out / "dicom")]))
    base = next(predictor.predict([str(ns.out / "original.png")], show_progress=False)).probability
    print(f"original 8-bit picture: p = {base:.4f}  ({ns.model.name})")
    print(f"{'variant':<26}{'found in folder':>16}{'max |Δ pixel|':>15}{'p':>9}{'|Δp|':>9}")
    worst = 0.0
    for name, path in files.items():
        row = next(predictor.predict([str(path)], show_progress=False))
        if row.error:
            print(f"{name:<26}{str(str(path) in found):>16}  error: {row.error}")
            worst = float("inf")
            continue
        diff = int(np.abs(preprocess.read_image(path).astype(int) - expected_picture(picture, name)).max())
        worst = max(worst, abs(row.probability - base))
        print(f"{name:<26}{str(str(path) in found):>16}{diff:>15d}{row.probability:>9.4f}{abs(row.probability - base):>9.4f}")
    print(f"largest |Δp| {worst:.4f} (target <= 0.02)")
    return 0 if worst <= 0.02 else 1


if __name__ == "__main__":
    sys.exit(main())
