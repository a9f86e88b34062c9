"""Scoring predicted boxes against true ones: hits, one-to-one matching, FROC and AP (torch-free).

- a predicted box *hits* a true box when its centre lies inside it and it is at most ``MAX_AREA_RATIO``
  times the true box's area (``centre``), or when their IoU is at least 0.25 (``iou``), reported separately;
- one-to-one matching by descending score: a box finds at most one lesion, and a second box on a found
  lesion is a false positive;
- FROC: lesion sensitivity against false-positive boxes per image, counted over **all** images (fractured
  or not);
- AP at an IoU: the same matching within each image, area under the all-point-interpolated precision-recall curve.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fracture.boxes.detection import iou

FP_RATES = (0.5, 1.0, 2.0)


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
