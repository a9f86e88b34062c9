"""Fracture probabilities from an exported ONNX file, on a CPU, without torch.

    python -m fracture.predict MODEL.onnx INPUT… [--out preds.csv|preds.json]
        [--threshold 0.3 | --operating-point screening] [--labels annotations.csv]

INPUT: image files, folders (searched recursively), glob patterns, or a CSV with
an image column (paths relative to the CSV's ``images/`` folder or the CSV
itself). DICOM (``.dcm``) works when pydicom is installed (``fracture[dicom]``).
The preprocessing (size, resize, scaling) is read from the model's metadata,
never from flags. A file that cannot be read becomes an error row; the others
are still predicted and the exit code is 1. Models with a fracture map
(``head: localise`` under ``model.net``) also give boxes in original-image pixels (``x0, y0,
x1, y1, map_peak``; the number is the fracture map's peak in the box, not a probability): one CSV row per box, or a ``boxes`` list per image in JSON;
``--heatmaps`` draws them. Imports numpy, OpenCV and onnxruntime only.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

import numpy as np

from fracture.boxes.detection import BOX_KEYS
from fracture.data.inputs import InputError, expand_inputs, read_labels, study_keys
from fracture.deploy.predictor import ModelError, Prediction, Predictor
from fracture.imaging.budget import DEFAULT_MAX_DECODE_MB
from fracture.scoring import metrics


def study_rows(rows: list[Prediction], keys: dict[str, str], method: str, threshold: float) -> list[dict]:
    """One answer per study with more than nothing to say: its images' probabilities aggregated by ``method``."""
    good = [r for r in rows if not r.error and keys.get(r.path)]
    if not good:
        return []
    studies = np.array([keys[r.path] for r in good])
    names, probs, _ = metrics.aggregate_studies(np.array([r.probability for r in good]), studies, method)
    counts = {k: int((studies == k).sum()) for k in names}
    return [{"study": k, "images": counts[k], "probability": float(p), "prediction": "fractured" if p > threshold else "not_fractured",
             "threshold": threshold, "aggregation": method} for k, p in zip(names, probs)]


BOX_FIELDS = tuple(f"box_{k}" for k in BOX_KEYS)
ROW_FIELDS = ("path", "probability", "prediction", "threshold", "operating_point", "error", "model_sha256")


class RowWriter:
    """Predictions to ``--out`` as they are made, so a crash or Ctrl-C keeps every row done.

    ``.csv`` (one row per image, or per box for models with a map) and ``.jsonl``
    (one object per image, with a ``boxes`` list) are appended row by row and
    flushed; ``.json`` (a list) is written once at the end, atomically. With
    ``resume`` the rows already in a ``.csv``/``.jsonl`` file are kept and
    :meth:`done` tells which (path, model sha256) pairs to skip.
    """

    def __init__(self, out: Path, model_sha256: str, boxes: bool, resume: bool = False) -> None:
        self.out, self.sha, self.boxes = out, model_sha256, boxes
        self.kind = {".json": "json", ".jsonl": "jsonl"}.get(out.suffix.lower(), "csv")
        if resume and self.kind == "json":
            raise ModelError("--resume needs --out .csv or .jsonl (a .json list is written at the end)")
        self.previous: set[tuple[str, str]] = set()
        self.previous_rows: list[Prediction] = []  # this model's earlier rows (one per box row in CSV: deduplicated below)
        if resume and out.is_file() and out.stat().st_size:
            data = out.read_bytes()
            if not data.endswith(b"\n"):  # a run killed mid-row: drop the half row
                with open(out, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
            with open(out, newline="", encoding="utf-8") as f:
                rows = [json.loads(line) for line in f if line.strip()] if self.kind == "jsonl" else list(csv.DictReader(f))
            self.previous = {(r.get("path", ""), r.get("model_sha256", "")) for r in rows}
            self.previous_rows = [Prediction(r["path"], float(r["probability"])) for r in rows
                                  if r.get("model_sha256") == model_sha256 and r.get("probability") not in (None, "")]
        out.parent.mkdir(parents=True, exist_ok=True)
        self.records: list[dict] = []
        self.file = None
        if self.kind != "json":
            append = resume and out.is_file() and out.stat().st_size > 0
            self.file = open(out, "a" if append else "w", newline="", encoding="utf-8")
            if self.kind == "csv":
                self.csv = csv.DictWriter(self.file, fieldnames=list(ROW_FIELDS) + (list(BOX_FIELDS) if boxes else []), restval="")
                if not append:
                    self.csv.writeheader()

    def done(self, path: str) -> bool:
        return (path, self.sha) in self.previous

    def record(self, r: Prediction) -> dict:
        return {"path": r.path, "probability": r.probability, "prediction": None if r.error else ("fractured" if r.fractured else "not_fractured"),
                "threshold": r.threshold, "operating_point": r.threshold_name, "error": r.error, "model_sha256": self.sha}

    def write(self, r: Prediction) -> None:
        rec = self.record(r)
        if self.boxes:
            boxes = [dict(zip(BOX_KEYS, b)) for b in r.boxes or []]
        if self.kind == "csv":
            rows = [{**rec, **dict(zip(BOX_FIELDS, b.values()))} for b in boxes] if self.boxes and boxes else [rec]
            self.csv.writerows(rows)
        else:
            if self.boxes:
                rec["boxes"] = boxes
            if self.kind == "jsonl":
                self.file.write(json.dumps(rec) + "\n")
            else:
                self.records.append(rec)
        if self.file is not None:
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        elif self.kind == "json":
            tmp = self.out.with_name(f".{self.out.name}.tmp{os.getpid()}")
            tmp.write_text(json.dumps(self.records, indent=1))
            os.replace(tmp, self.out)


def labelled_metrics(rows: list[Prediction], labels: dict[str, int], threshold: float) -> tuple[dict[str, float], int]:
    """Numpy metrics over the predicted images that have a label; returns (metrics, n)."""
    pairs = [(r.probability, labels[os.path.realpath(r.path)]) for r in rows if not r.error and os.path.realpath(r.path) in labels]
    if not pairs:
        return {}, 0
    probs, y = np.array([p for p, _ in pairs]), np.array([t for _, t in pairs])
    return metrics.binary_metrics(probs, y, threshold), len(pairs)


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fracture.predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="ONNX file from python -m fracture.export")
    parser.add_argument("inputs", nargs="+", help="image files, folders, globs or a CSV with an image column")
    parser.add_argument("--out", type=Path, help="write predictions to .csv or .jsonl (row by row) or .json (at the end)")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --out and skip their images (same path and model sha256)")
    pick = parser.add_mutually_exclusive_group()
    pick.add_argument("--threshold", type=float, help="call fractured above this probability")
    pick.add_argument("--operating-point", help="a threshold stored in the model: default, screening, balanced")
    parser.add_argument("--study-column", help="CSV column that names each image's study (default: study_id, study, accession …; DICOM: StudyInstanceUID, else PatientID)")
    parser.add_argument("--heatmaps", type=Path, help="write heatmap overlays here (models exported with --heatmap or with a fracture map; boxes drawn)")
    parser.add_argument("--dicom-out", type=Path, help="also answer DICOM inputs in DICOM here: per study a Structured Report, per image a "
                        "presentation state and a Secondary Capture (as the DICOM node sends them; needs fracture[pacs])")
    parser.add_argument("--no-secondary-capture", action="store_true", help="with --dicom-out: the SR and presentation states only")
    parser.add_argument("--labels", type=Path, help="annotations.csv with true labels: also print accuracy, sensitivity, …")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    parser.add_argument("--max-decode-mb", type=float, default=DEFAULT_MAX_DECODE_MB,
                        help="memory one file's decode may hold, worked out from its header before decoding; larger files are refused with a reason")
    parser.add_argument("--quiet", action="store_true", help="no per-image table on stdout")
    ns = parser.parse_args(args)
    try:
        predictor = Predictor(ns.model, ns.threads, ns.max_decode_mb)
        threshold = predictor.threshold(ns.threshold, ns.operating_point)
        labels = read_labels(ns.labels) if ns.labels else None
        paths = expand_inputs(ns.inputs)
    except (ModelError, InputError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows = []
    try:
        writer = RowWriter(ns.out, predictor.sha256, predictor.has_map, ns.resume) if ns.out else None
    except (ModelError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if writer is not None and writer.previous:
        before = len(paths)
        paths = [p for p in paths if not writer.done(p)]
        print(f"--resume: {before - len(paths)} image(s) already in {ns.out}, {len(paths)} to go", file=sys.stderr)
    if not ns.quiet:
        print(f"{'probability':>11}  {'prediction':<13}  path")
    try:
        for row in predictor.predict(paths, ns.batch_size, threshold, show_progress=len(paths) >= 50, heatmap_dir=ns.heatmaps):
            rows.append(row)
            if writer is not None:
                writer.write(row)
            if not ns.quiet:
                shown = f"{row.probability:>11.4f}  {'fractured' if row.fractured else 'not_fractured':<13}" if not row.error else f"{'-':>11}  {'ERROR':<13}"
                where = f"  [{len(row.boxes)} box{'es' if len(row.boxes) != 1 else ''}]" if row.boxes is not None else ""
                print(f"{shown}  {row.path}{where}" + (f"  ({row.error})" if row.error else ""), flush=len(paths) < 50)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted after {len(rows)} image(s)" + (f"; they are in {ns.out}: rerun with --resume to finish" if writer else ""), file=sys.stderr)
        return 130
    finally:
        if writer is not None:
            writer.close()
    failed = [r for r in rows if r.error]
    refused: list[str] = []
    if ns.dicom_out:
        from fracture.deploy.pacs.results import ResultWriter, write_files

        written, refused = write_files(ResultWriter(predictor, not ns.no_secondary_capture), rows, ns.dicom_out)
        for reason in refused:
            print(f"error: {reason}", file=sys.stderr)
        print(f"wrote {len(written)} DICOM object(s) to {ns.dicom_out}", file=sys.stderr)
    print(f"{len(rows) - len(failed)} predicted, {len(failed)} failed; threshold {threshold[1]:.4f} ({threshold[0]})", file=sys.stderr)
    if ns.out:
        print(f"wrote {ns.out}", file=sys.stderr)
    method = predictor.meta.study_method
    earlier = list({r.path: r for r in writer.previous_rows}.values()) if writer is not None else []
    every = earlier + rows
    studies = study_rows(every, study_keys(ns.inputs, [r.path for r in every], ns.study_column), method, threshold[1])
    if studies:
        print(f"\n{len(studies)} studies (images of a study combined by {method}, chosen on validation or the default):")
        print(f"{'probability':>11}  {'prediction':<13}  {'images':>6}  study")
        for st in studies:
            print(f"{st['probability']:>11.4f}  {st['prediction']:<13}  {st['images']:>6}  {st['study']}")
        if ns.out:
            target = ns.out.with_name(f"{ns.out.stem}.studies.csv")
            with open(target, "w", newline="") as f:
                writer_ = csv.DictWriter(f, fieldnames=[*studies[0], "model_sha256"])
                writer_.writeheader()
                writer_.writerows({**st, "model_sha256": predictor.sha256} for st in studies)
            print(f"wrote {target}", file=sys.stderr)
    if labels is not None:
        scores, n = labelled_metrics(rows, labels, threshold[1])
        print(f"\nmetrics on {n} labelled images (fractured = positive, threshold {threshold[1]:.4f}):")
        for name in metrics.METRIC_NAMES:
            value = scores.get(name, float("nan"))
            print(f"  {name:<18} {'undefined' if np.isnan(value) else f'{value:.4f}'}")
    return 1 if failed or refused else 0


if __name__ == "__main__":
    sys.exit(main())
