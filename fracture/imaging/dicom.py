"""DICOM files as a viewer shows them (modality and VOI LUTs, windows, MONOCHROME1, palette colour), with their sizes checked before pixels are decoded and the Deflated syntax refused before anything is inflated."""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import cv2
import numpy as np

from fracture.imaging.preprocess import ImageError, to_uint8


def _display_range(ds: object) -> tuple[float, float]:
    """The value range after the modality LUT: what a window (or no window) maps onto black..white.

    Mirrors pydicom's ``apply_windowing``: the stored range by ``BitsStored`` (signed or not), through the
    modality LUT's bit depth or the rescale slope/intercept.
    """
    bits = int(ds.BitsStored)
    if ds.get("ModalityLUTSequence"):
        return 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    lo, hi = (0.0, float(2**bits - 1)) if int(ds.get("PixelRepresentation", 0)) == 0 else (float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1))
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    ends = sorted((lo * slope + intercept, hi * slope + intercept))
    return ends[0], ends[1]


def dicom_study_key(path: str | os.PathLike) -> str:
    """``StudyInstanceUID`` (else ``PatientID``) from a DICOM header, "" when neither or not DICOM."""
    try:
        import pydicom

        ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["StudyInstanceUID", "PatientID"])
    except Exception:  # noqa: BLE001 - not DICOM, no pydicom, or a broken header: no key
        return ""
    return str(ds.get("StudyInstanceUID", "") or ds.get("PatientID", "") or "")


DEFLATED = "1.2.840.10008.1.2.1.99"


def transfer_syntax(data: bytes) -> str:
    """The Transfer Syntax UID (0002,0010) from a DICOM file's meta group (always explicit VR little endian),
    read from the bytes before pydicom parses, and inflates, anything; "" when not found."""
    start = 132 if data[128:132] == b"DICM" else 0
    at = data.find(b"\x02\x00\x10\x00UI", start, start + 8192)
    if at < 0:
        return ""
    length = struct.unpack("<H", data[at + 6 : at + 8])[0]
    return data[at + 8 : at + 8 + length].rstrip(b"\x00 ").decode("ascii", "replace")


def read_dicom(path: Path, data: bytes, max_pixels: int) -> np.ndarray:
    """DICOM as a viewer shows it: modality LUT, then the VOI LUT or first window, then MONOCHROME1 inversion.

    pydicom's own ``apply_modality_lut`` / ``apply_voi_lut`` do the maths. No window and no VOI LUT: the full
    stored range (``BitsStored``). Pixel padding becomes black. Multi-frame files are refused by name; colour
    files become gray. Size guards apply before the pixels are decoded.
    """
    try:
        import pydicom
        from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut
    except ImportError as exc:
        raise ImageError(f"{path}: DICOM needs pydicom; install it with `pip install 'fracture[dicom]'`") from exc
    if transfer_syntax(data) == DEFLATED:  # inflating it first is how a 195 KB file reached a 449 MB peak
        raise ImageError(f"{path}: DICOM with the Deflated transfer syntax is not read (its size is only known after "
                         "inflating it); re-export it uncompressed or JPEG-compressed")
    try:
        try:
            ds = pydicom.dcmread(io.BytesIO(data))
        except pydicom.errors.InvalidDicomError:  # no 128-byte preamble and "DICM": many PACS exports; the suffix said DICOM
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
        rows, cols = int(ds.Rows), int(ds.Columns)
    except Exception as exc:  # pydicom raises many types for broken files
        raise ImageError(f"{path}: unreadable DICOM ({type(exc).__name__})") from exc
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if rows * cols * frames > max_pixels:
        raise ImageError(f"{path}: DICOM header claims {frames} x {cols}x{rows} pixels, over the {max_pixels / 1e6:.0f} MP limit")
    if frames > 1:
        raise ImageError(f"{path}: multi-frame DICOM ({frames} frames); export the view to predict as a single-frame file")
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", syntax)
        raise ImageError(f"{path}: cannot decode the DICOM pixels ({name}); "
                         f"`pip install 'fracture[dicom]'` installs the decoders for compressed files") from exc
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":  # indices into a colour table: the table's colours, then gray
        try:
            pixels = apply_color_lut(pixels, ds)
        except Exception as exc:  # noqa: BLE001 - a table that does not fit its indices
            raise ImageError(f"{path}: PALETTE COLOR DICOM whose colour table cannot be applied ({type(exc).__name__})") from None
    if int(ds.get("SamplesPerPixel", 1) or 1) > 1 or pixels.ndim == 3:
        return cv2.cvtColor(to_uint8(pixels), cv2.COLOR_RGB2GRAY)  # pydicom returns RGB (YBR converted)
    padding = None
    if "PixelPaddingValue" in ds:
        a, b = int(ds.PixelPaddingValue), int(ds.get("PixelPaddingRangeLimit", ds.PixelPaddingValue))
        padding = (pixels >= min(a, b)) & (pixels <= max(a, b))
    values = apply_modality_lut(pixels, ds)
    voi = ds.get("VOILUTSequence")
    if voi and voi[0].get("LUTDescriptor") is not None and voi[0].get("LUTData") is not None:
        lo, hi = 0.0, float(2 ** int(voi[0].LUTDescriptor[2]) - 1)
        values = apply_voi_lut(values, ds, index=0)
    elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        lo, hi = _display_range(ds)
        values = apply_voi_lut(values, ds, index=0, prefer_lut=False)
    else:
        lo, hi = _display_range(ds)
    out = np.clip(np.rint((np.asarray(values, np.float64) - lo) * (255.0 / max(hi - lo, 1e-9))), 0, 255).astype(np.uint8)
    if photometric == "MONOCHROME1":
        out = 255 - out  # MONOCHROME1 shows low values white; we train on bone bright
    if padding is not None:
        out[padding] = 0
    return out
