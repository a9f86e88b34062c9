"""Decode → grayscale → resize: the one preprocessing path.

Training, evaluation and the ONNX predictor all turn files into model inputs
through this module, so what a deployed model sees cannot drift from what it
was trained on. Torch-free on purpose (numpy + OpenCV only).

A model input is a ``uint8`` array of shape ``(image_size, image_size)``.
Scaling and normalisation to float happen inside the network (and inside the
exported ONNX graph), driven by the same :class:`Contract`.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

from fracture.imaging import budget
from fracture.imaging.contract import Contract, resize
from fracture.imaging.dicom import read_dicom
from fracture.imaging.pixels import ImageError, to_uint8

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm")
DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_MAX_BYTES = int(budget.DEFAULT_MAX_DECODE_MB * budget.MB)  # what one decode may hold: see fracture.imaging.budget
MIN_SIDE = 16  # smaller "radiographs" are icons or placeholders; upscaling them invents the input
_REDUCED = {2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4, 8: cv2.IMREAD_REDUCED_GRAYSCALE_8}


_STDERR = threading.Lock()


@contextlib.contextmanager
def capture_stderr() -> Iterator[Callable[[], list[str]]]:
    """Collect what C libraries (libjpeg) print to file descriptor 2 inside the block, instead of the terminal.

    Yields a function that returns the captured lines once the block has ended. One block at a time.
    """
    lines: list[str] = []
    with _STDERR, tempfile.TemporaryFile() as tmp:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield lambda: lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines.extend(tmp.read().decode(errors="replace").splitlines())


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation (1..8) of a JPEG, 1 when absent or unreadable."""
    i = 2
    while data[:2] == b"\xff\xd8" and i + 4 < len(data) and data[i] == 0xFF:
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2 : i + 4])[0]
        if marker == 0xE1 and data[i + 4 : i + 10] == b"Exif\0\0":
            tiff = data[i + 10 : i + 2 + length]
            order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
            if order is None or len(tiff) < 8:
                return 1
            ifd = struct.unpack(order + "I", tiff[4:8])[0]
            if ifd + 2 > len(tiff):
                return 1
            for k in range(struct.unpack(order + "H", tiff[ifd : ifd + 2])[0]):
                at = ifd + 2 + 12 * k
                if at + 10 <= len(tiff) and struct.unpack(order + "H", tiff[at : at + 2])[0] == 0x0112:
                    value = struct.unpack(order + "H", tiff[at + 8 : at + 10])[0]
                    return value if 1 <= value <= 8 else 1
            return 1
        if marker == 0xDA:  # start of scan: no EXIF before the pixels
            return 1
        i += 2 + length
    return 1


def apply_orientation(img: np.ndarray, orientation: int) -> np.ndarray:
    """Turn a decoded image the way EXIF ``orientation`` says a viewer shows it."""
    ops = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1], 5: lambda a: a.swapaxes(0, 1),
           6: lambda a: np.rot90(a, -1), 7: lambda a: a[::-1, ::-1].swapaxes(0, 1), 8: lambda a: np.rot90(a, 1)}
    return np.ascontiguousarray(ops[orientation](img)) if orientation in ops else img


class Header(NamedTuple):
    """What a file's header declares, read by Pillow (and the format's own header fields) without decoding a pixel."""

    width: int
    height: int
    frames: int
    samples: int  # per pixel, as OpenCV decodes it
    nbytes: int  # per sample
    format: str


def image_header(data: bytes, path: Path) -> Header:
    """Size, frame count and sample layout as the file's header declares them, read without decoding a pixel.

    Pillow knows the headers of every format OpenCV decodes here (PNG and APNG, JPEG, BMP, TIFF, WebP, JPEG
    2000, GIF, PNM) and guards its own reading (PNG text chunks over 1 MB are refused); what it cannot
    identify is refused, so no file reaches a decoder before its size is known.
    """
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit is ours: checked below
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                frames = int(getattr(img, "n_frames", 1) or 1)
                fmt, mode, tags = str(img.format), str(img.mode), dict(getattr(img, "tag_v2", {}) or {})
    except Image.DecompressionBombError:
        raise ImageError(f"{path}: header claims over {2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6:.0f} megapixels, over the pixel limit") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not a decodable image (not a recognised format: PNG, JPEG, TIFF, BMP, WebP, JPEG 2000 or DICOM)") from None
    except Exception:  # noqa: BLE001 - a header that breaks its reader: no size, so no decoding
        raise ImageError(f"{path}: unreadable image header") from None
    samples, nbytes = budget.layout(data, fmt, mode, tags)
    return Header(width, height, frames, samples, nbytes, fmt)


def is_dicom(path: str | os.PathLike, data: bytes) -> bool:
    """DICOM by its magic at byte 128, or by suffix."""
    return data[128:132] == b"DICM" or Path(path).suffix.lower() == ".dcm"


def is_truncated_jpeg(data: bytes) -> bool:
    """A JPEG whose end-of-image marker is missing (it decodes, if at all, with a grey band)."""
    return data[:2] == b"\xff\xd8" and not data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")


def is_image_file(path: str | os.PathLike) -> bool:
    """An image by its suffix, or a DICOM file by its preamble whatever its name (PACS exports often have none)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES or has_dicom_preamble(path)


def has_dicom_preamble(path: str | os.PathLike) -> bool:
    """``DICM`` at byte 128: a DICOM file whatever its name."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def jpeg_reduction(width: int, height: int, contract: Contract) -> int:
    """The largest libjpeg scale-down (1, 2, 4 or 8) that keeps the image at or above the model input size.

    Under a contract with ``reduced_decode`` every container takes the same reduction (JPEG in libjpeg's
    decoder, the others by :func:`reduce` after decoding), so the answer does not depend on the file format."""
    side = min(width, height) if contract.resize == "stretch" else max(width, height)
    return next((f for f in (8, 4, 2) if side / f >= contract.image_size and min(width, height) / f >= MIN_SIDE), 1)


def read_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS, contract: Contract | None = None,
               max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """Decode one file to a 2-D ``uint8`` grayscale array in its original geometry.

    With a ``contract`` whose ``reduced_decode`` is on, a large image comes back
    scaled down by :func:`jpeg_reduction` (same aspect); use :func:`load_with_size`
    for its original size.

    Raises:
        ImageError: unreadable, empty, truncated, oversized or undecodable files.
    """
    return _read(path, max_pixels, contract, max_bytes)[0]


def read_bytes(path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """A file's bytes, refused unread when the file alone is over the decode budget."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise ImageError(f"{path}: a file of {size / budget.MB:,.0f} MB is over the {max_bytes / budget.MB:,.0f} MB decode budget")
        return path.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None
    except OSError as exc:
        raise ImageError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _read(path: str | os.PathLike, max_pixels: int, contract: Contract | None, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[np.ndarray, tuple[int, int]]:
    """(decoded image, original (height, width) as displayed)."""
    return decode(read_bytes(path, max_bytes), path, max_pixels, contract, max_bytes)


class Decoded(NamedTuple):
    image: np.ndarray  # uint8, 2-D, as displayed (EXIF applied), reduced when the contract says so
    shape: tuple[int, int]  # the original (height, width) as displayed
    bit_depth: int  # of the decoded samples before the conversion to uint8


def decode(data: bytes, path: str | os.PathLike = "upload", max_pixels: int = DEFAULT_MAX_PIXELS,
           contract: Contract | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[np.ndarray, tuple[int, int]]:
    """Bytes in memory → (decoded image, original (height, width) as displayed); files come through here too.

    ``path`` names the bytes in error messages, and its suffix (``.dcm``) helps to recognise DICOM.
    """
    return gate(data, path, max_pixels, contract, max_bytes)[:2]


def gate(data: bytes, path: str | os.PathLike = "upload", max_pixels: int = DEFAULT_MAX_PIXELS, contract: Contract | None = None,
         max_bytes: int = DEFAULT_MAX_BYTES, allow_truncated: bool = False) -> Decoded:
    """The one decode of image bytes: every reader (predictor, service, audit, duplicate finder, importers, the
    training cache) comes through here, so a limit applies everywhere at once.

    Before a pixel is decoded: the file's size, its header's size, frame count and byte cost (see
    :mod:`fracture.imaging.budget`) against ``max_pixels`` and ``max_bytes``. ``allow_truncated``: a JPEG
    without its end marker is decoded as far as it goes (the audit reports it) instead of refused.
    """
    path = Path(path)
    if not data:
        raise ImageError(f"{path}: empty file (0 bytes)")
    if len(data) > max_bytes:
        raise ImageError(f"{path}: {len(data) / budget.MB:,.0f} MB of data is over the {max_bytes / budget.MB:,.0f} MB decode budget")
    if is_dicom(path, data):
        img = read_dicom(path, data, max_pixels, max_bytes)
        if min(img.shape) < MIN_SIDE:
            raise ImageError(f"{path}: {img.shape[1]}x{img.shape[0]} is too small to be a radiograph (at least {MIN_SIDE} px per side)")
        return Decoded(reduce(img, contract), img.shape, 8)
    truncated = is_truncated_jpeg(data)
    if truncated and not allow_truncated:
        raise ImageError(f"{path}: truncated JPEG (no end-of-image marker)")
    head = image_header(data, path)
    w, h = head.width, head.height
    if w * h > max_pixels:
        raise ImageError(f"{path}: header claims {w}x{h} = {w * h / 1e6:.0f} megapixels, over the {max_pixels / 1e6:.0f} MP limit")
    if w == 0 or h == 0:
        raise ImageError(f"{path}: header claims an empty {w}x{h} image")
    if head.frames > 1:
        raise ImageError(f"{path}: {head.frames} frames or pages in one file; save the one view to predict as a single image")
    jpeg = data[:2] == b"\xff\xd8"
    factor = jpeg_reduction(w, h, contract) if contract is not None and contract.reduced_decode and jpeg else 1
    what = f"{path}: a {w}x{h} {head.format} of {head.samples} x {8 * head.nbytes}-bit samples"
    budget.check(budget.image_cost(w, h, head.samples, head.nbytes, head.format, factor), max_bytes, what)
    orientation = exif_orientation(data)
    if factor > 1:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), _REDUCED[factor] | cv2.IMREAD_IGNORE_ORIENTATION)
        if img is not None and img.size:
            return Decoded(apply_orientation(img, orientation), (w, h) if orientation >= 5 else (h, w), 8)
        budget.check(budget.image_cost(w, h, head.samples, head.nbytes, head.format), max_bytes, what)  # the full decode below
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None and truncated and path.is_file():
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)  # libjpeg via imread still returns the decodable part
    if img is None or img.size == 0:
        raise ImageError(f"{path}: not a decodable image")
    if img.shape[:2] != (h, w):
        raise ImageError(f"{path}: decodes to {img.shape[1]}x{img.shape[0]}, not the {w}x{h} its header declares")
    depth = img.dtype.itemsize * 8
    if img.ndim == 3:
        if img.shape[2] == 1:
            img = img[:, :, 0]
        else:
            code = cv2.COLOR_BGRA2GRAY if img.shape[2] == 4 else cv2.COLOR_BGR2GRAY
            if img.dtype not in (np.uint8, np.uint16, np.float32):
                img = to_uint8(img)
            img = cv2.cvtColor(img, code)
    if img.ndim != 2:
        raise ImageError(f"{path}: unsupported image layout {img.shape}")
    img = apply_orientation(to_uint8(img), orientation)
    if min(img.shape) < MIN_SIDE:
        raise ImageError(f"{path}: {img.shape[1]}x{img.shape[0]} is too small to be a radiograph (at least {MIN_SIDE} px per side)")
    return Decoded(reduce(img, contract), img.shape, depth)


def reduce(img: np.ndarray, contract: Contract | None) -> np.ndarray:
    """A decoded picture scaled down exactly as libjpeg's reduced decoding scales a JPEG of it, when the contract
    asks for reduced decoding; else unchanged. It is that: the picture as an in-memory quality-100 JPEG, decoded
    at 1/2, 1/4 or 1/8 by the same decoder. A mathematical stand-in (box averages, a 4-point inverse DCT) missed
    libjpeg's fixed-point scaled IDCT by up to 0.03 in probability on FracAtlas; this way the same pixels as PNG,
    TIFF or DICOM reach the model exactly as their quality-100 JPEG does."""
    factor = jpeg_reduction(img.shape[1], img.shape[0], contract) if contract is not None and contract.reduced_decode else 1
    if factor == 1:
        return img
    data = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 100])[1]
    return cv2.imdecode(data, _REDUCED[factor])


def load_with_size(path: str | os.PathLike, contract: Contract, max_pixels: int = DEFAULT_MAX_PIXELS,
                   max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[np.ndarray, tuple[int, int]]:
    """File → (model input, original (height, width)): what boxes and heatmaps map back onto."""
    img, shape = _read(path, max_pixels, contract, max_bytes)
    return resize(img, contract), (int(shape[0]), int(shape[1]))


def load_bytes(data: bytes, name: str, contract: Contract, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[np.ndarray, tuple[int, int], np.ndarray]:
    """Bytes of one upload → (model input, original (height, width), decoded image): the file path without a file."""
    img, shape = decode(data, name, max_pixels, contract, max_bytes)
    return resize(img, contract), (int(shape[0]), int(shape[1])), img


def load(path: str | os.PathLike, contract: Contract, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """File → model input (``uint8``, ``image_size`` square). The single entry point."""
    return load_with_size(path, contract, max_pixels, max_bytes)[0]


def as_batch(inputs: list[np.ndarray]) -> np.ndarray:
    """Model inputs → the network's ``N x 1 x H x W`` float32 batch of raw pixel values."""
    return np.stack(inputs)[:, None].astype(np.float32)


def load_batch(paths: list[str], contract: Contract) -> np.ndarray:
    """Files → ``N x 1 x H x W`` float32 batch (raises ImageError on the first bad file)."""
    return load_batch_with_sizes(paths, contract)[0]


def load_batch_with_sizes(paths: list[str], contract: Contract) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Files → (the batch, each original (height, width)), one decode per file: what maps and boxes map back onto."""
    loaded = [load_with_size(p, contract) for p in paths]
    return as_batch([x for x, _ in loaded]), [size for _, size in loaded]
