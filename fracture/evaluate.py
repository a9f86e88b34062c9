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
baseline (see ``fracture.localisation``), plus ``froc.png`` and
``localisation_examples.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fracture import detection, localisation, metrics, plots, preprocess
from fracture.annotations import Columns, DatasetError, read_split
from fracture.progress import progress

SUBGROUP_MIN = 10  # positives and negatives needed before a subgroup AUROC is worth printing
CAVEAT = "Research tool, not a medical device: these figures do not show fitness for clinical use."


Maps = list[tuple[np.ndarray, tuple[int, int]]] | None  # each image's low-res map and its original (height, width)


def predict_checkpoint(ckpt: Path, paths: list[str], batch: int = 32, maps: bool = False) -> tuple[np.ndarray, dict[str, Any], Maps]:
    """Probabilities from a checkpoint (torch, eval mode), its deployment info, and with ``maps`` its low-res maps (with sizes).

    The maps are a ``localise`` model's fracture map, or a ``classify`` model's Grad-CAM.
    """
    import torch

    from fracture.explain import grad_cam
    from fracture.checkpoint import load_classifier

    model = load_classifier(ckpt)
    out, found, sizes = [], [], []
    for i in progress(range(0, len(paths), batch), desc="predict"):
        x, chunk_sizes = preprocess.load_batch_with_sizes(paths[i : i + batch], model.contract)
        x = torch.from_numpy(x)
        sizes += chunk_sizes
        if model.localise:
            with torch.inference_mode():
                p, m = model.probabilities_and_maps(x)
        elif maps:
            p, m = grad_cam(model.net, x)
            with torch.inference_mode():
                p = torch.sigmoid(model(x))  # with mirror TTA when the model uses it
        else:
            with torch.inference_mode():
                p, m = torch.sigmoid(model(x)), None
        out.append(p.numpy())
        if m is not None:
            found += list(m.numpy())
    info = model.deployment_info() | {"arch": model.spec.name, "source": str(ckpt)}
    return np.concatenate(out).astype(np.float64), info, list(zip(found, sizes)) if maps else None


def predict_onnx(path: Path, paths: list[str], maps: bool = False) -> tuple[np.ndarray, dict[str, Any], Maps]:
    from fracture.predict import Predictor

    predictor = Predictor(path)
    want = maps and predictor.has_heatmap
    rows = list(predictor.predict(paths, keep_maps=want))
    failed = [r for r in rows if r.error]
    if failed:
        raise DatasetError(f"{len(failed)} image(s) could not be read, e.g. {failed[0].error}")
    return np.array([r.probability for r in rows]), predictor.metadata | {"source": str(path)}, [(r.raw_map, r.size) for r in rows] if want else None


def localise(table: pd.DataFrame, probs: np.ndarray, maps: list[tuple[np.ndarray, tuple[int, int]]], info: dict[str, Any], out: Path, n_boot: int, seed: int,
             groups: np.ndarray | None) -> tuple[dict[str, Any], list[localisation.ImageResult]]:
    """Score the maps against the split's boxes (``fracture.localisation``); returns the summary with plot names, and each image's result."""
    contract = preprocess.Contract.from_dict(info["contract"])
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
        from fracture import heatmap

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


def study_level(probs: np.ndarray, labels: np.ndarray, studies: np.ndarray, groups: np.ndarray, info: dict[str, Any], n_boot: int,
                seed: int) -> dict[str, Any]:
    """Metrics per study (images with a study key), their probabilities combined as the model says, at every operating
    point; intervals resample whole patient/duplicate groups (a study's group: that of its first image)."""
    method = info.get("study_aggregation", {}).get("method", "max")
    keyed = studies != ""
    keys, p, y = metrics.aggregate_studies(probs[keyed], studies[keyed], method, labels[keyed])
    first = dict(zip(studies[keyed][::-1], groups[keyed][::-1]))
    study_groups = np.array([first[k] for k in keys])
    out: dict[str, Any] = {"aggregation": method, "studies": int(len(y)), "fractured_studies": int(y.sum()), "images": int(keyed.sum()), "operating_points": {}}
    for name, t in info["thresholds"].items():
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
        from fracture.predict import study_keys

        keys = study_keys([], table["path"].tolist())
        studies = np.array([keys.get(p, "") for p in table["path"]])
    if (studies != "").any() and len(np.unique(studies[studies != ""])) < (studies != "").sum():
        result["study_level"] = study_level(probs, labels, studies, np.asarray(groups).astype(str), info, n_boot, seed)
    split_dir = os.path.abspath(root / split)  # the pairing key: the same split read from another copy of the dataset still pairs
    per_image = pd.DataFrame({"image": [os.path.relpath(os.path.abspath(p), split_dir) for p in table["path"]], "path": table["path"],
                              "label": labels, "group": groups, "probability": probs})
    if maps is not None and has_boxes(table):
        result["localisation"], results = localise(table, probs, maps, info, out, n_boot, seed, groups if grouped else None)
        result["plots"] += result["localisation"].pop("plots")
        per_image = per_image.assign(**localisation.to_columns(results))
    per_image.to_csv(out / "predictions.csv", index=False)  # what `fracture.compare` pairs two reports on
    (out / "metrics.json").write_text(json.dumps(result, indent=1, default=float))
    (out / "report.md").write_text(report_md(result, info, table, root))
    return result


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


def describe_boxes(params: dict[str, Any]) -> str:
    """The box decoding in words, for the report."""
    if params.get("box_method") == "peaks":
        w, h = params["box_size"]
        return (f"up to {params['max_boxes']} per image, centred on the map's local maxima above {params['box_threshold']:.2f}, "
                f"{w:.3f} x {h:.3f} of the input (the median validation box)")
    kind = "of each map's maximum" if params.get("relative") else "probability"
    return f"regions above {params['box_threshold']:.2f} {kind}, at least {params.get('min_area_fraction', 0.0):g} of the input"


def describe_display(loc: dict[str, Any]) -> str:
    if "shown_boxes" not in loc:
        return ""
    return (f"; {loc['shown_boxes']} of them shown to a reader (score above {loc['boxes']['display_threshold']:.2f}, "
            f"at most {detection.DISPLAY_FP_RATE:g} false box per image on validation)")


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


def run_columns(run_dir: Path | None) -> Columns | None:
    """The run's ``data.columns`` mapping (from its config.yaml), so evaluation reads the columns training read."""
    config = run_dir / "config.yaml" if run_dir else None
    if config is None or not config.is_file():
        return None
    import yaml

    given = (yaml.safe_load(config.read_text()).get("data") or {}).get("columns") or {}
    return Columns(**{k: v for k, v in given.items() if k in Columns.__dataclass_fields__ and v})


def validation_items(model: Any, ckpt: Path, root: Path, batch: int = 16, parts: bool = False) -> list[tuple]:
    """(label, (map-pooled, joint) logits, map, true boxes in input pixels) per validation image of a localise
    model's run, as training keeps them (``FractureClassifier.val_maps``), so its choices can be made again.

    ``parts``: the logits are every image logit the network's ``forward_parts`` gives (a localiser with a
    classifier: map-pooled, joint and the classifier's), so choices at two levels come from one pass."""
    import torch

    from fracture.checkpoint import CheckpointError, run_split

    found = run_split(ckpt, "val")
    if found is None:
        raise CheckpointError(f"{ckpt.parent / 'splits.csv'} is missing or lists no validation split")
    columns = run_columns(ckpt.parent)
    tables = [read_split(root / s, columns) for s in ("train", "val") if (root / s / "annotations.csv").is_file()]
    table = pd.concat(tables).set_index("path") if tables else pd.DataFrame()
    if "boxes" not in table.columns:
        raise DatasetError(f"{root}: no boxes column in its annotations: the box decoding is chosen on the validation boxes")
    paths, labels = found
    missing = [p for p in paths if p not in table.index]
    if missing:
        raise DatasetError(f"{len(missing)} validation images of the run are not in {root}'s annotations (e.g. {missing[0]}); pass the run's --root")
    net = model.evaluation_net
    items = []
    for i in progress(range(0, len(paths), batch), desc="validate"):
        chunk = paths[i : i + batch]
        x, chunk_sizes = preprocess.load_batch_with_sizes(chunk, model.contract)
        with torch.inference_mode():
            *logits, maps = (net.forward_parts if parts else net.forward_maps)(torch.from_numpy(x))
        for j, (path, (h, w)) in enumerate(zip(chunk, chunk_sizes)):
            truth = detection.to_input(detection.parse_boxes(table.loc[path, "boxes"]), h, w, model.contract)
            items.append((int(labels[i + j]), tuple(float(lg[j]) for lg in logits), torch.sigmoid(maps[j]).numpy(), truth))
    return items


def split_table(root: Path, split: str, columns: Columns | None, splits: Path | None) -> pd.DataFrame:
    """The annotations of ``root/split``; a split with no folder (validation carved from train) is read from
    train's (and val's) annotations, restricted to the rows ``splits`` (a run's splits.csv) lists for it."""
    if (root / split / "annotations.csv").is_file() or splits is None or not splits.is_file():
        return read_split(root / split, columns)
    listed = pd.read_csv(splits, keep_default_na=False)
    wanted = listed.loc[listed["split"] == split, "path"].map(os.path.abspath).tolist()
    tables = [read_split(root / s, columns) for s in ("train", "val") if (root / s / "annotations.csv").is_file()]
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["path"])
    table = table.set_index(table["path"].map(os.path.abspath))
    missing = [p for p in wanted if p not in table.index]
    if not wanted or missing:
        raise DatasetError(f"{splits}: {len(missing) if wanted else 'no'} {split} image(s) not in {root}'s annotations"
                           + (f" (e.g. {missing[0]})" if missing else ""))
    return table.loc[wanted].reset_index(drop=True)


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
    except Exception as exc:
        from fracture.checkpoint import CheckpointError
        from fracture.predict import ModelError

        if isinstance(exc, (CheckpointError, ModelError)):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise
    print((out / "report.md").read_text().split("## Subgroups")[0])
    print(f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
