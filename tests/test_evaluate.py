from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fracture.data import annotations
from fracture.data.annotations import read_split
from fracture.imaging import preprocess
from fracture.report import evaluate
from fracture.scoring import compare, metrics
from fracture.train.checkpoint import load_classifier


def test_bootstrap_contains_the_estimate_and_is_reproducible() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = np.clip(y * 0.35 + rng.random(300) * 0.65, 0, 1)
    ci = metrics.bootstrap(p, y, 0.5, n=1000, seed=3)
    point = metrics.all_metrics(p, y, 0.5)
    for name in ("auroc", "sensitivity", "specificity", "accuracy", "brier", "ece"):
        lo, hi = ci[name]
        assert lo <= point[name] <= hi and hi - lo > 0, name
    assert metrics.bootstrap(p, y, 0.5, n=1000, seed=3) == ci
    assert metrics.bootstrap(p, y, 0.5, n=1000, seed=4) != ci


def test_grouped_bootstrap_resamples_whole_groups() -> None:
    groups = np.repeat(np.arange(50), 3)[np.random.default_rng(1).permutation(150)]
    members = metrics.group_members(150, groups)
    assert len(members) == 50 and all(len(m) == 3 and len(set(groups[m])) == 1 for m in members)
    rng = np.random.default_rng(0)
    for _ in range(20):
        idx = metrics.resample(members, rng)
        counts = pd.Series(groups[idx]).value_counts()
        assert len(idx) == 150 and (counts % 3 == 0).all()
    singles = metrics.group_members(10)
    assert [m.tolist() for m in singles] == [[i] for i in range(10)]


def test_stored_thresholds_were_chosen_on_validation(tiny_ckpt: Path) -> None:
    model = load_classifier(tiny_ckpt)
    splits = pd.read_csv(tiny_ckpt.parent / "splits.csv")
    val = splits[splits.split == "val"]
    import torch

    x = np.stack([preprocess.load(p, model.contract) for p in val["path"]])[:, None].astype(np.float32)
    with torch.no_grad():
        probs = torch.sigmoid(model(torch.from_numpy(x))).numpy()
    expected = metrics.operating_points(probs, val["label"].to_numpy(), 0.95)
    assert set(model.thresholds) == set(expected)
    for name in expected:
        assert model.thresholds[name] == pytest.approx(expected[name], abs=1e-6)
    sens = metrics.binary_metrics(probs, val["label"].to_numpy(), model.thresholds["screening"])["sensitivity"]
    assert sens >= 0.95


def test_report_renders_with_every_plot(synth_root: Path, tiny_ckpt: Path, tiny_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert evaluate.main(["--ckpt", str(tiny_ckpt), "--root", str(synth_root), "--out", str(out), "--bootstrap", "200"]) == 0
    for name in ("roc.png", "pr.png", "confusion.png", "reliability.png", "training_curves.png", "errors.png"):
        assert (out / name).stat().st_size > 5000, name
    report = (out / "report.md").read_text()
    assert "not a medical device" in report and "Subgroups" in report and "fracture_type" in report
    assert all(f"]({p})" in report for p in ("roc.png", "errors.png"))
    result = json.loads((out / "metrics.json").read_text())
    assert result["bootstrap"]["unit"] == "group"  # synthetic patients with two views
    for point in result["operating_points"].values():
        lo, hi = point["ci95"]["auroc"]
        assert lo <= point["metrics"]["auroc"] <= hi
    onnx_out = tmp_path / "onnx"
    assert evaluate.main(["--onnx", str(tiny_onnx), "--root", str(synth_root), "--out", str(onnx_out), "--bootstrap", "50"]) == 0
    via_onnx = json.loads((onnx_out / "metrics.json").read_text())
    assert via_onnx["operating_points"]["default"]["metrics"]["auroc"] == pytest.approx(result["operating_points"]["default"]["metrics"]["auroc"], abs=1e-4)
    # the two reports pair image by image (predictions.csv), resampled by patient as the reports were
    assert compare.main([str(out), str(onnx_out), "--out", str(tmp_path / "cmp"), "--bootstrap", "50"]) == 0
    paired = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert paired["images"] == result["n"] and paired["bootstrap"]["unit"] == "group" and set(paired["measures"]) == set(compare.IMAGE_MEASURES)
    assert paired["measures"]["auroc"]["a"] == pytest.approx(result["operating_points"]["default"]["metrics"]["auroc"], abs=1e-9)
    assert abs(paired["measures"]["auroc"]["difference"]) <= 1e-4


def test_small_subgroups_are_marked() -> None:
    table = pd.DataFrame({"label": [1] * 5 + [0] * 40, "fracture_type": ["oblique"] * 5 + ["none"] * 40, "region": ["hand"] * 20 + ["hip"] * 25})
    rows = evaluate.subgroups(table, np.linspace(0, 1, 45), 0.5)
    oblique = next(r for r in rows if r["value"] == "oblique")
    assert oblique["fractured"] == 5 and "too small" in oblique["note"] and np.isnan(oblique["auroc"])
    assert {r["value"] for r in rows if r["column"] == "region"} == {"hand", "hip"}


def test_review_fixes_val_split_wording_subgroup_cis_and_run_columns(synth_root: Path, tiny_ckpt: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "ds"
    shutil.copytree(synth_root, root)
    shutil.copytree(root / "test", root / "val")
    assert evaluate.main(["--ckpt", str(tiny_ckpt), "--root", str(root), "--split", "val", "--out", str(tmp_path / "rv"), "--bootstrap", "30"]) == 0
    result = json.loads((tmp_path / "rv" / "metrics.json").read_text())
    assert result["thresholds_chosen_on"].startswith("this split")
    assert "chosen on this very split" in (tmp_path / "rv" / "report.md").read_text()
    rows = result["subgroups"]["rows"]
    assert rows and all(r["ci95"]["sensitivity"][0] <= r["sensitivity"] <= r["ci95"]["sensitivity"][1] for r in rows if r["ci95"].get("sensitivity"))
    # a run trained with renamed columns is evaluated with the same mapping
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("data:\n  columns:\n    image: picture\n    label: broken\n    group: null\n")
    table = pd.read_csv(root / "test" / "annotations.csv", dtype=str).rename(columns={"image": "picture", "fracture": "broken"})
    table.to_csv(root / "test" / "annotations.csv", index=False)
    columns = annotations.run_columns(run)
    assert columns.image == "picture" and columns.label == "broken"
    assert len(read_split(root / "test", columns)) == len(table)


def test_a_patient_in_two_supplied_splits_is_refused_by_fit_and_audit(synth_root: Path, tmp_path: Path) -> None:
    import shutil

    from fracture.data import audit
    from fracture.data.annotations import DatasetError, load_splits

    root = tmp_path / "ds"
    shutil.copytree(synth_root, root)
    train = pd.read_csv(root / "train" / "annotations.csv", dtype=str)
    test = pd.read_csv(root / "test" / "annotations.csv", dtype=str)
    test.loc[0, "patient_id"] = train.loc[0, "patient_id"]
    test.to_csv(root / "test" / "annotations.csv", index=False)
    with pytest.raises(DatasetError, match="patient_id .* is in train and test"):
        load_splits(root)
    assert audit.main([str(root), "--out", str(tmp_path / "a.json")]) == 1
    assert len(json.loads((tmp_path / "a.json").read_text())["shared_patient_groups"]) == 1


def test_subgroup_intervals_resample_whole_groups_like_the_main_table() -> None:
    # each radiograph four times (duplicates of one patient): counted as 4x the evidence, the interval would shrink by half
    rng = np.random.default_rng(0)
    y = np.repeat(rng.integers(0, 2, 60), 4)
    p = np.clip(y * 0.3 + np.repeat(rng.random(60), 4) * 0.7, 0, 1)
    table = pd.DataFrame({"label": y, "region": np.where(np.arange(240) < 200, "hand", "leg")})
    naive = next(r for r in evaluate.subgroups(table, p, 0.5, n_boot=400) if r["value"] == "hand")
    table["group"] = np.repeat(np.arange(60), 4).astype(str)
    grouped = next(r for r in evaluate.subgroups(table, p, 0.5, n_boot=400) if r["value"] == "hand")
    width = lambda r, k: r["ci95"][k][1] - r["ci95"][k][0]  # noqa: E731
    assert width(grouped, "auroc") > 1.5 * width(naive, "auroc")
    assert width(grouped, "sensitivity") > 1.5 * width(naive, "sensitivity")


def test_scoring_test_warns_and_is_recorded_while_a_carved_validation_split_needs_no_folder(synth_root: Path, tiny_ckpt: Path, tmp_path: Path,
                                                                                           capsys: pytest.CaptureFixture) -> None:
    assert evaluate.main(["--ckpt", str(tiny_ckpt), "--root", str(synth_root), "--out", str(tmp_path / "t"), "--bootstrap", "20"]) == 0
    assert "scoring the test split" in capsys.readouterr().err
    assert json.loads((tmp_path / "t" / "metrics.json").read_text())["test_split_consulted"] is True
    assert not (synth_root / "val").exists()  # validation was carved from train: its rows come from the run's splits.csv
    assert evaluate.main(["--ckpt", str(tiny_ckpt), "--root", str(synth_root), "--split", "val", "--out", str(tmp_path / "v"), "--bootstrap", "20"]) == 0
    assert "scoring the test split" not in capsys.readouterr().err
    result = json.loads((tmp_path / "v" / "metrics.json").read_text())
    splits = pd.read_csv(tiny_ckpt.parent / "splits.csv")
    assert result["test_split_consulted"] is False and result["n"] == int((splits["split"] == "val").sum())
