"""The byte budget: how much memory decoding a file will hold, worked out from its headers before a pixel is decoded.

Pixels alone are the wrong measure: 50 megapixels are 50 MB as 8-bit grey and 400 MB as 16-bit RGBA, and a
JPEG 2000 decoder holds 32 bits per sample on top. :func:`image_cost` and :func:`dicom_cost` add up what a
decode holds at its peak (the decoder's output and working buffers, the copies the conversion to one ``uint8``
picture makes); the gate refuses a file whose cost is over the budget. For compressed DICOM the codestream's
own header (JPEG SOF, JPEG-LS SOF55, JPEG 2000 SIZ) is read here and must agree with Rows/Columns, because
decoders size their buffers from it, not from the DICOM header.
"""

from __future__ import annotations

import math
import struct

from fracture.imaging.pixels import ImageError

DEFAULT_MAX_DECODE_MB = 360.0  # a 4,300 x 4,300 16-bit DX in JPEG 2000 needs about 325 MB; a 50 MP 16-bit RGBA PNG about 950 MB
MB = 1 << 20
FIXED = 8 * MB  # a decoder's own state (tables, line buffers) whatever the image size

# Pillow's mode -> (samples OpenCV returns with IMREAD_UNCHANGED, bytes per sample); palette and grey+alpha come back as BGR(A)
_MODES = {"1": (1, 1), "L": (1, 1), "P": (4, 1), "PA": (4, 1), "LA": (4, 1), "La": (4, 1), "RGB": (3, 1), "RGBA": (4, 1), "RGBa": (4, 1),
          "RGBX": (4, 1), "CMYK": (4, 1), "YCbCr": (3, 1), "LAB": (3, 1), "HSV": (3, 1), "I": (1, 4), "F": (1, 4)}
# formats whose decoder writes rows straight into the output; the others hold a whole-image buffer of their own
_STREAMING = {"PNG", "JPEG", "PPM"}


def layout(data: bytes, fmt: str, mode: str, tags: dict | None = None) -> tuple[int, int]:
    """(samples, bytes per sample) of the array OpenCV decodes the file to, from its header.

    PNG's bit depth and TIFF's BitsPerSample are read from the header itself: Pillow reports a 16-bit RGB PNG
    as mode ``RGB``.
    """
    if fmt == "PNG" and data[12:16] == b"IHDR":
        depth, colour = data[24], data[25]
        return {0: 1, 2: 3, 3: 4, 4: 4, 6: 4}.get(colour, 4), 2 if depth == 16 else 1
    if fmt == "TIFF" and tags:
        bits = tags.get(258, (8,))
        bits = max(bits) if isinstance(bits, tuple | list) and bits else int(bits or 8)
        samples = int(tags.get(277, 1) or 1)
        return max(1, samples), max(1, math.ceil(int(bits) / 8))
    if mode.startswith("I;16"):
        return 1, 2
    return _MODES.get(mode, (4, 4))


def image_cost(width: int, height: int, samples: int, nbytes: int, fmt: str, reduction: int = 1) -> int:
    """Peak bytes to decode an image file to one ``uint8`` grey picture (``reduction``: libjpeg's 1/2, 1/4, 1/8)."""
    pixels = math.ceil(width / reduction) * math.ceil(height / reduction)
    decoded = pixels * samples * nbytes
    streaming = fmt in _STREAMING and nbytes == 1  # 16-bit PNG rows are swapped in a buffer of their own (measured: 766 MB at 50 MP RGBA)
    working = 0 if streaming else (pixels * samples * 8 if fmt == "JPEG2000" else decoded)  # OpenJPEG: two 32-bit planes
    grey = pixels * nbytes if samples > 1 else 0
    return FIXED + decoded + working + grey + 3 * pixels  # + the uint8 picture, one turned (EXIF) copy, a reduced decode's JPEG


# DICOM transfer syntaxes by codec; the rest of the encapsulated ones (video, Deflated) are not read
NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}
JPEG = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70"}
JPEG_LS = {"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"}
JPEG_2000 = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",
             "1.2.840.10008.1.2.4.203"}
RLE = {"1.2.840.10008.1.2.5"}
READABLE = NATIVE | JPEG | JPEG_LS | JPEG_2000 | RLE


def dicom_cost(rows: int, cols: int, samples: int, bits_allocated: int, syntax: str, pixel_bytes: int) -> int:
    """Peak bytes to decode one DICOM frame to one ``uint8`` grey picture: the pixel data's copy in the dataset,
    the decoder's output and working buffers, colour conversion, and the table lookup, mask and picture."""
    pixels = rows * cols
    nbytes = max(1, math.ceil(bits_allocated / 8))
    decoded = pixels * samples * nbytes
    if syntax in NATIVE:
        working = 0
    elif syntax in JPEG_2000:
        working = pixels * samples * 8 + decoded  # OpenJPEG's 32-bit planes (measured: two), then the copy handed back
    else:
        working = decoded  # the decoder's buffer beside the array made from it
    colour = pixels * samples * 8 if samples > 1 else 0  # YBR -> RGB and to grey
    return FIXED + pixel_bytes + decoded + working + colour + pixels * (3 + nbytes)  # + a reduced decode's JPEG


def check(cost: int, max_bytes: int, what: str) -> None:
    """Refuse ``what`` when decoding it would hold more than ``max_bytes``."""
    if cost > max_bytes:
        raise ImageError(f"{what} needs about {cost / MB:,.0f} MB to decode, over the {max_bytes / MB:,.0f} MB decode budget")


def codestream_header(frame: bytes, syntax: str) -> tuple[int, int, int, int]:
    """(width, height, components, bits) that a compressed frame's own header declares.

    JPEG (baseline, extended, lossless) and JPEG-LS: the SOF marker segment; JPEG 2000 (and HTJ2K): the SIZ
    marker segment of the codestream, inside a JP2 wrapper or bare; RLE: no size of its own (the decoder uses
    Rows/Columns), only its segment count, returned as components. Raises ImageError when none can be read.
    """
    if syntax in JPEG or syntax in JPEG_LS:
        i = 2 if frame[:2] == b"\xff\xd8" else None
        while i is not None and i + 4 <= len(frame):
            if frame[i] != 0xFF:
                break
            marker = frame[i + 1]
            if marker == 0xFF:
                i += 1
                continue
            length = struct.unpack(">H", frame[i + 2 : i + 4])[0]
            if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7) and i + 10 <= len(frame):
                bits, height, width, comps = struct.unpack(">BHHB", frame[i + 4 : i + 10])
                return width, height, comps, bits
            if marker == 0xDA or length < 2:
                break
            i += 2 + length
        raise ImageError("compressed pixel data whose JPEG header (SOF) cannot be read")
    if syntax in JPEG_2000:
        at = frame.find(b"\xff\x4f\xff\x51", 0, 1 << 16)
        if at >= 0 and at + 42 <= len(frame):
            xsiz, ysiz, xo, yo = struct.unpack(">IIII", frame[at + 8 : at + 24])
            comps = struct.unpack(">H", frame[at + 40 : at + 42])[0]
            depths = frame[at + 42 : at + 42 + 3 * comps : 3]
            return xsiz - xo, ysiz - yo, comps, (max(depths) & 0x7F) + 1 if depths else 0
        raise ImageError("compressed pixel data whose JPEG 2000 header (SIZ) cannot be read")
    if syntax in RLE:
        if len(frame) < 64:
            raise ImageError("RLE pixel data without its 64-byte header")
        return 0, 0, struct.unpack("<I", frame[:4])[0], 0
    raise ImageError("pixel data in a transfer syntax this reader does not decode")
