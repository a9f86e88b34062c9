"""Fracture boxes: their text form, their geometry, maps → boxes, and how to score boxes (torch-free).

Boxes travel in ``annotations.csv`` as a ``boxes`` column of corner coordinates
normalised to the image's width and height, ``x0 y0 x1 y1`` per box, boxes
separated by ``;`` (empty = none). Normalised corners survive resizing of the
source (the FracAtlas copy's downscaled scans) and need no image size to write.

Scoring follows the definitions used in the README:
- a predicted box *hits* a true box when its centre lies inside it (``centre``)
  or when their IoU is at least 0.25 (``iou``), reported separately;
- FROC: lesion sensitivity against false-positive boxes per image, counted over
  **all** images (fractured or not); a predicted box that hits an already-found
  lesion is neither a hit nor a false positive;
- AP at an IoU: greedy one-to-one matching by score within each image, area
  under the all-point-interpolated precision-recall curve.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from fracture import metrics
from fracture.preprocess import Contract, geometry

Box = tuple[float, float, float, float]
FP_RATES = (0.5, 1.0, 2.0)
DECODING_KEYS = ("box_method", "box_threshold", "min_area_fraction", "max_boxes", "box_size", "display_threshold")  # how a map becomes boxes, as stored
DISPLAY_FP_RATE = 1.0  # boxes shown to a reader: scores at which validation had at most this many false boxes per image
MAX_BOXES = 16  # per image in a training batch (padded); more are dropped with the rest of the smallest


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


def map_to_boxes(prob_map: np.ndarray, threshold: float, min_area: float = 0.0) -> list[tuple[float, float, float, float, float]]:
    """Connected regions of ``prob_map > threshold`` → ``(x0, y0, x1, y1, score)`` in the map's pixels.

    ``score`` is the region's peak value; boxes whose area is under ``min_area`` pixels are dropped.
    """
    binary = (prob_map > threshold).astype(np.uint8)
    if not binary.any():
        return []
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    peaks = np.full(n, -np.inf)
    np.maximum.at(peaks, labels.ravel(), prob_map.ravel())
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


MAX_AREA_RATIO = 4.0  # a centre hit needs a box at most this many times the true box's area


def area(box: Sequence[float]) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def hits(pred: Sequence[float], truth: Sequence[float], criterion: str, min_iou: float = 0.25) -> bool:
    """``centre``: the predicted box's centre lies in the true box and the box is at most ``MAX_AREA_RATIO`` times
    its area (a box over half the image would otherwise "find" everything); ``iou``: IoU >= ``min_iou``."""
    if criterion == "centre":
        cx, cy = (pred[0] + pred[2]) / 2, (pred[1] + pred[3]) / 2
        return truth[0] <= cx <= truth[2] and truth[1] <= cy <= truth[3] and area(pred) <= MAX_AREA_RATIO * area(truth)
    return iou(pred, truth) >= min_iou


def match(preds: Sequence[Sequence[float]], truths: Sequence[Sequence[float]], criterion: str, min_iou: float = 0.25) -> list[int]:
    """One-to-one matching by descending score: each box takes the free true box it hits best (by IoU), or none
    (-1). A box over two lesions finds one; a second box on a found lesion is a false positive, as in AP."""
    taken: set[int] = set()
    out = [-1] * len(preds)
    for i in sorted(range(len(preds)), key=lambda k: -preds[k][4]):
        free = [j for j, t in enumerate(truths) if j not in taken and hits(preds[i], t, criterion, min_iou)]
        if free:
            out[i] = max(free, key=lambda j: (iou(preds[i], truths[j]), -j))
            taken.add(out[i])
    return out


class ImageScores:
    """What one image contributes to FROC and AP, precomputed so bootstrap resamples are cheap."""

    def __init__(self, preds: Sequence[Sequence[float]], truths: Sequence[Sequence[float]], criterion: str, ap_iou: float | None = None) -> None:
        self.n_truth = len(truths)
        lesion = np.full(len(truths), -np.inf)
        fps = []
        for p, j in zip(preds, match(preds, truths, criterion)):
            if j >= 0:
                lesion[j] = p[4]
            else:
                fps.append(p[4])
        self.lesion_scores = lesion
        self.fp_scores = np.asarray(fps, float)
        matched = match(preds, truths, "iou", 0.25 if ap_iou is None else ap_iou)  # AP: the same matching at its own IoU
        self.ap_pairs = np.asarray([(p[4], j >= 0) for p, j in zip(preds, matched)], float).reshape(-1, 2)


def froc(images: Sequence[ImageScores], rates: Sequence[float] = FP_RATES) -> dict[str, float]:
    """Lesion sensitivity at each false-positive rate per image (over every image given)."""
    n = len(images)
    lesions = np.concatenate([im.lesion_scores for im in images]) if images else np.zeros(0)
    fps = np.sort(np.concatenate([im.fp_scores for im in images]))[::-1] if images else np.zeros(0)
    out = {}
    for r in rates:
        out[f"sensitivity_at_{r:g}_fp"] = float((lesions > fp_cut(fps, n, r)).mean()) if lesions.size else float("nan")
    return out


def fp_cut(fps_descending: np.ndarray, n_images: int, rate: float) -> float:
    """The score of the first false positive that ``rate`` per image does not allow: boxes scoring above it are kept."""
    allowed = int(np.floor(rate * n_images + 1e-9))
    return float(fps_descending[allowed]) if allowed < fps_descending.size else -np.inf


def at_threshold(images: Sequence[ImageScores], threshold: float) -> dict[str, float]:
    """Lesion sensitivity and false boxes per image when only boxes scoring above ``threshold`` are kept."""
    lesions = np.concatenate([im.lesion_scores for im in images]) if images else np.zeros(0)
    fps = np.concatenate([im.fp_scores for im in images]) if images else np.zeros(0)
    return {"sensitivity": float((lesions > threshold).mean()) if lesions.size else float("nan"),
            "fp_per_image": float((fps > threshold).sum() / max(len(images), 1))}


def froc_curve(images: Sequence[ImageScores]) -> tuple[np.ndarray, np.ndarray]:
    """(false positives per image, lesion sensitivity) as the score threshold falls."""
    lesions = np.concatenate([im.lesion_scores for im in images])
    fps = np.concatenate([im.fp_scores for im in images])
    cuts = np.unique(np.concatenate([lesions[np.isfinite(lesions)], fps]))[::-1]
    fp_rate = np.array([(fps >= c).sum() / len(images) for c in cuts])
    sens = np.array([(lesions >= c).mean() for c in cuts]) if lesions.size else np.zeros(len(cuts))
    return np.concatenate([[0.0], fp_rate]), np.concatenate([[0.0], sens])


def average_precision(images: Sequence[ImageScores]) -> float:
    """All-point-interpolated AP of the box detections (matching as built into ``ImageScores``)."""
    n_truth = sum(im.n_truth for im in images)
    pairs = np.concatenate([im.ap_pairs for im in images]) if images else np.zeros((0, 2))
    if n_truth == 0:
        return float("nan")
    if not len(pairs):
        return 0.0
    order = np.argsort(-pairs[:, 0], kind="mergesort")
    tp = np.cumsum(pairs[order, 1])
    precision = tp / np.arange(1, len(order) + 1)
    recall = tp / n_truth
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.diff(np.concatenate([[0.0], recall]))
    return float((envelope * steps).sum())


def score_detections(preds: Sequence[Sequence[Sequence[float]]], truths: Sequence[Sequence[Sequence[float]]]) -> dict[str, dict[str, ImageScores] | list]:
    """Per-image scores for both hit criteria and both AP IoUs."""
    return {
        "centre": [ImageScores(p, t, "centre") for p, t in zip(preds, truths)],
        "iou": [ImageScores(p, t, "iou", ap_iou=0.25) for p, t in zip(preds, truths)],
        "iou50": [ImageScores(p, t, "iou", ap_iou=0.5) for p, t in zip(preds, truths)],
    }


def detection_metrics(scored: dict[str, list[ImageScores]], index: np.ndarray | None = None) -> dict[str, float]:
    """FROC sensitivities (both criteria) and AP at IoU 0.25 / 0.5, optionally on a resample of images."""
    pick = (lambda ims: ims) if index is None else (lambda ims: [ims[i] for i in index])
    out = {}
    for crit in ("centre", "iou"):
        out.update({f"froc_{crit}_{k}": v for k, v in froc(pick(scored[crit])).items()})
    out["ap_iou25"] = average_precision(pick(scored["iou"]))
    out["ap_iou50"] = average_precision(pick(scored["iou50"]))
    return out


def choose_box_decoding(maps: Sequence[np.ndarray], truths: Sequence[Sequence[Box]], thresholds: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8),
                        min_areas: Sequence[float] = (0.0, 0.0005, 0.002), peak_thresholds: Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5),
                        max_boxes: Sequence[int] = (1, 2, 3)) -> dict[str, Any]:
    """How a map becomes boxes, chosen by mean FROC sensitivity (centre hit) at 0.5/1/2 FP per image.

    ``maps`` are probability maps over the model input, ``truths`` pixel boxes in the same frame.
    Candidates: ``regions`` (threshold x minimum area) and ``peaks`` (threshold x boxes per image, box
    size = the median true box here). Ties go to the higher threshold and fewer boxes (less shown to a
    reader) and to ``regions``: peaks must be strictly better. The decoded boxes are the FROC's
    candidates; ``display_threshold`` is the reader's operating point among them (at most
    ``DISPLAY_FP_RATE`` false boxes per image here), what the predictor outputs and draws.
    """
    def froc_mean(preds: Sequence[Sequence[Sequence[float]]]) -> float:
        return float(np.mean(list(froc([ImageScores(p, tr, "centre") for p, tr in zip(preds, truths)]).values())))

    best: dict[str, Any] = {"box_method": "regions", "box_threshold": 0.5, "min_area_fraction": 0.0, "froc_mean": -1.0}
    best_preds: list = [[] for _ in maps]
    for t in thresholds:
        raw = [map_to_boxes(m, t) for m in maps]
        for area in min_areas:
            preds = [[b for b in r if (b[2] - b[0]) * (b[3] - b[1]) >= area * m.size] for r, m in zip(raw, maps)]  # = map_to_boxes(m, t, area * m.size)
            score = froc_mean(preds)
            if score >= best["froc_mean"]:
                best, best_preds = {"box_method": "regions", "box_threshold": float(t), "min_area_fraction": float(area), "froc_mean": score}, preds
    sizes = np.array([(b[2] - b[0], b[3] - b[1]) for boxes in truths for b in boxes], float).reshape(-1, 2)
    if len(sizes) and peak_thresholds and max_boxes:
        side = maps[0].shape[0]
        box_size = (float(np.median(sizes[:, 0])) / side, float(np.median(sizes[:, 1])) / side)
        found = [peak_boxes(m, box_size[0] * side, box_size[1] * side, min(peak_thresholds), max(max_boxes), peak_window(1.0)) for m in maps]
        peaks: dict[str, Any] | None = None
        for t in peak_thresholds:
            for k in sorted(max_boxes, reverse=True):
                preds = [[b for b in f if b[4] > t][:k] for f in found]  # = peak_boxes(m, …, t, k, …)
                score = froc_mean(preds)
                if peaks is None or score >= peaks["froc_mean"]:
                    peaks, peaks_preds = {"box_method": "peaks", "box_threshold": float(t), "max_boxes": int(k), "box_size": list(box_size),
                                          "min_area_fraction": 0.0, "froc_mean": score}, preds
        if peaks is not None and peaks["froc_mean"] > best["froc_mean"]:
            best, best_preds = peaks, peaks_preds
    fps = np.sort(np.concatenate([ImageScores(p, tr, "centre").fp_scores for p, tr in zip(best_preds, truths)] or [np.zeros(0)]))[::-1]
    return {**best, "display_threshold": max(fp_cut(fps, len(maps), DISPLAY_FP_RATE), best["box_threshold"])}


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


def fuse(weight: float, logits: np.ndarray) -> np.ndarray:
    """``weight * first + (1 - weight) * second`` of ``N x 2`` logits: ``FusedLogits.fuse`` on validation arrays."""
    return weight * logits[:, 0] + (1 - weight) * logits[:, 1]


def choose_fusion(labels: np.ndarray, logits: np.ndarray, names: tuple[str, str] = ("map", "joint")) -> tuple[float, dict[str, float]]:
    """The image-logit fusion (1 = the first logit, 0 = the second, 0.5 = their mean) with the best validation AUROC.

    ``logits`` is ``N x 2``: (map-pooled, joint) for a localise network, (localiser, classifier) for one
    with a classifier; ``names`` labels them. Returns the weight and every choice's AUROC; ties go to the first.
    """
    sigmoid = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    choices = {names[0]: 1.0, names[1]: 0.0, "mean": 0.5}
    scores = {k: metrics.auroc(sigmoid(fuse(w, logits)), labels) for k, w in choices.items()}
    best = max(choices, key=lambda k: (np.nan_to_num(scores[k], nan=-1), choices[k]))
    return choices[best], scores
