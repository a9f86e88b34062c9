"""Evaluate a checkpoint or an ONNX file on a labelled split, with confidence intervals, subgroups and plots.

    python -m fracture.evaluate --ckpt checkpoints/RUN/best-….ckpt [--split test]
    python -m fracture.evaluate --onnx exports/fracture.onnx --root data/fracatlas

Writes ``reports/<name>/``: ``metrics.json``, ``report.md`` (one page),
``predictions.csv`` (one row per image: probability, and with boxes the true and
predicted boxes; ``fracture.compare`` pairs two reports on it) and PNG plots
(ROC and precision-recall with the operating points, confusion matrices,
reliability diagram, training curves, most confident errors). Every metric is
computed at every operating point stored with the model (chosen on validation,
never on this split) with a 95 % percentile bootstrap interval (seeded; whole
patient/duplicate groups are resampled when the annotations have a group column).

When the split has fracture boxes, the model's map (a ``localise`` model's
fracture map, or a ``classify`` model's Grad-CAM) is scored against them too:
pointing game, mass in boxes, FROC and AP with intervals, against the centre
baseline (see ``fracture.scoring.localisation``), plus ``froc.png`` and
``localisation_examples.png``.
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

from fracture.boxes import detection
from fracture.data.annotations import DatasetError, run_columns
from fracture.deploy.metadata import ModelMetadata
from fracture.deploy.predictor import ModelError
from fracture.imaging import preprocess
from fracture.imaging.contract import Contract
from fracture.progress import progress
from fracture.report import plots
from fracture.report.markdown import report_md
from fracture.report.sources import Maps, predict_checkpoint, predict_onnx, split_table
from fracture.scoring import localisation, metrics

SUBGROUP_MIN = 10  # positives and negatives needed before a subgroup AUROC is worth printing


def localise(table: pd.DataFrame, probs: np.ndarray, maps: list[tuple[np.ndarray, tuple[int, int]]], info: dict[str, Any], out: Path, n_boot: int, seed: int,
             groups: np.ndarray | None) -> tuple[dict[str, Any], list[localisation.ImageResult]]:
    """Score the maps against the split's boxes (``fracture.scoring.localisation``); returns the summary with plot names, and each image's result."""
    contract = Contract.from_dict(info["contract"])
    own = info.get("localisation")
    # a localise model: its fracture map, boxes decoded as chosen on validation; else a Grad-CAM
    method = "fracture map (localise head)" if own else "Grad-CAM (classify model)"
    decoding = {k: own[k] for k in detection.DECODING_KEYS if k in own} if own else None
    truths = [detection.parse_boxes(b) for b in table["boxes"]]
    centre = localisation.median_box_size(truths)
    results, paths = [], table["path"].tolist()
    for i in progress(range(len(paths)), desc="localise"):
        raw, (h, w) = maps[i]
        results.append(localisation.score_image(raw, h, w, contract, truths[i], float(probs[i]), decoding, centre))
    summary = localisation.summarise(results, groups, n_boot, seed, (decoding or {}).get("display_threshold"))
    summary["subgroups"] = localisation.by_subgroup(results, {c: table[c].to_numpy() for c in subgroup_columns(table)},
                                                    groups, n_boot, seed)
    summary.update({"method": method, "boxes": decoding or {"box_method": "regions", "box_threshold": localisation.GRAD_CAM_BOX_THRESHOLD, "relative": True},
                    "centre_box_size": list(centre)})

    def redo_map(i: int, image: np.ndarray) -> np.ndarray:
        from fracture.boxes import heatmap

        return heatmap.to_original(maps[i][0], image.shape[0], image.shape[1], contract)

    summary["plots"] = localisation.plots(out, summary, results, paths, probs, redo_map, method)
    return summary, results


def subgroup_columns(table: pd.DataFrame) -> list[str]:
    """Fracture type and the low-cardinality metadata columns (region, view, hardware, ...) worth splitting by."""
    skip = {"path", "label", "line", "group", "group_id", "image", "boxes", "study", "study_id"}
    return [c for c in table.columns if c not in skip and 2 <= table[c].nunique() <= 20]


def subgroups(table: pd.DataFrame, probs: np.ndarray, threshold: float, n_boot: int = 1000, seed: int = 0) -> list[dict[str, Any]]:
    """Sensitivity/specificity/AUROC per fracture type and per low-cardinality metadata column, with bootstrap CIs."""
    rows = []
    labels = table["label"].to_numpy()
    for column in subgroup_columns(table):
        for value, idx in table.groupby(column).indices.items():
            if column == "fracture_type" and str(value).lower() in ("", "none"):
                continue
            idx = np.asarray(idx)
            if column == "fracture_type":  # a type only exists among fractured images: add every negative
                idx = np.union1d(idx, np.flatnonzero(labels == 0))
            p, y = probs[idx], labels[idx]
            m = metrics.binary_metrics(p, y, threshold)
            pos, neg = int(y.sum()), int((y == 0).sum())
            small = pos < SUBGROUP_MIN or neg < SUBGROUP_MIN
            groups = table["group"].to_numpy()[idx] if "group" in table.columns else None  # resampled like the main table
            cis = metrics.bootstrap(p, y, threshold, groups, n_boot, seed) if n_boot else {}
            rows.append({
                "column": column, "value": str(value), "n": int(len(idx)), "fractured": pos, "not_fractured": neg,
                "sensitivity": m["sensitivity"], "specificity": m["specificity"] if column != "fracture_type" else float("nan"),
                "auroc": float("nan") if small else m["auroc"],
                "note": f"too small (needs >= {SUBGROUP_MIN} of each class)" if small else "",
                "ci95": {k: cis.get(k) for k in ("sensitivity", "specificity", "auroc") if cis.get(k) and not (k == "auroc" and small)
                         and not (k == "specificity" and column == "fracture_type")},
            })
    return rows


def study_level(probs: np.ndarray, labels: np.ndarray, studies: np.ndarray, groups: np.ndarray, info: dict[str, Any], n_boot: int,
                seed: int) -> dict[str, Any]:
    """Metrics per study (images with a study key), their probabilities combined as the model says, at every operating
    point; intervals resample whole patient/duplicate groups (a study's group: that of its first image)."""
    meta = ModelMetadata.from_dict(info)  # the one reader of what the model says (a checkpoint's info or an ONNX file's)
    method = meta.study_method
    keyed = studies != ""
    keys, p, y = metrics.aggregate_studies(probs[keyed], studies[keyed], method, labels[keyed])
    first = dict(zip(studies[keyed][::-1], groups[keyed][::-1]))
    study_groups = np.array([first[k] for k in keys])
    out: dict[str, Any] = {"aggregation": method, "studies": int(len(y)), "fractured_studies": int(y.sum()), "images": int(keyed.sum()), "operating_points": {}}
    for name, t in meta.thresholds.items():
        out["operating_points"][name] = {"threshold": t, "metrics": metrics.all_metrics(p, y, t),
                                         "ci95": metrics.bootstrap(p, y, t, study_groups, n_boot, seed)}
    return out


def has_boxes(table: pd.DataFrame) -> bool:
    return "boxes" in table.columns and bool((table["boxes"] != "").any())


def evaluate(probs: np.ndarray, table: pd.DataFrame, info: dict[str, Any], out: Path, root: Path, split: str,
             run_dir: Path | None, n_boot: int = 1000, seed: int = 0, operating_point: str | None = None, maps: Maps = None) -> dict[str, Any]:
    """Compute everything, write metrics.json, plots and report.md; returns the metrics dict."""
    out.mkdir(parents=True, exist_ok=True)
    labels = table["label"].to_numpy()
    groups = table["group"].to_numpy()
    grouped = len(np.unique(groups)) < len(groups)
    thresholds = info["thresholds"]
    result: dict[str, Any] = {
        "source": info["source"], "split": split, "test_split_consulted": split == "test", "root": str(root), "n": int(len(labels)), "fractured": int(labels.sum()),
        "bootstrap": {"resamples": n_boot, "seed": seed, "level": 0.95, "unit": "group" if grouped else "image"},
        "thresholds_chosen_on": "this split: figures at the operating points are optimistic" if split == "val" else "validation split",
        "operating_points": {},
    }
    for name, t in progress(thresholds.items(), desc="bootstrap", min_total=1):
        point = metrics.all_metrics(probs, labels, t)
        cis = metrics.bootstrap(probs, labels, t, groups if grouped else None, n_boot, seed)
        result["operating_points"][name] = {"threshold": t, "metrics": point, "ci95": cis, "confusion": metrics.confusion(probs, labels, t)}
    op = operating_point or ("balanced" if "balanced" in thresholds else "default")
    result["subgroups"] = {"operating_point": op, "rows": subgroups(table, probs, thresholds[op], n_boot, seed)}
    result["plots"] = plots.evaluation_plots(out, probs, labels, thresholds, table["path"].tolist(), run_dir)
    studies = table["study"].to_numpy().astype(str) if "study" in table.columns else np.full(len(labels), "")
    if not (studies != "").any():  # no study column: DICOM files carry their own StudyInstanceUID / PatientID
        from fracture.data.inputs import study_keys

        keys = study_keys([], table["path"].tolist())
        studies = np.array([keys.get(p, "") for p in table["path"]])
    if (studies != "").any() and len(np.unique(studies[studies != ""])) < (studies != "").sum():
        result["study_level"] = study_level(probs, labels, studies, np.asarray(groups).astype(str), info, n_boot, seed)
    split_dir = os.path.abspath(root / split)  # the pairing key: the same split read from another copy of the dataset still pairs
    per_image = pd.DataFrame({"image": [os.path.relpath(os.path.abspath(p), split_dir) for p in table["path"]], "path": table["path"],
                              "label": labels, "group": groups, "probability": probs,
                              **{f"by_{c}": table[c].to_numpy() for c in subgroup_columns(table)}})  # fracture.compare --subgroups
    if maps is not None and has_boxes(table):
        result["localisation"], results = localise(table, probs, maps, info, out, n_boot, seed, groups if grouped else None)
        result["plots"] += result["localisation"].pop("plots")
        per_image = per_image.assign(**localisation.to_columns(results),
                                     **{f"by_{localisation.LESION_SIZE}": localisation.size_thirds(localisation.lesion_sizes(results))})
    per_image.to_csv(out / "predictions.csv", index=False)  # what `fracture.compare` pairs two reports on
    (out / "metrics.json").write_text(json.dumps(result, indent=1, default=float))
    (out / "report.md").write_text(report_md(result, info, table, root))
    return result


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fracture.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", type=Path, help="checkpoint to evaluate (torch)")
    src.add_argument("--onnx", type=Path, help="exported ONNX file to evaluate (onnxruntime)")
    parser.add_argument("--root", type=Path, help="dataset root (default for --ckpt: data.root of the run's config.yaml)")
    parser.add_argument("--split", default="test", help="split to evaluate (default: test, which a recipe should not be chosen on: "
                                                        "a warning says so and metrics.json records it)")
    parser.add_argument("--splits", type=Path, help="a run's splits.csv: evaluate its rows of --split (e.g. --split val: the "
                                                     "validation images a run carved from train); default for --ckpt: the run's own")
    parser.add_argument("--out", type=Path, help="report folder (default: reports/<run or file name>)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--operating-point", help="threshold for the subgroup table (default: balanced)")
    ns = parser.parse_args(args)
    run_dir = ns.ckpt.parent if ns.ckpt else None
    root = ns.root
    if root is None and run_dir and (run_dir / "config.yaml").is_file():
        import yaml

        root = Path(yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["root"])
    if root is None:
        parser.error("--root is needed (no run config to read it from)")
    if ns.split == "test":
        print("warning: scoring the test split. It is for a release's final figure, scored once; compare recipes on validation "
              "(--split val) or folds (python -m fracture.folds). metrics.json records that test was consulted.", file=sys.stderr)
    try:
        table = split_table(root, ns.split, run_columns(run_dir), ns.splits or (run_dir / "splits.csv" if run_dir else None))
        paths = table["path"].tolist()
        want_maps = has_boxes(table)
        probs, info, maps = predict_checkpoint(ns.ckpt, paths, maps=want_maps) if ns.ckpt else predict_onnx(ns.onnx, paths, maps=want_maps)
        out = ns.out or Path("reports") / (run_dir.name if run_dir else ns.onnx.stem)
        evaluate(probs, table, info, out, root, ns.split, run_dir, ns.bootstrap, ns.seed, ns.operating_point, maps)
    except (DatasetError, preprocess.ImageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print((out / "report.md").read_text().split("## Subgroups")[0])
    print(f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
