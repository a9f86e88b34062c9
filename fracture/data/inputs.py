"""What a user names as inputs, read into image paths, labels and study keys (torch-free, pandas-free).

Files, folders, globs and CSVs (an image column, optionally label and study columns, paths relative to the CSV's
``images/`` folder) are how every command is given its images: the predictor, calibration, Grad-CAM, the
report's study level. One reader for all of them, on the data floor, so none borrows another's private helper.
"""

from __future__ import annotations

import csv
import glob
import os
from pathlib import Path

from fracture.data.labels import IMAGE_COLUMNS, LABEL_COLUMNS, STUDY_COLUMNS, find_column, parse_label
from fracture.imaging import dicom, preprocess


class InputError(ValueError):
    """An input list that cannot be read as images (a CSV without an image or label column, a bad label)."""


def csv_images(path: Path) -> list[str]:
    """The image paths an annotations-style CSV names: its image column, relative to the ``images/`` folder beside it
    (else to the CSV's own folder)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    column = find_column(list(rows[0].keys()) if rows else [], IMAGE_COLUMNS)
    if column is None:
        raise InputError(f"{path}: no image column (one of {', '.join(IMAGE_COLUMNS)})")
    base = path.parent / "images" if (path.parent / "images").is_dir() else path.parent
    return [str(base / row[column].strip()) for row in rows]


def study_keys(items: list[str], paths: list[str], column: str | None = None) -> dict[str, str]:
    """Path → study key: from a CSV input's study column, else ``StudyInstanceUID``/``PatientID`` of a DICOM file."""
    keys: dict[str, str] = {}
    for item in items:
        p = Path(item)
        if p.is_file() and p.suffix.lower() == ".csv":
            with open(p, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
            col = column if column and rows and column in rows[0] else find_column(list(rows[0].keys()) if rows else [], STUDY_COLUMNS)
            if col:
                keys.update({path: row[col].strip() for path, row in zip(csv_images(p), rows) if row[col].strip()})
    for path in paths:
        if path not in keys and (path.lower().endswith(".dcm") or preprocess.has_dicom_preamble(path)):
            key = dicom.dicom_study_key(path)
            if key:
                keys[path] = key
    return keys


def expand_inputs(items: list[str]) -> list[str]:
    """Files, folders (recursive), globs and CSVs → image paths, in a stable order."""
    paths: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            paths += sorted(str(f) for f in p.rglob("*") if f.is_file() and preprocess.is_image_file(f))
        elif p.is_file() and p.suffix.lower() == ".csv":
            paths += csv_images(p)
        elif p.exists():
            paths.append(str(p))
        else:
            matches = sorted(glob.glob(item, recursive=True))
            paths += [m for m in matches if Path(m).is_file()] if matches else [item]  # a missing file becomes an error row
    return paths


def read_labels(path: Path) -> dict[str, int]:
    """Resolved image path → 0/1 from an annotations.csv."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    label_col = find_column(list(rows[0].keys()) if rows else [], LABEL_COLUMNS)
    if label_col is None:
        raise InputError(f"{path}: no label column (one of {', '.join(LABEL_COLUMNS)})")
    labels = {}
    for image, row in zip(csv_images(path), rows):
        value = parse_label(row[label_col])
        if value is None:
            raise InputError(f"{path}: label {row[label_col]!r} is not one of 0/1, yes/no, true/false, fractured/not fractured")
        labels[os.path.realpath(image)] = value
    return labels
