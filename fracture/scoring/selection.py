"""Choices made on validation, never on test: how a fracture map becomes boxes, and how two image logits fuse.

Operating points (thresholds) are chosen by :func:`fracture.scoring.metrics.operating_points`, and a study's
aggregation by :func:`fracture.scoring.metrics.choose_study_aggregation`; both on validation too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fracture.boxes.detection import Box, map_to_boxes, peak_boxes, peak_window
from fracture.scoring import metrics
from fracture.scoring.froc import ImageScores, fp_cut, froc

DISPLAY_FP_RATE = 1.0  # boxes shown to a reader: scores at which validation had at most this many false boxes per image


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
        return mean_froc(preds, truths)

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


def mean_froc(preds: Sequence[Sequence[Sequence[float]]], truths: Sequence[Sequence[Box]]) -> float:
    """Mean FROC sensitivity (centre hit) at 0.5/1/2 false boxes per image: what a box decoding is chosen by."""
    return float(np.mean(list(froc([ImageScores(p, tr, "centre") for p, tr in zip(preds, truths)]).values())))


def score_box_decoding(maps: Sequence[np.ndarray], truths: Sequence[Sequence[Box]], decoding: dict[str, Any]) -> float:
    """Mean FROC of one box decoding (as :func:`choose_box_decoding` returns it) on these maps: what a validation
    between two searches logs, one decode per image instead of the search's fifty."""
    if decoding.get("box_method") == "peaks":
        side = maps[0].shape[0]
        w, h = (v * side for v in decoding["box_size"])
        preds = [peak_boxes(m, w, h, decoding["box_threshold"], int(decoding["max_boxes"]), peak_window(1.0)) for m in maps]
    else:
        preds = [map_to_boxes(m, decoding["box_threshold"], decoding.get("min_area_fraction", 0.0) * m.size) for m in maps]
    return mean_froc(preds, truths)


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
