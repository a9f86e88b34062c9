"""Does the model point at the fracture? Maps scored against true boxes, with bootstrap intervals (torch-free).

Used by ``fracture.evaluate`` for every model that has a map: the fracture map
of a ``localise`` model, or the Grad-CAM of a ``classify`` model. Per image the
low-resolution map is put back onto the original radiograph (stretch or
letterbox undone), turned into boxes, and scored (definitions in
``fracture.boxes.detection``):

- pointing game on fractured images with boxes: the map's maximum inside a
  true box; and the share of the map's mass inside boxes;
- FROC on **all** images: lesion sensitivity at 0.5 / 1 / 2 false-positive
  boxes per image, a hit being a predicted box whose centre is inside a true
  box (``centre``) or whose IoU with it is >= 0.25 (``iou``);
- AP of the boxes at IoU 0.25 and 0.5.

The same numbers are computed for the centre baseline: a Gaussian at the
image centre for the pointing game, and one box of the split's median true
box size at the centre, scored by the model's image probability, for FROC/AP.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fracture.boxes import detection, heatmap
from fracture.imaging import preprocess
from fracture.imaging.contract import Contract
from fracture.scoring import froc, metrics

GRAD_CAM_BOX_THRESHOLD = 0.5  # of each Grad-CAM map's own maximum; its boxes are scored by probability x peak


@dataclass
class ImageResult:
    """What one image contributes; maps themselves are not kept (they can be large)."""

    truth: list[detection.Box]  # original pixels
    preds: list[tuple[float, float, float, float, float]]
    centre_pred: list[tuple[float, float, float, float, float]]
    pointing: dict[str, float] = field(default_factory=dict)
    centre_pointing: dict[str, float] = field(default_factory=dict)


def score_image(low_res: np.ndarray, height: int, width: int, contract: Contract, truth_norm: list[detection.Box], probability: float,
                boxes: dict[str, Any] | None, centre_size: tuple[float, float]) -> ImageResult:
    """Score one map. ``boxes``: a localise model's stored box decoding; None for a Grad-CAM (regions above
    ``GRAD_CAM_BOX_THRESHOLD`` of its own maximum, box score = probability x peak)."""
    full = heatmap.to_original(low_res, height, width, contract)
    truth = detection.to_pixels(truth_norm, height, width)
    if boxes is None:
        top = float(full.max())
        norm = full / top if top > 0 else full
        preds = [(*b[:4], probability * b[4]) for b in detection.map_to_boxes(norm, GRAD_CAM_BOX_THRESHOLD)]
    else:
        preds = detection.find_boxes(full, boxes, height, width, contract, candidates=True)
    cw, ch = centre_size[0] * width, centre_size[1] * height
    centre = [(width / 2 - cw / 2, height / 2 - ch / 2, width / 2 + cw / 2, height / 2 + ch / 2, probability)]
    result = ImageResult(truth, preds, centre)
    if truth:
        mask = heatmap.box_mask([tuple(int(round(v)) for v in b) for b in truth], height, width)
        result.pointing = heatmap.pointing(full, mask)
        result.centre_pointing = heatmap.pointing(heatmap.centre_map(height, width), mask)
    return result


def to_columns(results: list[ImageResult]) -> dict[str, list]:
    """Per-image columns for ``predictions.csv`` (boxes as JSON, original pixels), so a report can be re-scored or compared."""
    return {"truth": [json.dumps([list(b) for b in r.truth]) for r in results],
            "boxes": [json.dumps([list(b) for b in r.preds]) for r in results],
            "pointing_hit": [r.pointing.get("hit", np.nan) for r in results],
            "mass_in_boxes": [r.pointing.get("mass_in_boxes", np.nan) for r in results]}


def scored_columns(truth: list[str], boxes: list[str], hit: np.ndarray, mass: np.ndarray) -> tuple[dict, np.ndarray, np.ndarray]:
    """``to_columns`` read back → what :func:`values` takes (the detections scored once)."""
    scored = froc.score_detections([[tuple(b) for b in json.loads(t)] for t in boxes], [[tuple(b) for b in json.loads(t)] for t in truth])
    return scored, np.asarray(hit, float), np.asarray(mass, float)


def median_box_size(truths_norm: list[list[detection.Box]]) -> tuple[float, float]:
    sizes = [(b[2] - b[0], b[3] - b[1]) for boxes in truths_norm for b in boxes]
    return tuple(np.median(np.array(sizes), axis=0)) if sizes else (0.1, 0.1)


def values(scored: dict, hits: np.ndarray, mass: np.ndarray, index: np.ndarray, display: float | None) -> dict[str, float]:
    """Every measure on the images ``index`` picks (all of them, or one bootstrap draw) from scores computed once per image."""
    values = froc.detection_metrics(scored, index)
    if display is not None:
        shown = froc.at_threshold([scored["centre"][i] for i in index], display)
        values.update({f"display_{k}": v for k, v in shown.items()})
    boxed = index[~np.isnan(hits[index])]
    values["pointing_hit_rate"] = float(hits[boxed].mean()) if boxed.size else float("nan")
    values["mass_in_boxes"] = float(np.nanmean(mass[boxed])) if boxed.size else float("nan")
    return values


def summarise(results: list[ImageResult], groups: np.ndarray | None = None, n_boot: int = 1000, seed: int = 0,
              display: float | None = None) -> dict[str, Any]:
    """Point estimates and 95 % percentile-bootstrap intervals (whole groups resampled), model and centre baseline.

    ``display``: the model's stored display threshold; its boxes above it are what a reader is shown
    (``display_sensitivity``, ``display_fp_per_image``, centre hits).
    """
    out: dict[str, Any] = {"images": len(results), "fractured_with_boxes": sum(1 for r in results if r.truth),
                           "true_boxes": sum(len(r.truth) for r in results), "predicted_boxes": sum(len(r.preds) for r in results)}
    if display is not None:
        out["shown_boxes"] = sum(1 for r in results for b in r.preds if b[4] > display)
    members = metrics.group_members(len(results), groups)
    for who, key in (("model", "pointing"), ("centre", "centre_pointing")):
        # score every image once, then resample the per-image scores
        scored = froc.score_detections([r.preds if who == "model" else r.centre_pred for r in results], [r.truth for r in results])
        hits = np.array([getattr(r, key).get("hit", np.nan) for r in results])
        mass = np.array([getattr(r, key).get("mass_in_boxes", np.nan) for r in results])
        shown = display if who == "model" else None
        rng = np.random.default_rng(seed)
        draws: dict[str, list[float]] = {}
        for _ in range(n_boot):
            for k, v in values(scored, hits, mass, metrics.resample(members, rng), shown).items():
                if not np.isnan(v):
                    draws.setdefault(k, []).append(v)
        out[who] = {"metrics": values(scored, hits, mass, np.arange(len(results)), shown),
                    "ci95": {k: metrics.interval(v) for k, v in draws.items()},
                    "froc_curve": {crit: [c.tolist() for c in froc.froc_curve(scored[crit])] for crit in ("centre", "iou")}}
    return out


LESION_SIZE = "lesion size"


def lesion_sizes(results: list[ImageResult]) -> np.ndarray:
    """Each image's smallest true box as sqrt(width x height) in original pixels (NaN without boxes)."""
    return np.array([min(np.sqrt((b[2] - b[0]) * (b[3] - b[1])) for b in r.truth) if r.truth else np.nan for r in results])


def size_thirds(sizes: np.ndarray) -> np.ndarray:
    """Thirds of the split's lesion sizes, labelled with their pixel ranges ("" without boxes): the same images fall
    in the same third for every model scored on the split, so two reports compare like with like."""
    known = ~np.isnan(sizes)
    out = np.full(len(sizes), "", dtype=object)
    if not known.any():
        return out
    low, high = np.quantile(sizes[known], [1 / 3, 2 / 3])
    names = (f"small (< {low:.0f} px)", f"medium ({low:.0f}-{high:.0f} px)", f"large (>= {high:.0f} px)")
    out[known] = [names[int(v >= low) + int(v >= high)] for v in sizes[known]]
    return out


def by_subgroup(results: list[ImageResult], columns: dict[str, np.ndarray], groups: np.ndarray | None = None,
                n_boot: int = 1000, seed: int = 0) -> list[dict[str, Any]]:
    """Pointing game and map mass in boxes per value of each column, and per third of lesion size, among the
    fractured images with boxes (whole groups resampled within each subgroup): where the map misses."""
    hits = np.array([r.pointing.get("hit", np.nan) for r in results])
    mass = np.array([r.pointing.get("mass_in_boxes", np.nan) for r in results])
    boxed = ~np.isnan(hits)
    rows = []
    for column, labels in {**columns, LESION_SIZE: size_thirds(lesion_sizes(results))}.items():
        labels = np.asarray(labels).astype(str)
        for value in sorted(set(labels[boxed])):
            idx = np.flatnonzero(boxed & (labels == value))
            members = metrics.group_members(len(idx), None if groups is None else groups[idx])
            rng = np.random.default_rng(seed)
            draws = [metrics.resample(members, rng) for _ in range(n_boot)]
            ci = {name: metrics.interval([np.nanmean(v[idx][d]) for d in draws]) for name, v in (("pointing_hit_rate", hits), ("mass_in_boxes", mass))} if n_boot else {}
            if ci:  # 3 of 3 hit: Wilson's interval, not a zero-width one
                ci["pointing_hit_rate"] = metrics.proportion_interval(ci["pointing_hit_rate"], float(np.nansum(hits[idx])), len(idx))
            rows.append({"column": column, "value": value, "n": int(len(idx)),
                         **{name: float(np.nanmean(v[idx])) for name, v in (("pointing_hit_rate", hits), ("mass_in_boxes", mass))},
                         "ci95": ci})
    return rows


def plots(out: Path, summary: dict[str, Any], results: list[ImageResult], paths: list[str], probs: np.ndarray,
          redo_map: Any, label: str, n: int = 4) -> list[str]:
    """FROC curves and a grid of the best / worst fractured images (by map mass in boxes), true boxes green,
    predicted boxes white (those a reader is shown, when the model stores a display threshold)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, crit, title in zip(axes, ("centre", "iou"), ("hit = box centre inside a true box", "hit = IoU >= 0.25")):
        fp, sens = summary["model"]["froc_curve"][crit]
        ax.step(fp, sens, where="post", lw=2, label=label)
        cfp, csens = summary["centre"]["froc_curve"][crit]
        ax.step(cfp, csens, where="post", lw=1.5, ls="--", color="gray", label="centre baseline")
        for r in froc.FP_RATES:
            ax.axvline(r, color="k", lw=0.5, ls=":")
        ax.set(xlabel="false-positive boxes per image (all images)", ylabel="lesion sensitivity", title=f"FROC: {title}", xlim=(0, 4), ylim=(0, 1.02))
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "froc.png", dpi=120)
    plt.close(fig)

    boxed = [i for i, r in enumerate(results) if r.truth and r.pointing]
    ranked = sorted(boxed, key=lambda i: (results[i].pointing["mass_in_boxes"], results[i].pointing["hit"]))
    picks = [("best", i) for i in ranked[::-1][:n]] + [("worst", i) for i in ranked[:n]]
    made = ["froc.png"]
    display = summary.get("boxes", {}).get("display_threshold", -np.inf)
    if picks:
        fig, axes = plt.subplots(2, n, figsize=(3.2 * n, 6.6), squeeze=False)
        for ax in axes.ravel():
            ax.axis("off")
        for k, (kind, i) in enumerate(picks):
            image = preprocess.read_image(paths[i])
            blend = heatmap.overlay(image, redo_map(i, image), float(probs[i]), boxes=[b for b in results[i].preds if b[4] > display], truth=results[i].truth)
            half = blend[:, blend.shape[1] // 2 :, ::-1]
            ax = axes[0 if kind == "best" else 1][k % n]
            ax.imshow(half)
            p = results[i].pointing
            ax.set_title(f"{kind}: {Path(paths[i]).name}\nhit {int(p['hit'])}, mass in boxes {p['mass_in_boxes']:.2f}", fontsize=7)
        fig.suptitle(f"{label}: true boxes green, predicted white (best top, worst bottom)", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "localisation_examples.png", dpi=110)
        plt.close(fig)
        made.append("localisation_examples.png")
    return made
