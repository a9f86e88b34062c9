from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import CONFIGS, REPO, tiny_fit_args

from fracture.train import fit


def _run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "fracture.fit", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def test_tiny_fit_makes_checkpoints_logs_and_finite_metrics(synth_root: Path, tmp_path: Path) -> None:
    assert fit.main(tiny_fit_args(synth_root, tmp_path, epochs=3)) == 0
    run = tmp_path / "tiny"
    best = list(run.glob("best-*.ckpt"))
    assert len(best) == 1 and (run / "last.ckpt").is_file()
    for name in ("config.yaml", "metrics.csv", "splits.csv", "run_info.json", "test_metrics.json"):
        assert (run / name).is_file(), name
    report = json.loads((run / "test_metrics.json").read_text())
    assert set(report["operating_points"]) == {"default", "screening", "balanced"}
    for point in report["operating_points"].values():
        assert all(math.isfinite(point[m]) for m in ("accuracy", "auroc", "average_precision", "sensitivity", "specificity"))
    logs = pd.read_csv(run / "metrics.csv")
    assert logs.dropna(subset=["val/auroc"])["epoch"].tolist() == [0, 1, 2]
    assert logs["test/auroc"].notna().sum() == 1
    ckpt = torch.load(best[0], map_location="cpu", weights_only=True)
    info = ckpt["fracture"]
    assert info["contract"]["image_size"] == 64
    assert info["thresholds"]["default"] == 0.5 and "screening" in info["thresholds"]
    assert info["train_counts"]["fractured"] > 0 and info["train_counts"]["not_fractured"] > 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["image_size"] == 64 and saved["trainer"]["max_epochs"] == 3
    splits = pd.read_csv(run / "splits.csv")
    assert not set(splits.loc[splits.split == "train", "group"]) & set(splits.loc[splits.split == "val", "group"])


def test_pos_weight_auto_uses_train_class_ratio(synth_root: Path, tmp_path: Path) -> None:
    assert fit.main(tiny_fit_args(synth_root, tmp_path, "--model.pos_weight", "auto", "--test_after_fit", "false", epochs=1)) == 0
    ckpt = torch.load(tmp_path / "tiny" / "last.ckpt", map_location="cpu", weights_only=True)
    counts = ckpt["fracture"]["train_counts"]
    assert ckpt["training"]["pos_weight"] == pytest.approx(counts["not_fractured"] / counts["fractured"])


def test_cli_end_to_end_in_a_subprocess(synth_root: Path, tmp_path: Path) -> None:
    done = _run(*tiny_fit_args(synth_root, tmp_path, epochs=1))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "test split:" in done.stdout and "auroc" in done.stdout
    assert (tmp_path / "tiny" / "test_metrics.json").is_file()


def test_missing_dataset_explains_and_exits_nonzero(tmp_path: Path) -> None:
    done = _run("--config", str(CONFIGS / "default.yaml"), "--output_dir", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "data/train/annotations.csv" in done.stderr
    assert "python -m fracture.synth" in done.stderr and "configs/demo.yaml" in done.stderr
    assert not any(tmp_path.glob("*/*.ckpt"))


def test_bad_dataset_stops_before_training_with_one_message(synth_root: Path, tmp_path: Path, capsys) -> None:
    import shutil

    root = tmp_path / "ds"
    shutil.copytree(synth_root, root)
    csv = root / "train" / "annotations.csv"
    table = pd.read_csv(csv, dtype=str)
    table.loc[3, "fracture"] = "unsure"
    table.to_csv(csv, index=False)
    assert fit.main(tiny_fit_args(root, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "line 5: 'unsure'" in err and str(csv) in err
    assert not list((tmp_path / "out").rglob("*.ckpt"))


def test_print_config_is_valid_yaml_with_the_seed_defaults() -> None:
    done = _run("--config", str(CONFIGS / "default.yaml"), "--print_config")
    assert done.returncode == 0, done.stderr[-2000:]
    cfg = yaml.safe_load(done.stdout)
    assert cfg["model"]["recipe"]["lr"] == 0.001 and cfg["model"]["recipe"]["optimizer"] == "adam"
    assert cfg["data"]["batch_size"] == 32 and cfg["trainer"]["max_epochs"] == 50
    net = cfg["model"]["net"]
    assert net["class_path"] == "fracture.train.networks.SeedCNN" and net["init_args"]["widths"] == [32, 64, 128] and net["init_args"]["pool"] == "flatten"
    assert cfg["data"]["image_size"] == 224


def test_init_from_at_another_size_refuses_a_head_sized_by_its_input(tiny_ckpt: Path, tmp_path: Path) -> None:
    from fracture.train.checkpoint import CheckpointError, initialise_from, upgrade
    from fracture.train.module import FractureClassifier

    hparams, _ = upgrade(torch.load(tiny_ckpt, map_location="cpu", weights_only=True))
    flat = {**hparams, "net": {**hparams["net"], "init_args": {**hparams["net"]["init_args"], "pool": "flatten"}}}
    ckpt = tmp_path / "flatten.ckpt"  # the Keras head: its dense layer's width is set by the 64 px input
    torch.save({"hyper_parameters": flat, "state_dict": FractureClassifier(**flat).state_dict()}, ckpt)
    splits = {"train": [], "val": [], "test": []}
    assert initialise_from(FractureClassifier(**flat), ckpt, splits)[0].startswith(f"{ckpt}: no splits.csv")  # same size: loads
    with pytest.raises(CheckpointError, match="fit 64 px inputs, not this run's 96 px"):
        initialise_from(FractureClassifier(**{**flat, "image_size": 96}), ckpt, splits)


def test_checkpoints_from_before_the_package_move_still_load(tiny_ckpt: Path, tmp_path: Path) -> None:
    """Checkpoints written before the subpackages store class paths of the flat layout (fracture.networks.…)."""
    import torch

    from fracture.train.checkpoint import load_classifier

    old = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)
    assert old["hyper_parameters"]["net"]["class_path"] == "fracture.train.networks.SeedCNN"
    old["hyper_parameters"]["net"]["class_path"] = "fracture.networks.SeedCNN"
    torch.save(old, tmp_path / "flat.ckpt")
    before, after = load_classifier(tiny_ckpt), load_classifier(tmp_path / "flat.ckpt")
    x = torch.rand(2, 1, 64, 64) * 255
    with torch.no_grad():
        assert torch.equal(before(x), after(x))
    assert after.spec.config()["class_path"] == "fracture.train.networks.SeedCNN"  # written back in today's form
