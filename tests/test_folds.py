from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import tiny_fit_args

from fracture.data.annotations import DatasetError, fold_split, load_splits
from fracture.scoring import folds
from fracture.train import fit


def test_folds_cover_train_once_keep_groups_whole_and_stratify() -> None:
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(120), rng.integers(1, 4, 120))
    labels = (rng.random(120) < 0.2).astype(int)[groups]
    table = pd.DataFrame({"path": [f"{i}.png" for i in range(len(groups))], "group": groups.astype(str), "label": labels})
    seen = []
    for i in range(5):
        rest, val = fold_split(table, 5, i, seed=7)
        assert set(rest["path"]).isdisjoint(val["path"]) and len(rest) + len(val) == len(table)
        assert set(rest["group"]).isdisjoint(val["group"])  # no group cut in two
        assert abs(val["label"].sum() - labels.sum() / 5) <= 3 and abs(len(val) - len(table) / 5) <= 6
        seen += val["path"].tolist()
    assert sorted(seen) == sorted(table["path"])  # every image validates exactly once
    assert fold_split(table, 5, 2, seed=7)[1]["path"].tolist() == fold_split(table, 5, 2, seed=7)[1]["path"].tolist()
    with pytest.raises(DatasetError, match="0 <= fold < folds"):
        fold_split(table, 5, 5, seed=7)


def test_fold_runs_leave_test_untouched_and_summarise_with_a_corrected_interval(synth_root: Path, tmp_path: Path,
                                                                               capsys: pytest.CaptureFixture) -> None:
    test_before = load_splits(synth_root)["test"]["path"].tolist()
    runs = []
    for i in range(3):
        name = f"cv-f{i}"
        assert fit.main(tiny_fit_args(synth_root, tmp_path, "--data.folds", "3", "--data.fold", str(i), "--run_name", name,
                                      "--test_after_fit", "false", epochs=1)) == 0
        splits = pd.read_csv(tmp_path / name / "splits.csv")
        assert sorted(splits.loc[splits["split"] == "test", "path"]) == sorted(test_before)
        assert json.loads((tmp_path / name / "run_info.json").read_text())["test_split_scored"] is False
        runs.append(tmp_path / name)
    vals = [set(pd.read_csv(r / "splits.csv").query("split == 'val'")["path"]) for r in runs]
    assert all(a.isdisjoint(b) for k, a in enumerate(vals) for b in vals[k + 1:])
    capsys.readouterr()
    assert folds.main([str(r) for r in runs] + ["--out", str(tmp_path / "cv.json")]) == 0
    out = json.loads((tmp_path / "cv.json").read_text())
    scores = np.array([f["score"] for f in out["folds"]])
    assert out["k"] == 3 and out["mean"] == pytest.approx(scores.mean())
    ratio = np.mean([f["n_val"] / f["n_train"] for f in out["folds"]])
    half = 4.303 * np.sqrt((1 / 3 + ratio) * scores.var(ddof=1))  # t(2) at 97.5 %, Nadeau-Bengio variance
    assert out["ci95"] == pytest.approx((scores.mean() - half, scores.mean() + half), abs=1e-3)
    assert "95 % interval" in capsys.readouterr().out
    # paired against itself: every difference 0
    assert folds.main([str(r) for r in runs] + ["--versus", *map(str, runs), "--out", str(tmp_path / "pair.json")]) == 0
    assert json.loads((tmp_path / "pair.json").read_text())["paired"]["differences"] == [0.0, 0.0, 0.0]
    assert folds.main([str(runs[0]), str(runs[0])]) == 2  # one fold twice is refused


def test_t_quantiles_match_the_tables_at_few_degrees_of_freedom() -> None:
    """Exact where the corrected interval needs it most (3 folds -> 2 df, 4 folds -> 3 df): the expansion it replaced
    gave 3.1786 for 3.1824 at 3 df."""
    from fracture.scoring.folds import t_cdf, t_quantile

    table = {(0.975, 3): 3.182446305284263, (0.975, 4): 2.7764451051977987, (0.975, 9): 2.2621571627409915,
             (0.975, 30): 2.0422724563012373, (0.995, 3): 5.84090929975553, (0.95, 5): 2.015048372669157}
    for (p, df), value in table.items():
        assert abs(t_quantile(p, df) - value) < 1e-8, (p, df)
        assert abs(t_quantile(1 - p, df) + value) < 1e-8 and abs(t_cdf(value, df) - p) < 1e-10
