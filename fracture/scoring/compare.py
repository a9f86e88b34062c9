"""Two models on the same images, paired: is B better than A, and by how much (torch-free).

    python -m fracture.compare reports/A reports/B [--out reports/compare-A-vs-B] [--bootstrap 2000]
    python -m fracture.compare reports/A reports/B --exclude A-training-images.txt --subgroups

Reads the ``predictions.csv`` that ``fracture.evaluate`` writes into each report,
checks that both scored the same images (by their path within the split, so two
copies of one dataset pair) with the same labels and true boxes, then resamples
the images (whole duplicate groups, as the reports did) **once for both
models**: for every measure, B − A with its 95 % percentile interval, and
``p_not_better``, the share of resamples in which B − A <= 0 (a
one-sided bootstrap p-value; for "is A better", read 1 − it). Two unpaired
intervals overlap long before a difference is doubtful; the paired interval of
the difference is the one that says whether it is.

Measures: image AUROC and average precision; when both reports scored maps
against boxes, also the pointing game, mass in boxes, FROC sensitivity at
0.5 / 1 / 2 false positives per image (centre and IoU hits) and AP at IoU 0.25 /
0.5 (definitions in ``fracture.scoring.localisation``). Operating-point figures are left
out: each model has its own thresholds, so they compare two choices, not two
models. Writes ``compare.md``, ``compare.json`` and ``differences.png``.

``--exclude FILE`` leaves images out by file name (one per line, or a CSV with a ``path`` column): a model
scored on images it trained on reads high, so comparing a new model with an earlier release on the new
model's validation split must leave out the release's own training images (rebuild its split at its commit).
``--subgroups`` adds the paired AUROC and pointing-game difference within each subgroup the reports carry
(``by_*`` columns: region, view, hardware, multi-scan, lesion-size thirds, ...), resampled the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fracture.progress import progress
from fracture.scoring import localisation, metrics

IMAGE_MEASURES = ("auroc", "average_precision")
SUBGROUP_MEASURES = ("auroc", "pointing_hit_rate")
MIN_PER_CLASS = 10  # a subgroup's AUROC needs this many images of each class, its pointing game this many with boxes
MAP_MEASURES = ("pointing_hit_rate", "mass_in_boxes", "froc_centre_sensitivity_at_0.5_fp", "froc_centre_sensitivity_at_1_fp",
                "froc_centre_sensitivity_at_2_fp", "froc_iou_sensitivity_at_1_fp", "ap_iou25", "ap_iou50")


class CompareError(ValueError):
    """The two reports cannot be paired (missing predictions, different images or labels)."""


def read_predictions(report: Path) -> pd.DataFrame:
    path = report / "predictions.csv"
    if not path.is_file():
        raise CompareError(f"{path} not found: run `python -m fracture.evaluate` again to write it (reports from before it existed lack it)")
    frame = pd.read_csv(path, keep_default_na=False, na_values=[""], dtype={"group": str, "image": str, "path": str, "truth": str, "boxes": str})
    if frame["image"].duplicated().any():
        raise CompareError(f"{path}: an image appears twice")
    return frame.set_index("image")


def pair(a: pd.DataFrame, b: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Both reports in one image order; refuses anything but the same images with the same labels and true boxes."""
    only_a, only_b = a.index.difference(b.index), b.index.difference(a.index)
    if len(only_a) or len(only_b):
        raise CompareError(f"the reports scored different images: {len(only_a)} only in A (e.g. {list(only_a[:1])}), "
                           f"{len(only_b)} only in B (e.g. {list(only_b[:1])}); evaluate both on the same split")
    b = b.loc[a.index]
    differ = a.index[a["label"].to_numpy() != b["label"].to_numpy()]
    if len(differ):
        raise CompareError(f"{len(differ)} image(s) have different labels in the two reports, e.g. {differ[0]}")
    if "truth" in a.columns and "truth" in b.columns:
        moved = a.index[[json.loads(x) != json.loads(y) for x, y in zip(a["truth"], b["truth"])]]
        if len(moved):
            raise CompareError(f"{len(moved)} image(s) have different true boxes in the two reports, e.g. {moved[0]}")
    return a, b


class Scorer:
    """One model's per-image results, scored once, so that each resample only re-aggregates."""

    def __init__(self, frame: pd.DataFrame, with_maps: bool) -> None:
        self.probs = frame["probability"].to_numpy(float)
        self.labels = frame["label"].to_numpy(int)
        self.maps = localisation.scored_columns(frame["truth"].tolist(), frame["boxes"].tolist(), frame["pointing_hit"].to_numpy(float),
                                                frame["mass_in_boxes"].to_numpy(float)) if with_maps else None

    def __call__(self, index: np.ndarray) -> dict[str, float]:
        p, y = self.probs[index], self.labels[index]
        out = {"auroc": metrics.auroc(p, y), "average_precision": metrics.average_precision(p, y)}
        if self.maps is not None:
            found = localisation.values(*self.maps, index, None)
            out.update({k: found[k] for k in MAP_MEASURES})
        return out


def compare(a: pd.DataFrame, b: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Point values of A and B, and the paired bootstrap of B − A (resampling unit: the group column when it groups)."""
    a, b = pair(a, b)
    with_maps = all("truth" in f.columns for f in (a, b)) and bool((a["truth"] != "[]").any())
    score_a, score_b = Scorer(a, with_maps), Scorer(b, with_maps)
    groups = a["group"].to_numpy()
    grouped = len(np.unique(groups)) < len(groups)
    members = metrics.group_members(len(a), groups if grouped else None)
    everything = np.arange(len(a))
    point_a, point_b = score_a(everything), score_b(everything)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {k: [] for k in point_a}
    for _ in progress(range(n_boot), desc="paired bootstrap"):
        index = metrics.resample(members, rng)
        da, db = score_a(index), score_b(index)
        for k in draws:
            if not (np.isnan(da[k]) or np.isnan(db[k])):
                draws[k].append(db[k] - da[k])
    rows = {}
    for k, d in draws.items():
        d = np.asarray(d)
        rows[k] = {"a": point_a[k], "b": point_b[k], "difference": point_b[k] - point_a[k],
                   "ci95": list(metrics.interval(d)) if d.size else None,
                   "p_not_better": float((d <= 0).mean()) if d.size else float("nan")}
    return {"images": len(a), "fractured": int(a["label"].sum()), "with_boxes": int((a["truth"] != "[]").sum()) if with_maps else 0,
            "bootstrap": {"resamples": n_boot, "seed": seed, "unit": "group" if grouped else "image", "level": 0.95}, "measures": rows}


def excluded_names(path: Path) -> set[str]:
    """File names listed in ``path``: one per line, or the ``path`` column of a CSV; a run's ``splits.csv`` (with a
    ``split`` column) lists its training images only — what that model has learnt from."""
    text = path.read_text()
    first = text.splitlines()[0] if text.strip() else ""
    if "," in first and "path" in first.split(","):
        table = pd.read_csv(path, keep_default_na=False)
        if "split" in table.columns:
            table = table[table["split"] == "train"]
        return set(table["path"].map(os.path.basename))
    return {os.path.basename(line.strip()) for line in text.splitlines() if line.strip()}


def without(frame: pd.DataFrame, names: set[str]) -> pd.DataFrame:
    return frame[[os.path.basename(i) not in names for i in frame.index]]


def subgroups(a: pd.DataFrame, b: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """The paired difference of ``SUBGROUP_MEASURES`` within each value of each ``by_*`` column (too small: no interval)."""
    a, b = pair(a, b)
    rows = []
    for column in (c for c in a.columns if c.startswith("by_")):
        for value in sorted(a[column].dropna().astype(str).unique()):
            if value == "":
                continue
            mask = (a[column].astype(str) == value).to_numpy()
            sa, sb = a[mask], b[mask]
            counts = np.bincount(sa["label"].to_numpy(int), minlength=2)
            with_boxes = int((sa["truth"] != "[]").sum()) if "truth" in sa.columns else 0
            row = {"column": column[3:], "value": value, "images": int(mask.sum()), "fractured": int(counts[1]), "with_boxes": with_boxes}
            if counts.min() >= MIN_PER_CLASS or with_boxes >= MIN_PER_CLASS:
                measures = compare(sa, sb, n_boot, seed)["measures"]
                for k in SUBGROUP_MEASURES:
                    enough = counts.min() >= MIN_PER_CLASS if k == "auroc" else with_boxes >= MIN_PER_CLASS
                    if k in measures and enough:
                        row[k] = measures[k]
            rows.append(row)
    return rows


def subgroups_md(rows: list[dict[str, Any]]) -> str:
    lines = ["## Subgroups, paired", "", f"B − A within each subgroup (95 % paired interval); `too few`: under {MIN_PER_CLASS} images of a class "
             "(AUROC) or with boxes (pointing).", "", "| subgroup | images (fractured) | Δ AUROC | Δ pointing game |", "|---|---|---|---|"]

    def cell(r: dict[str, Any] | None) -> str:
        if not r or not r["ci95"]:
            return "too few"
        return f"{r['a']:.3f} → {r['b']:.3f}: {r['difference']:+.3f} ({r['ci95'][0]:+.3f} to {r['ci95'][1]:+.3f})"

    for row in rows:
        lines.append(f"| {row['column']} = {row['value']} | {row['images']} ({row['fractured']}) | {cell(row.get('auroc'))} | {cell(row.get('pointing_hit_rate'))} |")
    return "\n".join(lines) + "\n"


def report_md(result: dict[str, Any], name_a: str, name_b: str) -> str:
    boot = result["bootstrap"]
    lines = [f"# {name_b} vs {name_a}, paired on the same images", "",
             f"{result['images']} images, {result['fractured']} fractured, {result['with_boxes']} with true boxes. "
             f"B − A with a 95 % paired percentile-bootstrap interval ({boot['resamples']} resamples by {boot['unit']}, seed {boot['seed']}); "
             "p(B not better) = share of resamples with B − A <= 0.", "",
             f"| measure | A: {name_a} | B: {name_b} | B − A (95 % CI) | p(B not better) |", "|---|---|---|---|---|"]
    for k, r in result["measures"].items():
        ci = f" ({r['ci95'][0]:+.3f} to {r['ci95'][1]:+.3f})" if r["ci95"] else ""
        lines.append(f"| {k} | {r['a']:.3f} | {r['b']:.3f} | {r['difference']:+.3f}{ci} | {r['p_not_better']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(out: Path, result: dict[str, Any], name_a: str, name_b: str) -> None:
    """A forest plot of the differences: where the interval leaves zero, the reports disagree beyond resampling noise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(k, r) for k, r in result["measures"].items() if r["ci95"]]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    for i, (k, r) in enumerate(rows[::-1]):
        lo, hi = r["ci95"]
        colour = "tab:green" if lo > 0 else "tab:red" if hi < 0 else "gray"
        ax.plot([lo, hi], [i, i], color=colour, lw=2)
        ax.plot(r["difference"], i, "o", color=colour)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(rows)), [k for k, _ in rows[::-1]], fontsize=8)
    ax.set(xlabel=f"{name_b} − {name_a} (95 % paired bootstrap CI)", title="paired differences: right of zero = B better")
    fig.tight_layout()
    fig.savefig(out / "differences.png", dpi=120)
    plt.close(fig)


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fracture.compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path, help="report folder of model A (the reference), as fracture.evaluate wrote it")
    parser.add_argument("b", type=Path, help="report folder of model B")
    parser.add_argument("--out", type=Path, help="output folder (default: reports/compare-A-vs-B)")
    parser.add_argument("--bootstrap", type=int, default=2000, help="paired resamples (default 2000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exclude", type=Path, help="images to leave out, by file name (one per line, or a CSV with a path column), "
                        "e.g. the images model A trained on")
    parser.add_argument("--subgroups", action="store_true", help="also the paired AUROC and pointing-game difference per subgroup")
    ns = parser.parse_args(args)
    try:
        a, b = read_predictions(ns.a), read_predictions(ns.b)
        if ns.exclude:
            names = excluded_names(ns.exclude)
            a, b = without(a, names), without(b, names)
            print(f"left out {len(names)} listed image name(s): {len(a)} of A's images remain", file=sys.stderr)
            if not len(a):
                raise CompareError(f"{ns.exclude} leaves no image to compare")
        result = compare(a, b, ns.bootstrap, ns.seed)
        if ns.subgroups:
            result["subgroups"] = subgroups(a, b, ns.bootstrap, ns.seed)
    except CompareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    name_a, name_b = ns.a.resolve().name, ns.b.resolve().name
    out = ns.out or Path("reports") / f"compare-{name_a}-vs-{name_b}"
    out.mkdir(parents=True, exist_ok=True)
    result |= {"a": str(ns.a), "b": str(ns.b), "excluded": str(ns.exclude) if ns.exclude else None}
    (out / "compare.json").write_text(json.dumps(result, indent=1))
    text = report_md(result, name_a, name_b) + (f"\nLeft out: the images named in `{ns.exclude}`.\n" if ns.exclude else "")
    if ns.subgroups:
        text += "\n" + subgroups_md(result["subgroups"])
    (out / "compare.md").write_text(text + "\n![differences](differences.png)\n")
    plot(out, result, name_a, name_b)
    print(text + f"\nwritten: {out}/compare.md, compare.json, differences.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
