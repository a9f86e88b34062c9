"""The vocabulary of annotation files: usual column names and label spellings.

Dependency-free so both the training side (``annotations``) and the torch-free,
pandas-free predictor (``predict --labels``) read labels the same way.
"""

from __future__ import annotations

IMAGE_COLUMNS = ("image", "filename", "file_name", "file", "path", "image_path", "image_id", "img")
LABEL_COLUMNS = ("fracture", "fractured", "label", "target", "class", "is_fractured", "has_fracture")
TYPE_COLUMNS = ("fracture_type", "type")
STUDY_COLUMNS = ("study_id", "study", "study_uid", "study_instance_uid", "studyinstanceuid", "accession_number", "accession")
BOX_COLUMNS = ("boxes", "bboxes", "bbox")
GROUP_COLUMNS = ("patient_id", "patient", "group", "group_id", "subject_id", "study_id")
POSITIVE_LABELS = ("1", "yes", "y", "true", "t", "fractured", "fracture", "positive")
NEGATIVE_LABELS = ("0", "no", "n", "false", "f", "not fractured", "non fractured", "nonfractured", "normal", "negative")


def parse_label(value: object) -> int | None:
    """1 for fractured, 0 for not fractured, None when the value means neither."""
    text = " ".join(str(value).strip().lower().replace("_", " ").replace("-", " ").split())
    if text in POSITIVE_LABELS:
        return 1
    if text in NEGATIVE_LABELS:
        return 0
    try:
        number = float(text)
    except ValueError:
        return None
    return int(number) if number in (0.0, 1.0) else None


def find_column(columns: list[str], candidates: tuple[str, ...]) -> str | None:
    """The first column whose name (any case) is one of ``candidates``."""
    lower = {c.strip().lower(): c for c in columns}
    return next((lower[name] for name in candidates if name in lower), None)
