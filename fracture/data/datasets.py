"""Import public fracture datasets into the standard layout (train/ val/ test/, images/ + annotations.csv).

    python -m fracture.datasets import fracatlas SRC --out data/fracatlas [--drop-defective] [--drop-conflicts]
    python -m fracture.datasets import folders SRC --out data/kaggle
    python -m fracture.datasets import yolo SRC --out data/yolo
    python -m fracture.datasets compact data/fracatlas --out data/fracatlas-224 --size 224

- ``fracatlas``: labels from the ``Fractured``/``Non_fractured`` folders; each
  disagreement with the upstream ``dataset.csv`` is reported; body region,
  hardware, view, multiscan and ``fracture_count`` are kept as metadata, and
  the radiologists' boxes (``Annotations/YOLO/``) become the ``boxes`` column.
- ``folders``: ``{train,val,test}/{fractured,not fractured}/`` and its spelling
  variants (case, ``_``, ``non_fractured``, ``normal``, ``valid`` …); its
  splits are kept.
- ``yolo``: ``images/`` + ``labels/`` (optionally per split); a non-empty label
  file means fractured, its class names become ``fracture_type`` and its boxes
  the ``boxes`` column.

Boxes are written as normalised corners ``x0 y0 x1 y1``, ``;`` between boxes
(see ``fracture.boxes.detection``); images without boxes have an empty cell.

Where the source has no split, images are split deterministically (stratified,
seeded) and exact/near-duplicate groups (see ``fracture.data.audit``) never straddle
splits; the group is written as ``group_id`` so the validation carve-out keeps
them together too. Images are symlinked (default) or copied byte for byte, never
re-encoded. Torch-free.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from fracture.boxes.detection import format_boxes, yolo_to_boxes
from fracture.data.annotations import split_by_group
from fracture.data.duplicates import NEAR_DEFAULT, duplicate_groups, inspect_all
from fracture.data.labels import IMAGE_COLUMNS, find_column, parse_label
from fracture.imaging.preprocess import ImageError, is_image_file, read_image
from fracture.progress import progress

SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "test": "test", "testing": "test"}


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p))


def _child(folder: Path, name: str) -> Path | None:
    """A sub-folder by case-insensitive name."""
    return next((p for p in folder.iterdir() if p.is_dir() and p.name.lower() == name.lower()), None) if folder.is_dir() else None


def _class_label(name: str) -> int | None:
    text = name.lower().replace("_", " ").replace("-", " ")
    return parse_label(text) if text not in ("fractures",) else 1


def read_fracatlas(src: Path) -> tuple[pd.DataFrame, list[str]]:
    """One row per image with label from its folder; returns the table and csv/folder disagreements."""
    images = _child(src, "images") or src
    rows = []
    for folder, label in (("Fractured", 1), ("Non_fractured", 0)):
        sub = _child(images, folder)
        if sub is None:
            raise FileNotFoundError(f"{images}/{folder}/ not found: is {src} a FracAtlas copy?")
        rows += [{"src": str(p), "label": label} for p in _images(sub)]
    table = pd.DataFrame(rows)
    table["image"] = table["src"].map(lambda p: Path(p).name)
    yolo = _child(_child(src, "Annotations") or src, "YOLO")
    if yolo is not None:
        def boxes(row: pd.Series) -> str:
            f = yolo / f"{Path(row['src']).stem}.txt"
            return format_boxes(yolo_to_boxes(f.read_text())) if row["label"] == 1 and f.is_file() else ""

        table["boxes"] = table.apply(boxes, axis=1)
    notes: list[str] = []
    meta_csv = src / "dataset.csv"
    if meta_csv.is_file():
        meta = pd.read_csv(meta_csv, dtype=str).set_index("image_id")
        regions = [c for c in ("hand", "leg", "hip", "shoulder") if c in meta.columns]
        views = [c for c in ("frontal", "lateral", "oblique") if c in meta.columns]
        extra = []
        for name, label in zip(table["image"], table["label"]):
            if name not in meta.index:
                notes.append(f"{name}: not in dataset.csv")
                extra.append({})
                continue
            row = meta.loc[name]
            upstream = parse_label(row.get("fractured", ""))
            if upstream is not None and upstream != label:
                notes.append(f"{name}: dataset.csv says fractured={row['fractured']} but the image is in {'Fractured' if label else 'Non_fractured'}/ (folder kept)")
            hit = [r for r in regions if row[r] == "1"]
            extra.append({
                "region": "mixed" if row.get("mixed") == "1" or len(hit) > 1 else (hit[0] if hit else "unknown"),
                "hardware": row.get("hardware", ""),
                "multiscan": row.get("multiscan", ""),
                "view": "+".join(v for v in views if row[v] == "1") or "unknown",
                "fracture_count": row.get("fracture_count", ""),
            })
        table = pd.concat([table, pd.DataFrame(extra)], axis=1)
    return table, notes


def read_folders(src: Path) -> pd.DataFrame:
    """Kaggle-style ``split/class/`` trees; class folders by any usual spelling."""
    rows = []
    for split_dir in sorted(p for p in src.iterdir() if p.is_dir()):
        split = SPLIT_NAMES.get(split_dir.name.lower())
        if split is None:
            continue
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            label = _class_label(class_dir.name)
            if label is None:
                raise ValueError(f"{class_dir}: cannot tell whether {class_dir.name!r} means fractured or not")
            rows += [{"src": str(p), "label": label, "split": split} for p in _images(class_dir)]
    if not rows:
        raise FileNotFoundError(f"no {{train,val,test}}/{{fractured,not fractured}}/ images under {src}")
    return pd.DataFrame(rows)


def _yolo_names(src: Path) -> list[str]:
    for name in ("classes.txt", "labels.txt", "obj.names"):
        for f in src.rglob(name):
            return [line.strip() for line in f.read_text().splitlines() if line.strip()]
    for f in list(src.glob("*.yaml")) + list(src.glob("*.yml")):
        text = f.read_text()
        inline = re.search(r"^names:\s*\[(.*)\]", text, re.M)
        if inline:
            return [n.strip().strip("'\"") for n in inline.group(1).split(",")]
        block = re.findall(r"^\s+(\d+):\s*(.+)$", text.split("names:", 1)[-1], re.M)
        if block:
            return [n.strip().strip("'\"") for _, n in sorted(block, key=lambda b: int(b[0]))]
    return []


def read_yolo(src: Path) -> pd.DataFrame:
    """``images/[split/]x.jpg`` + ``labels/[split/]x.txt``: non-empty label file = fractured."""
    images_root = _child(src, "images")
    labels_root = _child(src, "labels")
    if images_root is None or labels_root is None:
        raise FileNotFoundError(f"{src} needs images/ and labels/ folders")
    names = _yolo_names(src)
    rows = []
    for img in _images(images_root):
        rel = img.relative_to(images_root)
        label_file = labels_root / rel.with_suffix(".txt")
        classes, boxes = [], []
        if label_file.is_file():
            text = label_file.read_text()
            classes = sorted({int(float(line.split()[0])) for line in text.splitlines() if line.strip()})
            boxes = yolo_to_boxes(text)
        split = SPLIT_NAMES.get(rel.parts[0].lower()) if len(rel.parts) > 1 else None
        kinds = [names[c] if c < len(names) else f"class_{c}" for c in classes]
        rows.append({"src": str(img), "label": int(bool(classes)), "fracture_type": ",".join(kinds) or "none", "split": split, "boxes": format_boxes(boxes)})
    if not rows:
        raise FileNotFoundError(f"no images under {images_root}")
    table = pd.DataFrame(rows)
    return table if table["split"].notna().all() else table.drop(columns=["split"])


def assign_splits(table: pd.DataFrame, test_fraction: float, val_fraction: float, seed: int) -> pd.DataFrame:
    """Stratified, grouped, seeded split of a table with ``group`` and ``label`` columns."""
    rest, test = split_by_group(table, test_fraction, seed)
    parts = {"test": test}
    if val_fraction > 0:
        rest, val = split_by_group(rest, val_fraction / (1 - test_fraction), seed + 1)
        parts["val"] = val
    parts["train"] = rest
    return pd.concat([t.assign(split=s) for s, t in parts.items()], ignore_index=True)


def write_layout(table: pd.DataFrame, out: Path, copy: bool = False) -> dict[str, int]:
    """Write ``out/<split>/images/`` (symlinks or byte copies) and ``annotations.csv``."""
    counts = {}
    meta_cols = [c for c in table.columns if c not in ("src", "label", "split", "group", "image")]
    for split, rows in table.groupby("split"):
        images = out / split / "images"
        images.mkdir(parents=True, exist_ok=True)
        records, used = [], set()
        for _, row in rows.iterrows():
            name = Path(row["src"]).name
            if name in used:
                name = f"{len(used):06d}_{name}"
            used.add(name)
            target = images / name
            if target.exists() or target.is_symlink():
                target.unlink()
            if copy:
                shutil.copyfile(row["src"], target)
            else:
                os.symlink(os.path.abspath(row["src"]), target)
            records.append({"image": name, "fracture": int(row["label"]), "group_id": row["group"], **{c: row[c] for c in meta_cols}})
        with open(out / split / "annotations.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
        counts[str(split)] = len(records)
    return counts


def import_dataset(kind: str, src: str | os.PathLike, out: str | os.PathLike, *, copy: bool = False, test_fraction: float = 0.2, val_fraction: float = 0.0,
                   seed: int = 0, drop_defective: bool = False, drop_conflicts: bool = False, near: float = NEAR_DEFAULT) -> dict:
    """Import ``src`` of ``kind`` into ``out``; returns the import report (also written to out/import_report.json)."""
    src, out = Path(src), Path(out)
    notes: list[str] = []
    if kind == "fracatlas":
        table, notes = read_fracatlas(src)
    elif kind == "folders":
        table = read_folders(src)
    elif kind == "yolo":
        table = read_yolo(src)
    else:
        raise ValueError(f"unknown dataset kind {kind!r}; use fracatlas, folders or yolo")
    facts, thumbs = inspect_all(table["src"].tolist(), desc="inspect")
    groups, _ = duplicate_groups([f.sha256 for f in facts], thumbs, near)
    table["group"] = [f"dup{g:06d}" for g in groups]
    report: dict = {"kind": kind, "source": str(src), "images_found": int(len(table)), "label_disagreements": notes}
    defective = [f.problem for f in facts]
    report["defective"] = [{"path": f.path, "problem": f.problem} for f in facts if f.problem]
    conflict = table.groupby("group")["label"].transform("nunique") > 1
    report["conflicting_duplicate_images"] = int(conflict.sum())
    keep = np.ones(len(table), bool)
    if drop_defective:
        keep &= np.array([not p for p in defective])
    if drop_conflicts:
        keep &= ~conflict.to_numpy()
    report["dropped"] = int((~keep).sum())
    table = table[keep].reset_index(drop=True)
    if "split" not in table.columns:
        table = assign_splits(table, test_fraction, val_fraction, seed)
        report["split"] = {"test_fraction": test_fraction, "val_fraction": val_fraction, "seed": seed, "grouped_by": "exact/near-duplicate groups"}
    else:
        report["split"] = "kept from the source"
    report["written"] = write_layout(table, out, copy)
    report["fractured"] = {s: int(t["label"].sum()) for s, t in table.groupby("split")}
    (out / "import_report.json").write_text(json.dumps(report, indent=1))
    return report


def compact_dataset(src: str | os.PathLike, out: str | os.PathLike, size: int = 224, quality: int = 90) -> dict[str, int]:
    """A small copy for a machine with little room (a lent GPU): each image decoded by ``fracture.imaging.preprocess``,
    shrunk to ``size`` px on its longest side (aspect kept, never enlarged) and written as JPEG; each split's
    ``annotations.csv`` is copied with its image column pointing at the new files. Boxes are normalised, so
    they still fit. Returns images per split."""
    src, out = Path(src), Path(out)
    counts = {}
    for csv_path in sorted(src.glob("*/annotations.csv")):
        split = csv_path.parent.name
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
        column = find_column(list(table.columns), IMAGE_COLUMNS)
        if column is None:
            raise ValueError(f"{csv_path}: no image column (one of {', '.join(IMAGE_COLUMNS)})")
        (out / split / "images").mkdir(parents=True, exist_ok=True)
        names = []
        for name in progress(table[column], desc=split):
            img = read_image(csv_path.parent / "images" / name)
            scale = min(1.0, size / max(img.shape))
            small = cv2.resize(img, (max(1, round(img.shape[1] * scale)), max(1, round(img.shape[0] * scale))), interpolation=cv2.INTER_AREA)
            target = str(Path(name).with_suffix(".jpg"))
            (out / split / "images" / target).parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(out / split / "images" / target), small, [cv2.IMWRITE_JPEG_QUALITY, quality])
            names.append(target)
        table[column] = names
        table.to_csv(out / split / "annotations.csv", index=False)
        counts[split] = len(table)
    if not counts:
        raise FileNotFoundError(f"{src}: no <split>/annotations.csv")
    return counts


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fracture.datasets", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="import a dataset into the standard layout")
    imp.add_argument("kind", choices=["fracatlas", "folders", "yolo"])
    imp.add_argument("src", type=Path)
    imp.add_argument("--out", type=Path, required=True)
    imp.add_argument("--copy", action="store_true", help="copy image bytes instead of symlinking")
    imp.add_argument("--test-fraction", type=float, default=0.2, help="when the source has no split (default 0.2)")
    imp.add_argument("--val-fraction", type=float, default=0.0, help="also write val/ (default: none; fit carves it from train)")
    imp.add_argument("--seed", type=int, default=0)
    imp.add_argument("--drop-defective", action="store_true", help="leave out unreadable, truncated and partly decoding images")
    imp.add_argument("--drop-conflicts", action="store_true", help="leave out duplicate groups whose labels disagree")
    imp.add_argument("--near", type=float, default=NEAR_DEFAULT, help="thumbnail correlation for near duplicates")
    small = sub.add_parser("compact", help="a small JPEG copy of a dataset in the standard layout (for a lent GPU with little room)")
    small.add_argument("src", type=Path)
    small.add_argument("--out", type=Path, required=True)
    small.add_argument("--size", type=int, default=224, help="longest side in px (default 224: the training size)")
    small.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    ns = parser.parse_args(args)
    if ns.command == "compact":
        try:
            counts = compact_dataset(ns.src, ns.out, ns.size, ns.quality)
        except (FileNotFoundError, ValueError, ImageError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        mib = sum(f.stat().st_size for f in ns.out.rglob("*") if f.is_file()) / 2**20
        print(f"wrote {ns.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + f" images, {mib:.1f} MiB")
        return 0
    try:
        report = import_dataset(ns.kind, ns.src, ns.out, copy=ns.copy, test_fraction=ns.test_fraction, val_fraction=ns.val_fraction, seed=ns.seed,
                                drop_defective=ns.drop_defective, drop_conflicts=ns.drop_conflicts, near=ns.near)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for note in report["label_disagreements"]:
        print(f"label disagreement: {note}")
    print(f"{len(report['defective'])} defective image(s){' (dropped)' if ns.drop_defective else ''}; "
          f"{report['conflicting_duplicate_images']} image(s) in duplicate groups with conflicting labels{' (dropped)' if ns.drop_conflicts else ''}")
    print(f"wrote {ns.out}: " + ", ".join(f"{s} {n} ({report['fractured'][s]} fractured)" for s, n in report["written"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
