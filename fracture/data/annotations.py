"""Read, validate and split ``annotations.csv`` tables (torch-free).

A dataset root holds ``train/``, ``test/`` and optionally ``val/``; each split
is ``images/`` plus ``annotations.csv``. Everything wrong with a dataset is
found here, before any training starts, and reported as one
:class:`DatasetError` naming the file, the first offending rows and the fix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fracture.boxes.detection import format_boxes, parse_boxes
from fracture.data.duplicates import duplicate_groups, inspect_all, same_radiograph
from fracture.data.labels import BOX_COLUMNS, GROUP_COLUMNS, IMAGE_COLUMNS, LABEL_COLUMNS, STUDY_COLUMNS, TYPE_COLUMNS, find_column, parse_label

SPLITS = ("train", "val", "test")
_SHOW = 5  # offending rows quoted in an error


class DatasetError(Exception):
    """A dataset problem the user must fix; printed without a traceback."""


@dataclass
class Columns:
    """Column names in annotations.csv; ``None`` means auto-detect from the usual names.

    Args:
        image: image path relative to the split's ``images/`` folder.
        label: fracture label (0/1, yes/no, true/false, fractured/not fractured).
        fracture_type: optional fracture type (kept for subgroup reports).
        group: optional patient/group id; a group never straddles train and val.
        boxes: optional fracture boxes, normalised corners ``x0 y0 x1 y1`` separated by ``;``.
        study: optional study id: the images of one study are one clinical question (study-level answers).
    """

    image: str | None = None
    label: str | None = None
    fracture_type: str | None = None
    group: str | None = None
    boxes: str | None = None
    study: str | None = None


def _rows(lines: list[int]) -> str:
    shown = ", ".join(str(n) for n in lines[:_SHOW])
    return shown + (f" (and {len(lines) - _SHOW} more)" if len(lines) > _SHOW else "")


def _pick(table: pd.DataFrame, given: str | None, candidates: tuple[str, ...], what: str, csv: Path, required: bool) -> str | None:
    if given is not None:
        if given not in table.columns:
            raise DatasetError(f"{csv}: no column {given!r} for the {what} (columns: {', '.join(table.columns)})")
        return given
    found = find_column(list(table.columns), candidates)
    if found is None and required:
        raise DatasetError(
            f"{csv}: cannot find the {what} column among {', '.join(map(repr, table.columns))}; "
            f"name it one of {', '.join(candidates)} or set it in the config (data.columns)"
        )
    return found


def read_split(split_dir: str | os.PathLike, columns: Columns | None = None) -> pd.DataFrame:
    """Read and validate one split.

    Returns a table with ``path`` (absolute), ``label`` (0/1), ``fracture_type``,
    ``group`` and ``line`` (CSV line number) plus every other column as metadata.
    """
    columns = columns or Columns()
    split_dir = Path(split_dir)
    csv = split_dir / "annotations.csv"
    images = Path(os.path.abspath(split_dir / "images"))
    if not csv.is_file():
        raise DatasetError(f"missing {csv}")
    try:
        table = pd.read_csv(csv, dtype=str, keep_default_na=False, encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{csv}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except pd.errors.EmptyDataError:
        raise DatasetError(f"{csv}: empty file; expected a header and one row per image") from None
    except pd.errors.ParserError as exc:
        raise DatasetError(f"{csv}: malformed CSV ({exc})") from None
    if table.empty:
        raise DatasetError(f"{csv}: has a header but no rows")
    image_col = _pick(table, columns.image, IMAGE_COLUMNS, "image", csv, True)
    label_col = _pick(table, columns.label, LABEL_COLUMNS, "fracture label", csv, True)
    type_col = _pick(table, columns.fracture_type, TYPE_COLUMNS, "fracture type", csv, False)
    group_col = _pick(table, columns.group, GROUP_COLUMNS, "patient/group", csv, False)
    box_col = _pick(table, columns.boxes, BOX_COLUMNS, "boxes", csv, False)
    study_col = _pick(table, columns.study, STUDY_COLUMNS, "study", csv, False)
    lines = np.arange(len(table)) + 2  # header is line 1

    labels = table[label_col].map(parse_label)
    bad = labels.isna().to_numpy()
    if bad.any():
        examples = "; ".join(f"line {n}: {v!r}" for n, v in zip(lines[bad][:_SHOW], table[label_col][bad][:_SHOW]))
        raise DatasetError(
            f"{csv}: {bad.sum()} label(s) in column {label_col!r} are not one of 0/1, yes/no, true/false, "
            f"fractured/not fractured: {examples}"
        )

    names = table[image_col].str.strip()
    dup = names.duplicated(keep=False).to_numpy()
    if dup.any():
        raise DatasetError(f"{csv}: the same image is listed more than once, lines {_rows(list(lines[dup]))}")
    paths, outside, missing = [], [], []
    for name, line in zip(names, lines):
        # normpath, not resolve: `..` cannot escape, while symlinks the user placed in images/ stay usable
        path = Path(os.path.normpath(images / name))
        if not name or Path(name).is_absolute() or not path.is_relative_to(images):
            outside.append(f"line {line}: {name!r}")
        elif not path.is_file():
            missing.append(f"line {line}: {name}")
        paths.append(str(path))
    if outside:
        raise DatasetError(f"{csv}: image paths must stay inside {images}: {_rows(outside)}")
    if missing:
        raise DatasetError(f"{csv}: {len(missing)} image(s) do not exist under {images}: {_rows(missing)}")

    boxes = []
    if box_col:
        bad_boxes = []
        for text, line, label in zip(table[box_col], lines, labels):
            try:
                found = parse_boxes(text)
            except ValueError as exc:
                bad_boxes.append(f"line {line}: {exc}")
                found = []
            if found and label == 0:
                bad_boxes.append(f"line {line}: a not-fractured image with fracture boxes")
            boxes.append(format_boxes(found))
        if bad_boxes:
            raise DatasetError(f"{csv}: {len(bad_boxes)} bad value(s) in column {box_col!r}: {_rows(bad_boxes)}")

    out = table.drop(columns=[c for c in (image_col, label_col, type_col, group_col, box_col, study_col) if c])
    out.insert(0, "path", paths)
    out.insert(1, "label", labels.astype(int).to_numpy())
    out.insert(2, "fracture_type", table[type_col].str.strip().to_numpy() if type_col else "")
    groups = table[group_col].str.strip() if group_col else names
    out.insert(3, "group", groups.where(groups != "", names).to_numpy())
    out.insert(4, "line", lines)
    out.insert(5, "boxes", boxes or [""] * len(out))
    out.insert(6, "study", table[study_col].str.strip().to_numpy() if study_col else "")
    out = out.reset_index(drop=True)
    out.attrs["group_column"] = group_col
    return out


def shared_groups(tables: dict[str, pd.DataFrame]) -> list[str]:
    """Patient/group ids (from a group column) that appear in more than one supplied split: leakage by patient."""
    owner: dict[str, str] = {}
    shared = []
    for split, table in tables.items():
        if not table.attrs.get("group_column"):
            continue
        for group in table["group"].unique():
            if group in owner and owner[group] != split:
                shared.append(f"{table.attrs['group_column']} {group!r} is in {owner[group]} and {split}")
            owner.setdefault(group, split)
    return shared


def find_duplicates(tables: dict[str, pd.DataFrame]) -> tuple[list[str], list[tuple[str, str, str]]]:
    """Exact and near-duplicate images (``fracture.data.duplicates``) over every split: their group goes into a
    ``duplicate_group`` column, and into ``group`` where no patient/group column was given, so copies of one
    radiograph stay on one side of the validation carve-out and resample together.
    Returns empty files and the pairs found as (path, path, "exact" | "near")."""
    paths = [p for t in tables.values() for p in t["path"]]
    facts, thumbs = inspect_all(paths, desc="duplicates")
    groups, pairs = duplicate_groups([f.sha256 for f in facts], thumbs)
    start = 0
    for table in tables.values():
        n = len(table)
        table["duplicate_group"] = [f"dup{g:06d}" for g in groups[start : start + n]]
        if not table.attrs.get("group_column"):
            table["group"] = table["duplicate_group"]
        start += n
    empty = [f"{f.path}: zero-size file" for f in facts if f.problem == "zero-size file"]
    return empty, [(paths[i], paths[j], kind) for i, j, kind, _ in pairs]


def merge_groups(table: pd.DataFrame) -> pd.Series:
    """``group`` joined with ``duplicate_group``: images linked by a patient id or by being copies of one radiograph
    form one group (named by its first patient/group id), so a carve-out cannot put two copies on two sides."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for g, d in zip(table["group"], table["duplicate_group"]):
        a, b = find("g:" + g), find("d:" + d)
        if a != b:
            parent[b if a.startswith("g:") else a] = a if a.startswith("g:") else b
    return pd.Series([find("g:" + g)[2:] for g in table["group"]], index=table.index)


def straddling_copies(tables: dict[str, pd.DataFrame], pairs: list[tuple[str, str, str]]) -> tuple[list[str], list[str]]:
    """Pairs of one radiograph's copies in two splits, each named with its files, splits and CSV lines: (copies,
    similar). Exact copies and near ones that ``fracture.data.duplicates.same_radiograph`` confirms are copies (a copy
    in train of a test image is memorised, not generalised from); near pairs it does not confirm (two exposures
    of one limb, perhaps one patient) are only reported."""
    where = {p: (s, line) for s, t in tables.items() for p, line in zip(t["path"], t["line"])}
    copies, similar = [], []
    for a, b, kind in pairs:
        if where[a][0] == where[b][0]:
            continue
        text = " ~ ".join(f"{Path(p).name} ({where[p][0]}, line {where[p][1]})" for p in (a, b))
        (copies if kind == "exact" or same_radiograph(a, b) else similar).append(text)
    return copies, similar


def require_both_classes(table: pd.DataFrame, where: str) -> None:
    counts = np.bincount(table["label"].to_numpy(), minlength=2)
    if counts.sum() == 0:
        raise DatasetError(f"{where}: no images")
    if counts.min() == 0:
        present = "fractured" if counts[1] else "not fractured"
        raise DatasetError(f"{where}: only {present} images ({counts.max()}); training needs both classes")


def split_by_group(table: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Carve ``fraction`` of the images off as a held-out part, stratified by label, whole groups only.

    A group's stratum is its majority label. Reproducible from ``seed``.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    group_label = table.groupby("group", sort=True)["label"].mean().round().astype(int)
    group_size = table.groupby("group", sort=True).size()
    held: list[str] = []
    for label in (0, 1):
        groups = group_label.index[group_label == label].to_numpy()
        groups = groups[rng.permutation(len(groups))]
        target = fraction * group_size[groups].sum()
        taken = 0
        for g in groups:
            if taken and taken >= target - 0.5 * group_size[g]:
                break  # the first group of each class is always taken: both classes in val
            held.append(g)
            taken += group_size[g]
    mask = table["group"].isin(held).to_numpy()
    return table[~mask].reset_index(drop=True), table[mask].reset_index(drop=True)


def fold_split(table: pd.DataFrame, folds: int, fold: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fold ``fold`` of ``folds`` grouped, label-stratified folds of ``table``: (the other folds, this one).
    Each class's groups, in a seeded order, go one by one to the fold holding the fewest of that class's images,
    so every fold gets about 1/K of each class and no group is cut. Reproducible from ``seed``."""
    if not 2 <= folds or not 0 <= fold < folds:
        raise DatasetError(f"--data.folds {folds} --data.fold {fold}: need folds >= 2 and 0 <= fold < folds")
    rng = np.random.default_rng(seed)
    group_label = table.groupby("group", sort=True)["label"].mean().round().astype(int)
    group_size = table.groupby("group", sort=True).size()
    owner: dict[str, int] = {}
    for label in (0, 1):
        groups = group_label.index[group_label == label].to_numpy()
        filled = np.zeros(folds)
        for g in groups[rng.permutation(len(groups))]:
            owner[g] = int(np.argmin(filled))
            filled[owner[g]] += group_size[g]
    mask = table["group"].map(owner).to_numpy() == fold
    return table[~mask].reset_index(drop=True), table[mask].reset_index(drop=True)


def load_splits(root: str | os.PathLike, columns: Columns | None = None, val_fraction: float = 0.15, seed: int = 42,
                allow_leakage: bool = False, folds: int | None = None, fold: int = 0) -> dict[str, pd.DataFrame]:
    """Validated ``train``/``val``/``test`` tables; ``val`` carved from train when absent, or with ``folds``, fold
    ``fold`` of train's grouped folds (test untouched; a ``val/`` folder is then refused). Refuses empty files and
    exact or near duplicates across splits unless ``allow_leakage`` (then listed in ``tables["train"].attrs["leakage"]``)."""
    root = Path(root)
    tables = {}
    for split in SPLITS:
        if (root / split / "annotations.csv").is_file() or split != "val":
            tables[split] = read_split(root / split, columns)
    empty, pairs = find_duplicates(tables)
    shared = shared_groups(tables)
    if shared:
        raise DatasetError(f"{len(shared)} patient/group id(s) appear in two splits of {root} (the same patient on both sides leaks): {_rows(shared)}")
    if folds and "val" in tables:
        raise DatasetError(f"{root / 'val'} exists: cross-validation folds are cut from train; move val/ into train or drop --data.folds")
    if "val" not in tables:
        require_both_classes(tables["train"], f"{root / 'train'}")
        tables["train"]["group"] = merge_groups(tables["train"])
        if folds:
            tables["train"], tables["val"] = fold_split(tables["train"], folds, fold, seed)
        else:
            tables["train"], tables["val"] = split_by_group(tables["train"], val_fraction, seed)
    require_both_classes(tables["train"], f"{root / 'train'}")
    require_both_classes(tables["val"], f"validation split of {root}")
    overlap = set(tables["train"]["path"]) & set(tables["test"]["path"])
    if overlap:
        raise DatasetError(f"{len(overlap)} image file(s) are in both train and test, e.g. {sorted(overlap)[0]}")
    copies, similar = straddling_copies(tables, pairs)
    problems = empty + [f"duplicates across splits: {d}" for d in copies]
    if problems and not allow_leakage:
        shown = "\n  ".join(problems[:10]) + (f"\n  … and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise DatasetError(f"{len(problems)} problem(s) in {root} before training:\n  {shown}\nFix: keep every copy of a radiograph in one split "
                           f"(remove the listed rows from all but one split, or re-split with `python -m fracture.datasets import …`, "
                           f"which keeps duplicate groups together; `python -m fracture.audit {root}` shows them all). "
                           f"To train anyway, --data.allow_leakage true (recorded in the run's config and run_info.json).")
    tables["train"].attrs["leakage"] = problems
    tables["train"].attrs["similar_across_splits"] = similar
    return tables


def run_columns(run_dir: Path | None) -> Columns | None:
    """The run's ``data.columns`` mapping (from its config.yaml), so evaluation reads the columns training read."""
    config = run_dir / "config.yaml" if run_dir else None
    if config is None or not config.is_file():
        return None
    import yaml

    given = (yaml.safe_load(config.read_text()).get("data") or {}).get("columns") or {}
    return Columns(**{k: v for k, v in given.items() if k in Columns.__dataclass_fields__ and v})
