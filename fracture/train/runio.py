"""How a run touches the disk: atomic checkpoints, safe loading, logs that survive a resume."""

from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only


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


class ResumableCSVLogger(Logger):
    """``<save_dir>/<name>/metrics.csv``, one row per logging call, continued across ``--ckpt_path`` resumes.

    Lightning's own CSVLogger deletes an existing ``metrics.csv``; this one appends, using only the
    public ``Logger`` interface. A new metric name rewrites the file once with the wider header.
    Hyperparameters live in the checkpoint and ``config.yaml``, not here.
    """

    def __init__(self, save_dir: str | os.PathLike, name: str) -> None:
        super().__init__()
        self._save_dir, self._name = str(save_dir), name
        self._rows: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> str:
        return ""

    @property
    def root_dir(self) -> str:
        return os.path.join(self._save_dir, self._name)

    @property
    def log_dir(self) -> str:
        return self.root_dir

    @property
    def save_dir(self) -> str:  # Lightning puts the CLI's config.yaml in a custom logger's save_dir: the run folder
        return self.root_dir

    @property
    def metrics_file(self) -> Path:
        return Path(self.root_dir) / "metrics.csv"

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        row = {k: float(v.item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}
        self._rows.append({**row, "step": step if step is not None else len(self._rows)})

    @rank_zero_only
    def save(self) -> None:
        if not self._rows:
            return
        path = self.metrics_file
        path.parent.mkdir(parents=True, exist_ok=True)
        old: list[dict[str, str]] = []
        keys: list[str] = []
        if path.is_file() and path.stat().st_size:
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                keys = list(reader.fieldnames or [])
                new_keys = sorted({k for r in self._rows for k in r} - set(keys))
                if new_keys:
                    old = list(reader)
        else:
            new_keys = sorted({k for r in self._rows for k in r})
        rewrite = bool(new_keys)
        if rewrite:
            keys = sorted(set(keys) | set(new_keys))  # else: append under the file's own header, in its order
        with open(path, "w" if rewrite else "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys, restval="")
            if rewrite:
                writer.writeheader()
                writer.writerows(old)
            writer.writerows(self._rows)
        self._rows = []

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.save()


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
