"""Find what makes fracture numbers lie: broken files, duplicates across splits, label conflicts, shortcuts.

    python -m fracture.audit ROOT [--out audit.json] [--allow] [--near 0.97]

Checks every image of every split of a dataset root:
- unreadable, zero-size or undecodable files, and truncated JPEGs (no
  end-of-image marker), with the uniform band a partial decode leaves at the bottom;
- exact duplicates (sha256 of the bytes) and near duplicates: Pearson
  correlation >= ``--near`` (default 0.97) between 32x32 grayscale thumbnails,
  which survives re-encoding, resizing and small exposure changes;
- duplicate groups whose labels conflict, and groups that straddle splits;
- shortcuts: label rate by image size, orientation and bit depth, and metadata
  columns whose values predict the label on their own;
- class balance per split.

Exits 1 when a test image has an (near) duplicate in train or val, or when
duplicate groups carry conflicting labels, unless ``--allow``. Torch-free.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from fracture.data.annotations import SPLITS, read_split, shared_groups
from fracture.data.duplicates import NEAR_DEFAULT, duplicate_groups, inspect_all
from fracture.scoring import metrics


def _rate_table(labels: np.ndarray, keys: pd.Series, min_count: int = 10) -> list[dict]:
    rows = []
    for value, idx in keys.groupby(keys).groups.items():
        y = labels[np.asarray(idx)]
        rows.append({"value": str(value), "n": int(len(y)), "fractured_rate": float(y.mean()) if len(y) else float("nan"), "small": bool(len(y) < min_count)})
    return sorted(rows, key=lambda r: -r["n"])


def shortcut_warnings(table: pd.DataFrame, facts: pd.DataFrame, min_auroc: float = 0.7) -> dict:
    """Label rate by geometry/bit depth; metadata columns that separate the classes on their own."""
    labels = table["label"].to_numpy()
    geometry = {
        "orientation": np.where(facts["height"] > facts["width"], "portrait", np.where(facts["height"] < facts["width"], "landscape", "square")),
        "size": facts["width"].astype(str) + "x" + facts["height"].astype(str),
        "bit_depth": facts["bit_depth"].astype(str),
    }
    out: dict = {"by": {}, "warnings": []}
    candidates = {k: pd.Series(v) for k, v in geometry.items()}
    skip = {"path", "label", "line", "group", "fracture_type", "split", "fracture_count", "boxes", "study"}
    for column in table.columns:
        if column not in skip and table[column].nunique() <= 20:
            candidates[f"metadata:{column}"] = table[column].astype(str).reset_index(drop=True)
    for name, keys in candidates.items():
        if keys.nunique() < 2 or keys.nunique() > 50:
            continue
        rates = _rate_table(labels, keys)
        score = keys.map({r["value"]: r["fractured_rate"] for r in rates}).to_numpy(float)
        auc = metrics.auroc(score, labels)
        out["by"][name] = {"auroc_alone": auc, "values": rates[:12]}
        if auc >= min_auroc:
            out["warnings"].append(f"{name} alone separates the classes (AUROC {auc:.2f}): a model can learn it instead of the fracture")
        overall = float(labels.mean())
        for r in rates:
            # a rare value can be a near-perfect label proxy without moving the AUROC much (surgical hardware)
            if r["n"] >= 10 and abs(r["fractured_rate"] - overall) >= 0.5:
                out["warnings"].append(f"{name}={r['value']}: {r['fractured_rate']:.0%} fractured over {r['n']} images vs {overall:.0%} overall")
    return out


def audit(root: str | os.PathLike, near: float = NEAR_DEFAULT) -> dict:
    """Audit every split of a dataset root; returns the report written to audit.json."""
    root = Path(root)
    tables = {s: read_split(root / s) for s in SPLITS if (root / s / "annotations.csv").is_file()}
    if not tables:
        raise FileNotFoundError(f"no <split>/annotations.csv under {root}")
    table = pd.concat([t.assign(split=s) for s, t in tables.items()], ignore_index=True)
    facts_list, thumbs = inspect_all(table["path"].tolist())
    facts = pd.DataFrame([asdict(f) for f in facts_list])
    groups, pairs = duplicate_groups(facts["sha256"].tolist(), thumbs, near)
    table["dup_group"] = groups
    report: dict = {"root": str(root), "near_threshold": near, "images": int(len(table))}
    report["balance"] = {s: {"images": int(len(t)), "fractured": int(t["label"].sum()), "not_fractured": int((t["label"] == 0).sum())} for s, t in tables.items()}
    report["defective"] = [{"path": f.path, "split": s, "problem": f.problem} for f, s in zip(facts_list, table["split"]) if f.problem]
    dup_groups = []
    for gid, members in table.groupby("dup_group"):
        if len(members) < 2:
            continue
        dup_groups.append({
            "members": [{"path": p, "split": s, "label": int(lbl)} for p, s, lbl in zip(members["path"], members["split"], members["label"])],
            "kinds": sorted({k for i, j, k, _ in pairs if groups[i] == gid}),
            "conflicting_labels": bool(members["label"].nunique() > 1),
            "splits": sorted(members["split"].unique()),
        })
    report["duplicate_groups"] = dup_groups
    report["exact_pairs"] = sum(1 for p in pairs if p[2] == "exact")
    report["near_pairs"] = sum(1 for p in pairs if p[2] == "near")
    report["conflicting_groups"] = sum(g["conflicting_labels"] for g in dup_groups)
    report["test_leaks"] = sum(1 for g in dup_groups if "test" in g["splits"] and len(g["splits"]) > 1)
    report["cross_split_groups"] = sum(1 for g in dup_groups if len(g["splits"]) > 1)
    report["shortcuts"] = shortcut_warnings(table, facts)
    report["shared_patient_groups"] = shared_groups(tables)
    return report


def summary(report: dict) -> str:
    lines = [f"audit of {report['root']}: {report['images']} images"]
    for split, b in report["balance"].items():
        lines.append(f"  {split:<6} {b['images']:>6} images  {b['fractured']:>6} fractured ({b['fractured'] / max(b['images'], 1):.1%})")
    lines.append(f"defective files: {len(report['defective'])}")
    for d in report["defective"][:10]:
        lines.append(f"  {d['split']}: {d['path']}: {d['problem']}")
    if len(report["defective"]) > 10:
        lines.append(f"  … and {len(report['defective']) - 10} more (see audit.json)")
    lines.append(
        f"duplicates: {len(report['duplicate_groups'])} groups ({report['exact_pairs']} exact, {report['near_pairs']} near pairs at r >= {report['near_threshold']}); "
        f"{report['cross_split_groups']} straddle splits, {report['test_leaks']} put a test image next to a train/val one; "
        f"{report['conflicting_groups']} carry conflicting labels"
    )
    for g in [g for g in report["duplicate_groups"] if g["conflicting_labels"] or "test" in g["splits"] and len(g["splits"]) > 1][:10]:
        lines.append("  " + "  |  ".join(f"{Path(m['path']).name} ({m['split']}, label {m['label']})" for m in g["members"][:4]))
    shared = report.get("shared_patient_groups", [])
    lines.append(f"patient/group ids in more than one split: {len(shared)}")
    lines += [f"  {s}" for s in shared[:10]]
    lines.append("shortcut checks (AUROC of the attribute alone):")
    for name, info in report["shortcuts"]["by"].items():
        lines.append(f"  {name:<28} {info['auroc_alone']:.2f}")
    for w in report["shortcuts"]["warnings"]:
        lines.append(f"  warning: {w}")
    return "\n".join(lines)


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fracture.audit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="dataset root with train/ test/ [val/]")
    parser.add_argument("--out", type=Path, help="report file (default: ROOT/audit.json)")
    parser.add_argument("--near", type=float, default=NEAR_DEFAULT, help=f"thumbnail correlation for near duplicates (default {NEAR_DEFAULT})")
    parser.add_argument("--allow", action="store_true", help="exit 0 even with leakage or conflicting labels")
    ns = parser.parse_args(args)
    from fracture.data.annotations import DatasetError

    try:
        report = audit(ns.root, ns.near)
    except (DatasetError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = ns.out or Path(ns.root) / "audit.json"
    out.write_text(json.dumps(report, indent=1))
    print(summary(report))
    print(f"report: {out}")
    bad = report["test_leaks"] or report["conflicting_groups"] or report["shared_patient_groups"]
    if bad and not ns.allow:
        print("FAILED: a patient/group id or a (near) duplicate of a test image sits in another split, or labels conflict; fix the splits or pass --allow",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
