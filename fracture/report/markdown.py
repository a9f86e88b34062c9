"""The one-page report.md of an evaluation: metrics with intervals, subgroups, localisation, study-level answers, the caveat."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from fracture.boxes.detection import describe_boxes
from fracture.scoring import selection

CAVEAT = "Research tool, not a medical device: these figures do not show fitness for clinical use."


def _fmt(value: float, ci: tuple[float, float] | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3f}" + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "")


def audit_summary(root: Path) -> list[str]:
    path = root / "audit.json"
    if not path.is_file():
        return [f"Not audited: run `python -m fracture.audit {root}` (duplicates, leakage, defects, shortcuts)."]
    a = json.loads(path.read_text())
    lines = [
        f"- defective files: {len(a['defective'])}; duplicate groups: {len(a['duplicate_groups'])} "
        f"({a['exact_pairs']} exact, {a['near_pairs']} near pairs), straddling splits: {a['cross_split_groups']}, "
        f"test leaks: {a['test_leaks']}, groups with conflicting labels: {a['conflicting_groups']}",
    ]
    lines += [f"- shortcut warning: {w}" for w in a["shortcuts"]["warnings"]]
    return lines


def report_md(result: dict[str, Any], info: dict[str, Any], table: pd.DataFrame, root: Path) -> str:
    ops = result["operating_points"]
    names = list(ops)
    lines = [
        f"# Fracture classifier evaluation: {Path(result['source']).name}",
        "",
        f"> **{CAVEAT}**",
        "",
        f"Model: `{result['source']}` ({info.get('arch', 'onnx')}, {info['contract']['image_size']} px, resize {info['contract']['resize']}). "
        f"Trained on {info.get('train_counts', {})}. Fractured is the positive class.",
        f"Evaluated on `{root}/{result['split']}`: **{result['n']} images, {result['fractured']} fractured** ({result['fractured'] / max(result['n'], 1):.1%}). "
        + ("**The thresholds were chosen on this very split: sensitivity and specificity at the operating points are optimistic.**"
         if result["split"] == "val" else "Thresholds were chosen on the validation split, never on this one."),
        f"95 % intervals: percentile bootstrap, {result['bootstrap']['resamples']} resamples (seed {result['bootstrap']['seed']}), resampling by {result['bootstrap']['unit']}.",
        "",
        "## Data audit",
        *audit_summary(root),
        "",
        "## Metrics (95 % CI)",
        "| metric | " + " | ".join(f"{n} (t={ops[n]['threshold']:.3f})" for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for metric in ("sensitivity", "specificity", "precision", "accuracy", "f1", "auroc", "average_precision", "brier", "ece"):
        cells = [_fmt(ops[n]["metrics"][metric], ops[n]["ci95"].get(metric)) for n in names]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    lines.append("| TP / FP / TN / FN | " + " | ".join("{tp} / {fp} / {tn} / {fn}".format(**ops[n]["confusion"]) for n in names) + " |")
    sub = result["subgroups"]
    lines += ["", f"## Subgroups (at `{sub['operating_point']}`)", "| column | value | n | fractured | sensitivity | specificity | AUROC | note |", "|---|---|---|---|---|---|---|---|"]
    for r in sub["rows"]:
        ci = r.get("ci95", {})
        lines.append(f"| {r['column']} | {r['value']} | {r['n']} | {r['fractured']} | {_fmt(r['sensitivity'], ci.get('sensitivity'))} | "
                     f"{_fmt(r['specificity'], ci.get('specificity'))} | {_fmt(r['auroc'], ci.get('auroc'))} | {r['note']} |")
    if not sub["rows"]:
        lines.append("| (no fracture type or metadata columns to split by) | | | | | | | |")
    lines += study_md(result.get("study_level"))
    lines += localisation_md(result.get("localisation"))
    lines += ["", "## Plots", *[f"![{p}]({p})" for p in result["plots"]], "", f"_{CAVEAT}_", ""]
    return "\n".join(lines)


LOCALISATION_ROWS = (
    ("pointing_hit_rate", "pointing game: map maximum inside a true box (fractured images with boxes)"),
    ("mass_in_boxes", "share of map mass inside true boxes"),
    ("froc_centre_sensitivity_at_0.5_fp", "FROC sensitivity at 0.5 FP/image (hit = centre in box)"),
    ("froc_centre_sensitivity_at_1_fp", "FROC sensitivity at 1 FP/image (hit = centre in box)"),
    ("froc_centre_sensitivity_at_2_fp", "FROC sensitivity at 2 FP/image (hit = centre in box)"),
    ("froc_iou_sensitivity_at_0.5_fp", "FROC sensitivity at 0.5 FP/image (hit = IoU >= 0.25)"),
    ("froc_iou_sensitivity_at_1_fp", "FROC sensitivity at 1 FP/image (hit = IoU >= 0.25)"),
    ("froc_iou_sensitivity_at_2_fp", "FROC sensitivity at 2 FP/image (hit = IoU >= 0.25)"),
    ("ap_iou25", "AP at IoU 0.25"),
    ("ap_iou50", "AP at IoU 0.5"),
    ("display_sensitivity", "boxes shown to a reader: lesion sensitivity (hit = centre in box)"),
    ("display_fp_per_image", "boxes shown to a reader: false boxes per image"),
)


def study_md(st: dict[str, Any] | None) -> list[str]:
    if not st:
        return []
    ops = st["operating_points"]
    names = list(ops)
    lines = ["", f"## Study level (95 % CI): {st['studies']} studies ({st['fractured_studies']} fractured) from {st['images']} images, "
             f"combined by `{st['aggregation']}`", "| metric | " + " | ".join(f"{n} (t={ops[n]['threshold']:.3f})" for n in names) + " |", "|---|" + "---|" * len(names)]
    for metric in ("sensitivity", "specificity", "auroc"):
        lines.append(f"| {metric} | " + " | ".join(_fmt(ops[n]["metrics"][metric], ops[n]["ci95"].get(metric)) for n in names) + " |")
    return lines


def describe_display(loc: dict[str, Any]) -> str:
    if "shown_boxes" not in loc:
        return ""
    return (f"; {loc['shown_boxes']} of them shown to a reader (map peak above {loc['boxes']['display_threshold']:.2f}, "
            f"at most {selection.DISPLAY_FP_RATE:g} false box per image on validation)")


def localisation_md(loc: dict[str, Any] | None) -> list[str]:
    if not loc:
        return []
    lines = [
        "", "## Where: localisation against the true boxes (95 % CI)",
        f"{loc['method']}; {loc['fractured_with_boxes']} fractured images with {loc['true_boxes']} boxes among {loc['images']} images; "
        f"{loc['predicted_boxes']} predicted boxes ({describe_boxes(loc['boxes'])}){describe_display(loc)}. False positives are counted over all images. "
        f"Centre baseline: a Gaussian at the centre (pointing) and one centred box of the median true size, scored by the image probability (FROC, AP).",
        "| measure | model | centre baseline |", "|---|---|---|",
    ]
    for key, name in LOCALISATION_ROWS:
        if key not in loc["model"]["metrics"]:  # e.g. no display threshold stored (older models show every box)
            continue
        cells = [_fmt(loc[w]["metrics"].get(key, float("nan")), loc[w]["ci95"].get(key)) for w in ("model", "centre")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if loc.get("subgroups"):
        lines += ["", "### Where the map misses: pointing game by subgroup (fractured images with boxes; lesion size = the smallest "
                  "true box, sqrt(w x h) in original pixels, in thirds of this split)",
                  "| column | value | images | pointing game | map mass in boxes |", "|---|---|---|---|---|"]
        for r in loc["subgroups"]:
            ci = r["ci95"]
            lines.append(f"| {r['column']} | {r['value']} | {r['n']} | {_fmt(r['pointing_hit_rate'], ci.get('pointing_hit_rate'))} | "
                         f"{_fmt(r['mass_in_boxes'], ci.get('mass_in_boxes'))} |")
    return lines
