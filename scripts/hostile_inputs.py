"""Hostile inputs for the image gate and the service: small files that claim huge images.

    python scripts/hostile_inputs.py OUT_DIR      # writes them, one line each: name, bytes, what the gate must say

Each is under 600 KB and, decoded as declared, would take hundreds of MB to GB: a WebP, a JPEG 2000, a PNG
(by its size, by a 64 MB text chunk, by 1000 animation frames), a multi-page TIFF, a PNM, a Radiance HDR no
size reader knows, and a DICOM whose Deflated data inflate to 512 MB. Used by tests/test_image_gate.py and
``scripts/benchmark_serve.py --hostile``.
"""

from __future__ import annotations

import struct
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np

SIDE = 16000  # a 256-megapixel claim: about 256 MB as 8-bit gray, 768 MB as BGR, if it were decoded


def _patch_webp(data: bytes, side: int) -> bytes:
    """A lossless WebP whose VP8L header declares ``side`` x ``side``."""
    at = data.index(b"VP8L") + 8
    assert data[at] == 0x2F
    bits = (side - 1) | ((side - 1) << 14) | (struct.unpack("<I", data[at + 1 : at + 5])[0] & ~((1 << 28) - 1))
    return data[: at + 1] + struct.pack("<I", bits) + data[at + 5 :]


def _patch_jp2(data: bytes, side: int) -> bytes:
    """A JPEG 2000 file whose ihdr box and SIZ marker declare ``side`` x ``side``."""
    out = bytearray(data)
    at = data.index(b"ihdr") + 4
    out[at : at + 8] = struct.pack(">II", side, side)
    siz = data.index(b"\xff\x51") + 6  # marker, Lsiz, Rsiz, then Xsiz, Ysiz
    out[siz : siz + 8] = struct.pack(">II", side, side)
    return bytes(out)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    import zlib

    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def write_bombs(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, the reason it must be refused with)."""
    small = np.full((64, 64), 90, np.uint8)
    made = {}
    webp = cv2.imencode(".webp", small, [cv2.IMWRITE_WEBP_QUALITY, 101])[1].tobytes()
    made["webp"] = (_patch_webp(webp, SIDE), "megapixels")
    made["jp2"] = (_patch_jp2(cv2.imencode(".jp2", small)[1].tobytes(), SIDE), "megapixels")
    png = cv2.imencode(".png", small)[1].tobytes()
    ihdr = struct.pack(">II", SIDE, SIDE) + png[24:29]  # width, height, then depth, colour, compression, filter, interlace
    made["png-size"] = (png[:8] + _png_chunk(b"IHDR", ihdr) + png[33:], "megapixels")
    # a 64 MB zTXt text chunk that deflates to about 64 KB, before the pixels
    text = _png_chunk(b"zTXt", b"comment\x00\x00" + zlib.compress(b"\x00" * (64 << 20), 9))
    made["png-text"] = (png[:33] + text + png[33:], "header")
    # an animated PNG: acTL declares 1000 frames
    made["apng"] = (png[:33] + _png_chunk(b"acTL", struct.pack(">II", 1000, 0)) + png[33:], "frames")
    tiff = cv2.imencode(".tiff", small)[1].tobytes()
    ok, pages = cv2.imencodemulti(".tiff", [small, small, small])
    made["tiff-pages"] = (pages.tobytes() if ok else tiff, "frames")
    made["pnm"] = (b"P5\n16000 16000\n255\n" + bytes(1000), "megapixels")
    # Radiance HDR: OpenCV decodes it, no size reader here knows it: refused unread
    made["dicom-deflate"] = (deflated_dicom_bomb(), "Deflated")
    made["unknown"] = (b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 16000 +X 16000\n" + bytes(1000), "not a recognised format")
    tmp.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, (data, reason) in made.items():
        path = tmp / f"{name}.{'dcm' if name == 'dicom-deflate' else 'img'}"
        path.write_bytes(data)
        paths[name] = (path, reason)
    return paths




def deflated_dicom_bomb(side: int = SIDE) -> bytes:
    """A DICOM file whose Deflated dataset declares side x side 16-bit pixels of zeros: about 500 KB on disk, 512 MB inflated."""
    def element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
        if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
            return struct.pack("<HH", group, elem) + vr + b"\0\0" + struct.pack("<I", len(value)) + value
        return struct.pack("<HH", group, elem) + vr + struct.pack("<H", len(value)) + value

    def uid(text: str) -> bytes:
        raw = text.encode()
        return raw + b"\0" * (len(raw) % 2)

    meta_body = (element(0x0002, 0x0001, b"OB", b"\0\1") + element(0x0002, 0x0002, b"UI", uid("1.2.840.10008.5.1.4.1.1.1.1"))
                 + element(0x0002, 0x0003, b"UI", uid("1.2.3.4.5")) + element(0x0002, 0x0010, b"UI", uid("1.2.840.10008.1.2.1.99")))
    meta = element(0x0002, 0x0000, b"UL", struct.pack("<I", len(meta_body))) + meta_body
    head = (element(0x0028, 0x0002, b"US", struct.pack("<H", 1)) + element(0x0028, 0x0004, b"CS", b"MONOCHROME2 ")
            + element(0x0028, 0x0010, b"US", struct.pack("<H", side % 65536)) + element(0x0028, 0x0011, b"US", struct.pack("<H", side % 65536))
            + element(0x0028, 0x0100, b"US", struct.pack("<H", 16)) + element(0x0028, 0x0101, b"US", struct.pack("<H", 16))
            + element(0x0028, 0x0102, b"US", struct.pack("<H", 15)) + element(0x0028, 0x0103, b"US", struct.pack("<H", 0)))
    n = side * side * 2
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = [deflate.compress(head + struct.pack("<HH", 0x7FE0, 0x0010) + b"OW\0\0" + struct.pack("<I", n))]
    zeros = bytes(1 << 24)
    for _ in range(n >> 24):
        body.append(deflate.compress(zeros))
    body.append(deflate.flush())
    return b"\0" * 128 + b"DICM" + meta + b"".join(body)


def main(args: list[str]) -> int:
    if not args:
        print(__doc__)
        return 2
    for name, (path, reason) in write_bombs(Path(args[0])).items():
        print(f"{name}\t{path.stat().st_size}\t{reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
