"""Pixel values to ``uint8`` without full-size float copies, and the error every reader of image bytes raises.

The lowest module of ``imaging``: the gate (``preprocess``), DICOM (``dicom``) and the byte budget (``budget``)
all import it, and it imports none of them. A 16-bit image becomes 8-bit through a 65,536-entry lookup table
and other types row block by row block, so converting an image never holds more than one ``uint8`` copy of it
beside the input and a few MB (a float64 copy of a 50-megapixel image is 400 MB).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

BLOCK_PIXELS = 1 << 18  # float work is done on blocks of a quarter of a million pixels (2 MB per float64 copy)


class ImageError(ValueError):
    """A file that cannot become a model input; the message says which file and why."""


def by_blocks(img: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``fn`` (element-wise, returning uint8) applied to blocks of rows: the same result, bounded float copies."""
    out = np.empty(img.shape, np.uint8)
    for start, stop in _blocks(img):
        out[start:stop] = fn(img[start:stop])
    return out


def _blocks(img: np.ndarray) -> list[tuple[int, int]]:
    rows = max(1, BLOCK_PIXELS // max(1, int(np.prod(img.shape[1:]))))
    return [(start, min(start + rows, img.shape[0])) for start in range(0, img.shape[0], rows)]


def through_table(img: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``fn`` (element-wise, returning uint8) applied to an integer image through a table of its type's values.

    Exact for any element-wise ``fn``. 8- and 16-bit images index the table directly (unsigned) or through a
    same-size unsigned view (signed): no wider copy of the image; wider types use a table of the image's own
    value range, or blocks of rows when that range is over 2^20 values (32-bit data).
    """
    if img.dtype in (np.uint8, np.uint16):
        return fn(np.arange(np.iinfo(img.dtype).max + 1).astype(img.dtype))[img]
    if img.dtype in (np.int8, np.int16):
        info, unsigned = np.iinfo(img.dtype), np.uint8 if img.dtype == np.int8 else np.uint16
        table = fn(np.arange(info.min, info.max + 1).astype(img.dtype))
        return table[img.view(unsigned) ^ unsigned(-info.min)]
    lo, hi = int(img.min()), int(img.max())
    if hi - lo > 1 << 20:
        return by_blocks(img, fn)
    return fn(np.arange(lo, hi + 1, dtype=np.int64).astype(img.dtype))[img.astype(np.int64) - lo]


def _by_type_range(info: np.iinfo) -> Callable[[np.ndarray], np.ndarray]:
    scale = 255.0 / (info.max - info.min)
    return lambda a: np.clip(np.rint((a.astype(np.float64) - info.min) * scale), 0, 255).astype(np.uint8)


def to_uint8(img: np.ndarray) -> np.ndarray:
    """Map any image to uint8 by its type's range (never by its brightest pixel: one marker must not dim the rest).

    Floats in 0..1 are scaled by 255; other floats, which carry no range, by their own min..max.
    """
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.bool_:
        return img.astype(np.uint8) * np.uint8(255)
    if np.issubdtype(img.dtype, np.integer):
        return through_table(img, _by_type_range(np.iinfo(img.dtype)))
    ends = [(float(b.min()), float(b.max())) for b in (np.nan_to_num(img[a:z].astype(np.float64)) for a, z in _blocks(img))]
    lo, hi = min(e[0] for e in ends), max(e[1] for e in ends)
    if lo >= 0.0 and hi <= 1.0:
        return by_blocks(img, lambda a: np.rint(np.nan_to_num(a.astype(np.float64)) * 255.0).astype(np.uint8))
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return by_blocks(img, lambda a: np.rint((np.nan_to_num(a.astype(np.float64)) - lo) * scale).astype(np.uint8))

