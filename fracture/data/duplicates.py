"""Which images are the same radiograph: exact copies (sha256 of the bytes) and near copies (Pearson r of
32x32 grayscale thumbnails >= ``NEAR_DEFAULT``, which survives re-encoding, resizing and small exposure
changes, under any of the 8 quarter turns and mirrorings, so a rotated or mirrored re-save is found too),
with each file's health read on the way. Pixels come through the image gate as training reads them (EXIF
orientation applied). Shared by ``fracture.data.audit`` (reports), ``fracture.data.datasets``
(imports keep a group on one side) and ``fracture.data.annotations`` (training refuses a group across splits).
Torch-free.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np

from fracture.imaging import preprocess
from fracture.progress import progress

THUMB = 32
NEAR_DEFAULT = 0.97
COPY_SIDE = 128
COPY_EDGE_R = 0.85  # FracAtlas: copies (re-encoded, re-marked, slightly cropped) 0.875-1.0; other exposures 0.44-0.81
TURNED_EDGE_R = 0.95  # a match only once turned or mirrored: re-saved copies score 0.9999; a generated look-alike 0.852


@dataclass
class FileFacts:
    """What one read of a file tells: identity, health and geometry."""

    path: str
    size_bytes: int
    sha256: str
    problem: str = ""  # empty when the file is healthy
    height: int = 0
    width: int = 0
    bit_depth: int = 0
    decoder_messages: str = ""  # what the decoder printed (libjpeg warnings), recorded instead of shown


def inspect(path: str) -> tuple[FileFacts, np.ndarray | None]:
    """Hash, health check and a normalised thumbnail (None when undecodable)."""
    try:
        data = preprocess.read_bytes(path)  # a file over the decode budget is not even read
    except preprocess.ImageError as exc:
        return FileFacts(path, 0, "", str(exc).split(": ", 1)[-1]), None
    facts = FileFacts(path, len(data), hashlib.sha256(data).hexdigest())
    if not data:
        facts.problem = "zero-size file"
        return facts, None
    truncated = preprocess.is_truncated_jpeg(data)
    # through the gate, as training reads it (EXIF applied, byte budget); libjpeg's "Premature end of JPEG file"
    # for truncated files is kept as the file's reason, off the terminal
    with preprocess.capture_stderr() if truncated else contextlib.nullcontext(list) as said:
        try:
            decoded = preprocess.gate(data, path, allow_truncated=True)
        except preprocess.ImageError as exc:
            decoded, facts.problem = None, str(exc).split(": ", 1)[-1]
    facts.decoder_messages = "; ".join(dict.fromkeys(line.strip() for line in said() if line.strip() and "\r" not in line))
    if decoded is None:
        if truncated:
            facts.problem = "truncated JPEG (no end-of-image marker), does not decode"
        if facts.decoder_messages:
            facts.problem += f" (decoder: {facts.decoder_messages})"
        return facts, None
    img, facts.bit_depth = decoded.image, decoded.bit_depth
    facts.height, facts.width = img.shape[:2]
    if truncated:
        band = _uniform_bottom_rows(img)
        partly = f"; decodes only partly (uniform band over the bottom {band} rows)" if band >= 2 else ""
        said = f" (decoder: {facts.decoder_messages})" if facts.decoder_messages else ""
        facts.problem = "truncated JPEG (no end-of-image marker)" + partly + said
    thumb = cv2.resize(img.astype(np.float32), (THUMB, THUMB), interpolation=cv2.INTER_AREA).ravel()
    thumb -= thumb.mean()
    norm = float(np.linalg.norm(thumb))
    return facts, (thumb / norm if norm > 0 else thumb)


def _uniform_bottom_rows(img: np.ndarray) -> int:
    """How many bottom rows are one single value (what a decoder fills in after premature end)."""
    value = img[-1, 0]
    rows = 0
    for row in img[::-1]:
        if not (row == value).all():
            break
        rows += 1
    return rows if rows < img.shape[0] else 0


def dihedral(square: np.ndarray) -> np.ndarray:
    """The 8 quarter turns and mirrorings of square arrays ``(..., s, s)``, stacked on a new axis before the last two."""
    turns = [np.rot90(square, k, axes=(-2, -1)) for k in range(4)]
    return np.stack(turns + [t.swapaxes(-2, -1) for t in turns], axis=-3)


def duplicate_groups(hashes: list[str], thumbs: np.ndarray, near: float = NEAR_DEFAULT, block: int = 256) -> tuple[np.ndarray, list[tuple[int, int, str, float]]]:
    """Union-find over exact (same sha256) and near (thumbnail r >= near) pairs.

    A near pair's r is the best over the 8 quarter turns and mirrorings of one thumbnail. Returns a group id per
    image (the smallest member index) and the pairs found.
    """
    n = len(hashes)
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return int(i)

    def union(i: int, j: int) -> None:
        a, b = find(i), find(j)
        if a != b:
            parent[max(a, b)] = min(a, b)

    pairs: list[tuple[int, int, str, float]] = []
    first: dict[str, int] = {}
    for i, h in enumerate(hashes):
        if h and h in first:
            pairs.append((first[h], i, "exact", 1.0))
            union(first[h], i)
        elif h:
            first[h] = i
    valid = np.linalg.norm(thumbs, axis=1) > 0
    turned = dihedral(thumbs.reshape(n, THUMB, THUMB)).reshape(n * 8, THUMB * THUMB)
    for start in range(0, n, block):
        sims = (thumbs[start : start + block] @ turned.T).reshape(-1, n, 8).max(axis=2)
        for a, b in zip(*np.nonzero(sims >= near)):
            i, j = start + int(a), int(b)
            if i < j and valid[i] and valid[j] and hashes[i] != hashes[j]:
                pairs.append((i, j, "near", float(sims[a, b])))
                union(i, j)
    return np.array([find(i) for i in range(n)]), pairs


def inspect_all(paths: list[str], desc: str = "audit") -> tuple[list[FileFacts], np.ndarray]:
    thumbs = np.zeros((len(paths), THUMB * THUMB), np.float32)
    facts: list[FileFacts] = []
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for i, (f, t) in enumerate(progress(pool.map(inspect, paths), total=len(paths), desc=desc)):
            facts.append(f)
            if t is not None:
                thumbs[i] = t
    return facts, thumbs


def edge_signature(img: np.ndarray, side: int = COPY_SIDE) -> np.ndarray:
    """Unit-norm, zero-mean gradient magnitude of a ``side`` px square thumbnail: the anatomy's outlines, which a
    copy keeps through re-encoding, resizing and re-windowing while a second exposure of the same limb moves them."""
    small = cv2.resize(img.astype(np.float32), (side, side), interpolation=cv2.INTER_AREA)
    edges = np.hypot(cv2.Sobel(small, cv2.CV_32F, 1, 0), cv2.Sobel(small, cv2.CV_32F, 0, 1)).ravel()
    edges -= edges.mean()
    norm = float(np.linalg.norm(edges))
    return edges / norm if norm > 0 else edges


def same_radiograph(a: str, b: str, min_r: float = COPY_EDGE_R) -> bool:
    """Whether a near pair (thumbnails alike) is one radiograph's copies: their edge signatures correlate at
    ``min_r`` or more as they are, or ``TURNED_EDGE_R`` once turned or mirrored (a turned re-save of a copy
    scores 0.9999; two generated radiographs, one the other's transposed look-alike, 0.852). On FracAtlas's 102
    near pairs (r >= 0.97 at 32 px) this splits them into 61 copies and 41 look-alike exposures; re-encoded
    copies (0.7x, q60, +8 % contrast) score >= 0.994."""
    try:
        sa, sb = edge_signature(preprocess.read_image(a)), edge_signature(preprocess.read_image(b))
        scores = dihedral(sb.reshape(COPY_SIDE, COPY_SIDE)).reshape(8, -1) @ sa
        return float(scores[0]) >= min_r or float(scores[1:].max()) >= max(min_r, TURNED_EDGE_R)
    except preprocess.ImageError:
        return True  # cannot tell: keep the refusal
