"""Fracture boxes: their text form, their geometry, and how a map becomes boxes (torch-free).

Boxes travel in ``annotations.csv`` as a ``boxes`` column of corner coordinates
normalised to the image's width and height, ``x0 y0 x1 y1`` per box, boxes
separated by ``;`` (empty = none). Normalised corners survive resizing of the
source (the FracAtlas copy's downscaled scans) and need no image size to write.
How boxes are scored: :mod:`fracture.scoring.froc`; how a decoding is chosen: :mod:`fracture.scoring.selection`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from fracture.imaging.contract import Contract, geometry

Box = tuple[float, float, float, float]
DECODING_KEYS = ("box_method", "box_threshold", "min_area_fraction", "max_boxes", "box_size", "display_threshold")  # how a map becomes boxes, as stored
MAX_BOXES = 16  # per image in a training batch (padded); more are dropped with the rest of the smallest
# A box's number is the fracture map's peak inside it, not a probability that the image is fractured (a peak of
# 0.99 sits beside image probabilities of 0.6): every place a person reads it names it so, in these words.
BOX_KEYS = ("x0", "y0", "x1", "y1", "map_peak")  # a box as JSON (predictor, service) and, prefixed ``box_``, as CSV columns


def peak_label(peak: float) -> str:
    """A box's number as drawn beside it (overlays, secondary captures, presentation states)."""
    return f"map peak {peak:.2f}"


def parse_boxes(text: object) -> list[Box]:
    """``"x0 y0 x1 y1;…"`` (normalised) → boxes; raises ValueError on malformed text."""
    text = "" if text is None else str(text).strip()
    if text.lower() in ("", "nan", "none"):
        return []
    boxes = []
    for part in text.split(";"):
        if not part.strip():
            continue
        values = [float(v) for v in part.replace(",", " ").split()]
        if len(values) != 4:
            raise ValueError(f"a box needs 4 numbers (x0 y0 x1 y1), got {part.strip()!r}")
        x0, y0, x1, y1 = values
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise ValueError(f"box {part.strip()!r} is not normalised corners with 0 <= x0 < x1 <= 1, 0 <= y0 < y1 <= 1")
        boxes.append((x0, y0, x1, y1))
    return boxes


def format_boxes(boxes: Sequence[Box]) -> str:
    return ";".join(" ".join(f"{v:.6f}" for v in b) for b in boxes)


def yolo_to_boxes(lines: str) -> list[Box]:
    """YOLO ``class cx cy w h`` lines → normalised corner boxes, clipped to the image."""
    boxes = []
    for line in lines.splitlines():
        parts = line.split()
        if len(parts) >= 5:
            cx, cy, w, h = (float(v) for v in parts[1:5])
            box = (max(cx - w / 2, 0.0), max(cy - h / 2, 0.0), min(cx + w / 2, 1.0), min(cy + h / 2, 1.0))
            if box[2] > box[0] and box[3] > box[1]:
                boxes.append(box)
    return boxes


def to_pixels(boxes: Sequence[Box], height: int, width: int) -> list[Box]:
    """Normalised → pixel corners of the original image."""
    return [(x0 * width, y0 * height, x1 * width, y1 * height) for x0, y0, x1, y1 in boxes]


def to_input(boxes: Sequence[Box], height: int, width: int, contract: Contract) -> list[Box]:
    """Normalised boxes of an ``height x width`` image → pixel corners in the model input (stretch or letterbox)."""
    g = geometry(height, width, contract)
    return [(g.left + x0 * g.inner_width, g.top + y0 * g.inner_height, g.left + x1 * g.inner_width, g.top + y1 * g.inner_height) for x0, y0, x1, y1 in boxes]


def min_area_in_original(fraction: float, height: int, width: int, contract: Contract) -> float:
    """A minimum box area given as a fraction of the model input → pixels of an ``height x width`` original."""
    g = geometry(height, width, contract)
    scale = (g.inner_width / width) * (g.inner_height / height)
    return fraction * contract.image_size**2 / scale


def rasterize(boxes: Sequence[Box], height: int, width: int) -> np.ndarray:
    """Pixel boxes → uint8 mask (255 inside); a pixel is inside when its centre is."""
    mask = np.zeros((height, width), np.uint8)
    for x0, y0, x1, y1 in boxes:
        c0, r0 = int(np.clip(np.ceil(x0 - 0.5), 0, width)), int(np.clip(np.ceil(y0 - 0.5), 0, height))
        c1, r1 = int(np.clip(np.ceil(x1 - 0.5), 0, width)), int(np.clip(np.ceil(y1 - 0.5), 0, height))
        mask[r0 : max(r1, r0 + 1) if r0 < height else r0, c0 : max(c1, c0 + 1) if c0 < width else c0] = 255
    return mask


def region_peaks(labels: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """The largest of ``values`` in each labelled region 1..n-1 (index 0, the background, stays -inf): by one sort
    and ``maximum.reduceat`` over the region pixels only (``np.maximum.at`` over every pixel took 85 % of the
    validation's box-decoding search)."""
    peaks = np.full(n, -np.inf)
    inside = labels > 0
    lab, val = labels[inside], values[inside]
    if lab.size:
        order = np.argsort(lab, kind="stable")
        lab, val = lab[order], val[order]
        starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]])
        peaks[lab[starts]] = np.maximum.reduceat(val, starts)
    return peaks


def map_to_boxes(prob_map: np.ndarray, threshold: float, min_area: float = 0.0) -> list[tuple[float, float, float, float, float]]:
    """Connected regions of ``prob_map > threshold`` → ``(x0, y0, x1, y1, score)`` in the map's pixels.

    ``score`` is the region's peak value; boxes whose area is under ``min_area`` pixels are dropped.
    """
    binary = (prob_map > threshold).astype(np.uint8)
    if not binary.any():
        return []
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    peaks = region_peaks(labels, prob_map, n)
    out = []
    for k in range(1, n):
        x, y, w, h, area = stats[k]
        if w * h >= min_area:
            out.append((float(x), float(y), float(x + w), float(y + h), float(peaks[k])))
    return sorted(out, key=lambda b: -b[4])


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def peak_window(scale: float, stride: int = 8) -> int:
    """Odd side in pixels of the neighbourhood a peak must top (3 map cells), for a map shown at ``scale`` pixels per input pixel."""
    return int(round(3 * stride * scale)) | 1


def peak_boxes(prob_map: np.ndarray, box_width: float, box_height: float, threshold: float, max_boxes: int, window: int) -> list[tuple[float, float, float, float, float]]:
    """Local maxima of the map above ``threshold`` → boxes of a fixed size centred on them, scored by the peak.

    A maximum inside an already kept box is skipped; at most ``max_boxes``, highest first; boxes are
    clipped to the map. The box centre is the peak, so a centre hit means the map points into the fracture.
    """
    dilated = cv2.dilate(prob_map.astype(np.float32), np.ones((window, window), np.uint8))
    ys, xs = np.nonzero((prob_map >= dilated) & (prob_map > threshold))
    h, w = prob_map.shape
    out: list[tuple[float, float, float, float, float]] = []
    for j in np.argsort(-prob_map[ys, xs], kind="stable"):
        cx, cy = xs[j] + 0.5, ys[j] + 0.5
        if any(b[0] <= cx <= b[2] and b[1] <= cy <= b[3] for b in out):
            continue
        out.append((max(cx - box_width / 2, 0.0), max(cy - box_height / 2, 0.0), min(cx + box_width / 2, float(w)), min(cy + box_height / 2, float(h)),
                    float(prob_map[ys[j], xs[j]])))
        if len(out) >= max_boxes:
            break
    return out


def decoding_problems(params: dict[str, Any]) -> list[str]:
    """What makes a stored decoding unusable (empty: usable): an unknown method, missing keys, values of the wrong kind.

    Checked when a model is loaded, so an edited or damaged file fails there with a reason, not at its first box.
    """
    method = params.get("box_method", "regions")
    needs = {"regions": ("box_threshold",), "peaks": ("box_threshold", "max_boxes", "box_size")}.get(method)
    if needs is None:
        return [f"unknown localisation.box_method {method!r} (this predictor knows regions and peaks); update fracture"]
    missing = [k for k in needs if k not in params]
    if missing:
        return [f"has a fracture map but its localisation metadata lacks {', '.join(missing)}"]

    def fraction(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0

    bad = [k for k in ("box_threshold", "min_area_fraction", "display_threshold") if k in params and not fraction(params[k])]
    if "max_boxes" in params and not (isinstance(params["max_boxes"], int) and not isinstance(params["max_boxes"], bool) and params["max_boxes"] >= 1):
        bad.append("max_boxes")
    size = params.get("box_size")
    if "box_size" in params and not (isinstance(size, (list, tuple)) and len(size) == 2 and all(fraction(v) and v > 0 for v in size)):
        bad.append("box_size")
    return [f"localisation.{k} = {params[k]!r} is not valid (thresholds and fractions within 0..1, max_boxes >= 1, "
            "box_size two fractions of the input)" for k in bad]


def find_boxes(full: np.ndarray, params: dict[str, Any], height: int, width: int, contract: Contract,
               candidates: bool = False) -> list[tuple[float, float, float, float, float]]:
    """A localise model's map over the original ``height x width`` image → boxes there, as its stored ``params`` say.

    ``params`` is the ``localisation`` metadata chosen on validation (no ``box_method``: ``regions``, older models).
    The boxes shown to a reader score above ``display_threshold`` (none stored, older models: all);
    ``candidates`` gives every decoded box, as FROC and AP sweep them.
    """
    if params.get("box_method", "regions") == "peaks":
        g = geometry(height, width, contract)
        sx, sy = width / g.inner_width, height / g.inner_height  # input pixels → original pixels
        bw, bh = (v * contract.image_size for v in params["box_size"])
        boxes = peak_boxes(full, bw * sx, bh * sy, params["box_threshold"], int(params["max_boxes"]), peak_window(max(sx, sy)))
    else:
        min_area = min_area_in_original(params.get("min_area_fraction", 0.0), height, width, contract)
        boxes = map_to_boxes(full, params.get("box_threshold", 0.5), min_area)
    shown = params.get("display_threshold")
    return boxes if candidates or shown is None else [b for b in boxes if b[4] > shown]


def describe_boxes(params: dict[str, Any]) -> str:
    """A box decoding in words (reports, the ensemble command)."""
    if params.get("box_method") == "peaks":
        w, h = params["box_size"]
        return (f"up to {params['max_boxes']} per image, centred on the map's local maxima above {params['box_threshold']:.2f}, "
                f"{w:.3f} x {h:.3f} of the input (the median validation box)")
    kind = "of each map's maximum" if params.get("relative") else "probability"
    return f"regions above {params['box_threshold']:.2f} {kind}, at least {params.get('min_area_fraction', 0.0):g} of the input"
