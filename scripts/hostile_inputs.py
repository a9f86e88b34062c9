"""Hostile inputs for the image gate and the service: small files that claim huge images.

    python scripts/hostile_inputs.py OUT_DIR      # writes them, one line each: name, bytes, what the gate must say
    python scripts/hostile_inputs.py OUT_DIR --bytes   # the byte bombs and the real-radiograph sizes instead
    python scripts/hostile_inputs.py OUT_DIR --measure MODEL.onnx   # all of them through python -m fracture.predict:
                                                  # each answer and the command's peak memory beside a normal radiograph

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

from fracture.data.synth import dicom_bytes

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
    return _write(tmp, made, lambda name: "dcm" if name == "dicom-deflate" else "img")


def _write(tmp: Path, made: dict[str, tuple[bytes, str]], suffix) -> dict[str, tuple[Path, str]]:
    """name -> (data, reason) written as files: name -> (file, reason)."""
    tmp.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, (data, reason) in made.items():
        path = tmp / f"{name}.{suffix(name)}"
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


LIMIT_SIDE = 7071  # 50 megapixels: the service's pixel limit


def _png_zeros(width: int, height: int, depth: int, colour: int) -> bytes:
    """A real PNG of zeros (every row filtered 'none'), compressed as it is made."""
    samples = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
    row = bytes(1 + width * samples * depth // 8)
    deflate = zlib.compressobj(9)
    body = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")


def _rle_zeros(nbytes: int, segments: int) -> bytes:
    """A DICOM RLE frame of zeros: the 64-byte header, then each segment as runs of 128 zero bytes."""
    runs, rest = divmod(nbytes, 128)
    segment = b"\x81\x00" * runs + (bytes([257 - rest, 0]) if rest > 1 else b"\x00\x00" if rest else b"")
    segment += b"\x00" * (len(segment) % 2)
    offsets = [64 + i * len(segment) for i in range(segments)]
    return struct.pack("<16I", segments, *offsets, *([0] * (15 - segments))) + segment * segments


def _patch_sof(jpeg: bytes, side: int) -> bytes:
    at = jpeg.index(b"\xff\xc0") + 5  # marker, length, precision, then height, width
    return jpeg[:at] + struct.pack(">HH", side, side) + jpeg[at + 4 :]


def write_byte_bombs(tmp: Path) -> dict[str, tuple[Path, str]]:
    """Files that are small, within the pixel limit or lying about their size, that would hold GBs if decoded.

    name -> (file, the reason it must be refused with). Needs pydicom for the DICOM ones.
    """
    side = LIMIT_SIDE
    small = np.full((64, 64), 90, np.uint8)
    made = {"png-16bit-rgba": (_png_zeros(side, side, 16, 6), "decode budget")}
    tiff = cv2.imencode(".tiff", np.zeros((side, side), np.float32), [cv2.IMWRITE_TIFF_COMPRESSION, 8])[1].tobytes()
    made["tiff-float32"] = (tiff, "decode budget")
    windowed = {"WindowCenter": 2048, "WindowWidth": 4096}
    made["dicom-16bit-windowed-rle"] = (dicom_bytes(side, side, _rle_zeros(side * side, 2), "1.2.840.10008.1.2.5", encapsulated=True,
                                                    **windowed), "decode budget")
    made["dicom-rle-rgb-16bit"] = (dicom_bytes(side, side, _rle_zeros(side * side, 6), "1.2.840.10008.1.2.5", samples=3,
                                               photometric="RGB", encapsulated=True), "decode budget")
    jp2 = _patch_jp2(cv2.imencode(".jp2", small)[1].tobytes(), SIDE)
    made["dicom-j2k-inner-16000"] = (dicom_bytes(64, 64, jp2, "1.2.840.10008.1.2.4.90", bits=8, encapsulated=True), "declares 16000x16000")
    jpeg = _patch_sof(cv2.imencode(".jpg", small)[1].tobytes(), SIDE)
    made["dicom-jpeg-inner-16000"] = (dicom_bytes(64, 64, jpeg, "1.2.840.10008.1.2.4.50", bits=8, encapsulated=True), "declares 16000x16000")
    return _write(tmp, made, lambda name: "dcm" if name.startswith("dicom") else name.split("-")[0])


def write_radiograph_sizes(tmp: Path) -> dict[str, Path]:
    """The largest real radiographs the default budget must admit: a 4,300 x 4,300 16-bit DX with a window,
    a 3,000 x 2,500 12-bit CR (MONOCHROME1), FracAtlas's largest originals (2,304 x 2,880 colour JPEG)."""
    rng = np.random.default_rng(0)
    tmp.mkdir(parents=True, exist_ok=True)
    dx = (rng.integers(0, 4096, (4300, 4300), dtype=np.uint16) << 4).astype(np.uint16)
    out = {"dx-4300-16bit": tmp / "dx-4300-16bit.dcm", "cr-3000x2500-12bit": tmp / "cr-3000x2500.dcm", "jpeg-2304x2880-rgb": tmp / "fa-original.jpg"}
    out["dx-4300-16bit"].write_bytes(dicom_bytes(4300, 4300, dx.tobytes(), "1.2.840.10008.1.2.1", WindowCenter=32768, WindowWidth=65536))
    cr = rng.integers(0, 4096, (2500, 3000), dtype=np.uint16)
    out["cr-3000x2500-12bit"].write_bytes(dicom_bytes(2500, 3000, cr.tobytes(), "1.2.840.10008.1.2.1", photometric="MONOCHROME1",
                                                      BitsStored=12, HighBit=11))
    rgb = cv2.resize(rng.integers(0, 255, (288, 230, 3), dtype=np.uint8), (2304, 2880), interpolation=cv2.INTER_LINEAR)
    cv2.imwrite(str(out["jpeg-2304x2880-rgb"]), rgb, [cv2.IMWRITE_JPEG_QUALITY, 92])
    return out


PEAK = """
import resource, subprocess, sys
subprocess.run([sys.executable, "-m", "fracture.predict", *sys.argv[1:]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
"""


def measure(model: str, out: Path) -> None:
    """Every hostile file and real-radiograph size through ``python -m fracture.predict`` in a child: its answer
    and the command's peak resident memory, beside the same command on a normal 454 x 373 radiograph."""
    import csv
    import subprocess

    from fracture.data.synth import write_jpegs

    files = {name: path for name, (path, _) in {**write_bombs(out / "bombs"), **write_byte_bombs(out / "bytes")}.items()}
    files.update(write_radiograph_sizes(out / "sizes"))
    normal = write_jpegs(out / "normal", 1, shape=(454, 373))[0]

    def run(path: str) -> tuple[float, str]:
        rows = out / "preds.csv"
        rows.unlink(missing_ok=True)
        peak = subprocess.run([sys.executable, "-c", PEAK, model, path, "--out", str(rows), "--quiet", "--threads", "2"],
                              capture_output=True, text=True, check=True).stdout
        row = next(csv.DictReader(rows.open()))
        return float(peak), row["error"].split(": ", 1)[-1] if row["error"] else f"p = {float(row['probability']):.3f}"

    base, _ = run(normal)
    print(f"model {Path(model).name}; python -m fracture.predict on a normal radiograph: peak {base:.0f} MB\n")
    print("| file | bytes | answer | peak MB | above normal |\n|---|---|---|---|---|")
    for name, path in files.items():
        peak, said = run(str(path))
        print(f"| {name} | {path.stat().st_size:,} | {said[:110]} | {peak:.0f} | {peak - base:+.0f} |")


def main(args: list[str]) -> int:
    if not args:
        print(__doc__)
        return 2
    if "--measure" in args:
        measure(args[args.index("--measure") + 1], Path(args[0]))
        return 0
    if "--bytes" in args:
        for name, (path, reason) in write_byte_bombs(Path(args[0])).items():
            print(f"{name}\t{path.stat().st_size}\t{reason}")
        for name, path in write_radiograph_sizes(Path(args[0])).items():
            print(f"{name}\t{path.stat().st_size}\tadmitted")
        return 0
    for name, (path, reason) in write_bombs(Path(args[0])).items():
        print(f"{name}\t{path.stat().st_size}\t{reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
