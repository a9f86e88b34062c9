"""Shared fixtures: tiny synthetic datasets made in tmp dirs, the real config shrunk for CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from fracture.synth import write_dataset

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~120 synthetic radiographs in the dataset layout (read-only for tests)."""
    root = tmp_path_factory.mktemp("synth")
    write_dataset(root, n=120, seed=3)
    return root


def tiny_fit_args(root: Path, out: Path, *extra: str, epochs: int = 2) -> list[str]:
    """The demo config shrunk to seconds on a CPU: 64 px, 2 epochs, no workers, no bars."""
    return [
        "--config", str(CONFIGS / "demo.yaml"),
        "--data.root", str(root),
        "--data.image_size", "64",
        "--data.num_workers", "0",
        "--data.batch_size", "16",
        "--trainer.max_epochs", str(epochs),
        "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--output_dir", str(out),
        "--run_name", "tiny",
        *extra,
    ]
