"""How a run touches the disk: atomic checkpoints, safe loading, logs that survive a resume."""

from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.io import TorchCheckpointIO


def newest(output_dir: str | os.PathLike, pattern: str) -> Path | None:
    """The most recently modified ``<output_dir>/<run>/<pattern>`` file, if any."""
    found = sorted(Path(output_dir).glob(f"*/{pattern}"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def atomic_write(path: str | os.PathLike, write) -> None:
    """``write(tmp_path)`` then fsync and rename: a kill leaves the old file or none, never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written atomically and read back with ``weights_only=True`` (no arbitrary unpickling)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint not found: {path}")
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


class _AppendingWriter(ExperimentWriter):
    """Keeps an existing metrics.csv (a resumed run) instead of deleting it."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = next(csv.reader(f), [])


class ResumableCSVLogger(CSVLogger):
    """CSVLogger whose ``metrics.csv`` continues across ``--ckpt_path`` resumes."""

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def trim_log(metrics_csv: Path, last_step: int) -> None:
    """Drop rows logged after ``last_step`` (the resumed checkpoint), which a killed run left behind."""
    if not metrics_csv.is_file():
        return
    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
        fields = rows[0].keys() if rows else []
    kept = [r for r in rows if not r.get("step") or int(float(r["step"])) <= last_step]
    if len(kept) != len(rows):

        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(fields))
                writer.writeheader()
                writer.writerows(kept)

        atomic_write(metrics_csv, write)
