"""DICOM files as a viewer shows them (modality and VOI LUTs, windows, MONOCHROME1, palette colour), with their sizes, byte budget and compressed frames' own headers checked before pixels are decoded and the Deflated syntax refused before anything is inflated."""

from __future__ import annotations

import io
import math
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from fracture.imaging import budget
from fracture.imaging.pixels import ImageError, through_table, to_uint8


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
    """``StudyInstanceUID`` (else ``PatientID``) from a DICOM header, "" when neither or not DICOM.

    Reads the file's first 64 KB only (the header before the pixels), and never a Deflated file, which pydicom
    would inflate whole to read one tag (a 490 KB file became a 1.1 GB peak)."""
    try:
        import pydicom

        with open(path, "rb") as f:
            head = f.read(1 << 16)
        if transfer_syntax(head) == DEFLATED:
            return ""
        ds = pydicom.dcmread(io.BytesIO(head), stop_before_pixels=True, specific_tags=["StudyInstanceUID", "PatientID"], force=True)
    except Exception:  # noqa: BLE001 - not DICOM, no pydicom, or a broken header: no key
        return ""
    return str(ds.get("StudyInstanceUID", "") or ds.get("PatientID", "") or "")


DEFLATED = "1.2.840.10008.1.2.1.99"


def read_header(data: bytes, path: str | os.PathLike = "instance") -> object:
    """A DICOM file's header as a pydicom dataset, stopped before the pixel data (nothing is decoded); the
    Deflated syntax refused before anything is inflated. For the DICOM node's bookkeeping, after the gate."""
    if transfer_syntax(data) == DEFLATED:
        raise ImageError(f"{path}: DICOM with the Deflated transfer syntax is not read")
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True, defer_size=DEFER_SIZE)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for broken files
        raise ImageError(f"{path}: unreadable DICOM header ({type(exc).__name__})") from None
    if _depth(ds) > MAX_NESTING:  # every library that copies or serialises it recurses, and runs out of stack later
        raise ImageError(f"{path}: DICOM header with sequences nested over {MAX_NESTING} deep")
    return ds


MAX_NESTING = 16  # a radiograph's header nests 3 or 4 deep (a code sequence inside a view's, ...)
# Values over this size are left in the bytes until asked for (pydicom's deferred reading): a private blob of
# hundreds of MB is then never copied, by the gate or by a header read. Pixel data is asked for; VOI LUT tables
# (128 KB at 16 bits) stay under it.
DEFER_SIZE = 1 << 20


def loaded_elements(ds: object) -> Iterator:
    """A dataset's elements, leaving out values deferred by ``DEFER_SIZE``: iterating a dataset reads them all."""
    for tag in list(ds.keys()):
        raw = ds.get_item(tag, keep_deferred=True)
        if not (getattr(raw, "value", 0) is None and getattr(raw, "length", 0) > DEFER_SIZE):
            yield ds[tag]


def _depth(ds: object) -> int:
    """How deep a dataset's sequences nest, walked without recursion (stops counting past the limit)."""
    deepest, todo = 0, [(ds, 0)]
    while todo and deepest <= MAX_NESTING:
        item, depth = todo.pop()
        deepest = max(deepest, depth)
        todo.extend((nested, depth + 1) for element in loaded_elements(item) if element.VR == "SQ" for nested in element.value or [])
    return deepest


def transfer_syntax(data: bytes) -> str:
    """The Transfer Syntax UID (0002,0010) from a DICOM file's meta group (always explicit VR little endian),
    read from the bytes before pydicom parses, and inflates, anything; "" when not found."""
    start = 132 if data[128:132] == b"DICM" else 0
    at = data.find(b"\x02\x00\x10\x00UI", start, start + 8192)
    if at < 0:
        return ""
    length = struct.unpack("<H", data[at + 6 : at + 8])[0]
    return data[at + 8 : at + 8 + length].rstrip(b"\x00 ").decode("ascii", "replace")


def _dataset(path: Path, data: bytes):
    import pydicom

    try:
        try:
            return pydicom.dcmread(io.BytesIO(data), defer_size=DEFER_SIZE)
        except pydicom.errors.InvalidDicomError:  # no 128-byte preamble and "DICM": many PACS exports; the suffix said DICOM
            return pydicom.dcmread(io.BytesIO(data), force=True, defer_size=DEFER_SIZE)
    except Exception as exc:  # pydicom raises many types for broken files
        raise ImageError(f"{path}: unreadable DICOM ({type(exc).__name__})") from None


def _syntax(ds: object) -> str:
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    return str(uid) if uid else "1.2.840.10008.1.2"  # no meta group: implicit VR little endian, as pydicom assumes


def _decoders_installed() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(name) is not None for name in ("gdcm", "openjpeg"))


def read_dicom(path: Path, data: bytes, max_pixels: int, max_bytes: int = int(budget.DEFAULT_MAX_DECODE_MB * budget.MB)) -> np.ndarray:
    """DICOM as a viewer shows it: modality LUT, then the VOI LUT or first window, then MONOCHROME1 inversion.

    pydicom's own ``apply_modality_lut`` / ``apply_voi_lut`` do the maths, on a table of the image's value range
    (exact: they work value by value) rather than on a float64 copy of the image. No window and no VOI LUT: the
    full stored range (``BitsStored``). Pixel padding becomes black. Multi-frame files are refused by name;
    colour files become grey. Sizes, the byte budget and a compressed frame's own header are checked before any
    pixel is decoded; header values that cannot be used give a reason, never a traceback.
    """
    try:
        import pydicom  # noqa: F401
    except ImportError as exc:
        raise ImageError(f"{path}: DICOM needs pydicom; install it with `pip install 'fracture[dicom]'`") from exc
    if transfer_syntax(data) == DEFLATED:  # inflating it first is how a 195 KB file reached a 449 MB peak
        raise ImageError(f"{path}: DICOM with the Deflated transfer syntax is not read (its size is only known after "
                         "inflating it); re-export it uncompressed or JPEG-compressed")
    ds = _dataset(path, data)
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        samples, allocated = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.BitsAllocated)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except Exception:  # noqa: BLE001 - missing, empty or non-numeric
        raise ImageError(f"{path}: DICOM without a usable image description (Rows, Columns, BitsAllocated)") from None
    if rows < 1 or cols < 1 or samples not in (1, 3) or allocated not in (1, 8, 16, 32) or frames < 1:
        raise ImageError(f"{path}: DICOM declares an image this reader does not take ({cols}x{rows}, {samples} samples, "
                         f"{allocated} bits allocated, {frames} frames)")
    if rows * cols * frames > max_pixels:
        raise ImageError(f"{path}: DICOM header claims {frames} x {cols}x{rows} pixels, over the {max_pixels / 1e6:.0f} MP limit")
    if frames > 1:
        raise ImageError(f"{path}: multi-frame DICOM ({frames} frames); export the view to predict as a single-frame file")
    syntax = _syntax(ds)
    if "PixelData" not in ds or not ds.PixelData:
        raise ImageError(f"{path}: DICOM without pixel data")
    if syntax not in budget.READABLE:
        raise ImageError(f"{path}: DICOM transfer syntax {syntax} is not one this reader decodes")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2").upper()
    _check_pixel_data(path, ds, syntax, rows, cols, samples, allocated)
    colours = 3 if photometric == "PALETTE COLOR" else samples
    budget.check(budget.dicom_cost(rows, cols, colours, max(allocated, 16 if colours > samples else 8), syntax, len(ds.PixelData)),
                 max_bytes, f"{path}: DICOM of {cols}x{rows}x{samples} at {allocated} bits")
    from pydicom.uid import UID

    try:
        pixels = ds.pixel_array
    except Exception:  # noqa: BLE001 - a decoder's own text stays out of the reason
        hint = ("the installed decoders could not decode it (damaged or unusual data)" if _decoders_installed()
                else "`pip install 'fracture[dicom]'` installs the decoders for compressed files")
        raise ImageError(f"{path}: cannot decode the DICOM pixels ({UID(syntax).name}); {hint}") from None
    if pixels.shape[:2] != (rows, cols):
        raise ImageError(f"{path}: DICOM pixels decode to {pixels.shape}, not the {rows}x{cols} its header declares")
    try:
        return _display(ds, pixels, photometric)
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - a zero window, an empty padding value, a LUT that does not fit
        raise ImageError(f"{path}: DICOM whose display values (window, LUT, padding, colour table) cannot be applied "
                         f"({type(exc).__name__})") from None


def _check_pixel_data(path: Path, ds: object, syntax: str, rows: int, cols: int, samples: int, allocated: int) -> None:
    """Native data must be as long as declared; a compressed frame's own header must declare the same image."""
    if syntax in budget.NATIVE:
        need = (rows * cols * samples * allocated + 7) // 8
        if len(ds.PixelData) < need:
            raise ImageError(f"{path}: DICOM pixel data of {len(ds.PixelData)} bytes is shorter than the {need} its header declares")
        return
    from pydicom.encaps import generate_frames

    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    except Exception:  # noqa: BLE001 - no items, a broken offset table
        raise ImageError(f"{path}: compressed DICOM pixel data without a readable frame") from None
    try:
        width, height, comps, _ = budget.codestream_header(frame, syntax)
    except ImageError as exc:
        raise ImageError(f"{path}: {exc}") from None
    if syntax in budget.RLE:
        if comps != samples * max(1, allocated // 8):
            raise ImageError(f"{path}: RLE data with {comps} segments for {samples} samples of {allocated} bits")
    elif (width, height, comps) != (cols, rows, samples):
        raise ImageError(f"{path}: the compressed image inside declares {width}x{height} with {comps} components; its DICOM "
                         f"header {cols}x{rows} with {samples}: refused before decoding")


def _check_display_values(ds: object) -> None:
    """A rescale or window that is not a finite number (or a zero slope) would turn every pixel into one value or
    NaN, and the model would be shown a blank picture: refused instead (the caller gives the reason)."""
    from pydicom.multival import MultiValue

    for keyword in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"):
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        values = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
        if not all(math.isfinite(float(v)) for v in values) or (keyword == "RescaleSlope" and float(values[0]) == 0):
            raise ValueError(f"{keyword} is not a usable number")


def _display(ds: object, pixels: np.ndarray, photometric: str) -> np.ndarray:
    """Decoded pixels → the ``uint8`` grey picture a viewer shows."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    if photometric == "PALETTE COLOR":  # indices into a colour table: the table's colours, then gray
        pixels = apply_color_lut(pixels, ds)
    if pixels.ndim == 3:
        return cv2.cvtColor(to_uint8(pixels), cv2.COLOR_RGB2GRAY)  # pydicom returns RGB (YBR converted)
    _check_display_values(ds)
    voi = ds.get("VOILUTSequence")
    if voi and voi[0].get("LUTDescriptor") is not None and voi[0].get("LUTData") is not None:
        lo, hi = 0.0, float(2 ** int(voi[0].LUTDescriptor[2]) - 1)
        voi_fn = lambda v: apply_voi_lut(v, ds, index=0)  # noqa: E731
    elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        lo, hi = _display_range(ds)
        voi_fn = lambda v: apply_voi_lut(v, ds, index=0, prefer_lut=False)  # noqa: E731
    else:
        lo, hi = _display_range(ds)
        voi_fn = lambda v: v  # noqa: E731
    scale = 255.0 / max(hi - lo, 1e-9)
    invert = photometric == "MONOCHROME1"  # MONOCHROME1 shows low values white; we train on bone bright

    def shown(values: np.ndarray) -> np.ndarray:
        out = np.clip(np.rint((np.asarray(voi_fn(apply_modality_lut(values, ds)), np.float64) - lo) * scale), 0, 255).astype(np.uint8)
        return 255 - out if invert else out

    out = through_table(pixels, shown)
    if ds.get("PixelPaddingValue") is not None:  # an empty value pads nothing
        a, b = int(ds.PixelPaddingValue), int(ds.get("PixelPaddingRangeLimit", ds.PixelPaddingValue))
        out[(pixels >= min(a, b)) & (pixels <= max(a, b))] = 0
    return out
