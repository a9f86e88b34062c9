"""A recipe over cross-validation folds: each fold's validation score, their mean, spread and interval.

    for i in 0 1 2 3 4; do python -m fracture.fit --config C.yaml --data.folds 5 --data.fold $i --run_name rec-f$i; done
    python -m fracture.folds checkpoints/rec-f*                       # one recipe
    python -m fracture.folds checkpoints/new-f* --versus checkpoints/rec-f*   # paired by fold: is new better?

Folds are cut inside train (``--data.folds K --data.fold i``: grouped, label-stratified; test untouched), so
recipes are compared without reading the test split. The interval over K fold scores is Student's t with
K-1 degrees of freedom on the Nadeau-Bengio corrected variance, (1/K + n_val/n_train) x s²: the folds'
training sets overlap, so their scores are not independent and the plain 1/K would be too narrow. With
``--versus`` the same is done on the per-fold differences (a corrected paired t interval). Torch-free.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np


def _incomplete_beta(x: float, a: float, b: float) -> float:
    """The regularised incomplete beta function I_x(a, b), by its continued fraction (modified Lentz), to ~1e-15."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast below the mean; use the symmetry above it
        return 1.0 - _incomplete_beta(1.0 - x, b, a)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny, f, c, d = 1e-300, 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c if abs(c) > tiny else 1.0 + num / tiny
        f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * (f - 1.0)


def t_cdf(t: float, df: int) -> float:
    """Student's t distribution function."""
    tail = 0.5 * _incomplete_beta(df / (df + t * t), df / 2, 0.5)
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile, the distribution function inverted by bisection to 1e-12 (numpy has no t distribution
    and scipy is not a dependency); exact closed forms for 1 and 2 degrees of freedom."""
    if df == 1:
        return float(np.tan(np.pi * (p - 0.5)))
    if df == 2:
        return float((2 * p - 1) / np.sqrt(2 * p * (1 - p)))
    lo, hi = -1.0, 1.0
    while t_cdf(lo, df) > p:
        lo *= 2
    while t_cdf(hi, df) < p:
        hi *= 2
    while hi - lo > 1e-12 * max(1.0, abs(hi)):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def fold_score(run: Path, metric: str, pick: str) -> dict[str, Any]:
    """One run's fold, its validation score (best or last validated epoch) and its split sizes."""
    import pandas as pd
    import yaml

    config = yaml.safe_load((run / "config.yaml").read_text())
    data = config.get("data", {})
    if not data.get("folds"):
        raise ValueError(f"{run}: not a cross-validation run (no data.folds in its config.yaml)")
    logs = pd.read_csv(run / "metrics.csv")
    if metric not in logs.columns or logs[metric].dropna().empty:
        raise ValueError(f"{run}: no {metric} in metrics.csv")
    curve = logs.dropna(subset=[metric])
    row = curve.loc[curve[metric].idxmax()] if pick == "best" else curve.iloc[-1]
    splits = pd.read_csv(run / "splits.csv")["split"].value_counts()
    return {"run": str(run), "folds": int(data["folds"]), "fold": int(data.get("fold", 0)), "epoch": int(row["epoch"]),
            "score": float(row[metric]), "n_train": int(splits.get("train", 0)), "n_val": int(splits.get("val", 0))}


def corrected_interval(values: np.ndarray, test_train_ratio: float, level: float = 0.95) -> tuple[float, float]:
    """Mean ± t(K-1) x sqrt((1/K + n_val/n_train) x sample variance): Nadeau & Bengio's correction for overlapping folds."""
    k = len(values)
    if k < 2:
        return float("nan"), float("nan")
    half = t_quantile(0.5 + level / 2, k - 1) * np.sqrt((1 / k + test_train_ratio) * values.var(ddof=1))
    return float(values.mean() - half), float(values.mean() + half)


def summarise(folds: list[dict[str, Any]]) -> dict[str, Any]:
    counts = {f["folds"] for f in folds}
    if len(counts) != 1:
        raise ValueError(f"runs of different fold counts: {sorted(counts)}")
    seen = [f["fold"] for f in folds]
    if len(set(seen)) != len(seen):
        raise ValueError(f"a fold appears twice: {sorted(seen)}")
    values = np.array([f["score"] for f in folds])
    ratio = float(np.mean([f["n_val"] / max(f["n_train"], 1) for f in folds]))
    return {"folds": sorted(folds, key=lambda f: f["fold"]), "k": counts.pop(), "runs": len(folds), "mean": float(values.mean()),
            "sd": float(values.std(ddof=1)) if len(values) > 1 else float("nan"), "min": float(values.min()), "max": float(values.max()),
            "ci95": corrected_interval(values, ratio), "interval": "t(K-1) on the Nadeau-Bengio corrected variance (1/K + n_val/n_train) s^2"}


def paired(new: list[dict[str, Any]], base: list[dict[str, Any]]) -> dict[str, Any]:
    by_fold = {f["fold"]: f for f in base}
    common = [f for f in new if f["fold"] in by_fold]
    if len(common) < 2:
        raise ValueError("--versus needs at least two folds run by both recipes")
    diffs = np.array([f["score"] - by_fold[f["fold"]]["score"] for f in common])
    ratio = float(np.mean([f["n_val"] / max(f["n_train"], 1) for f in common]))
    return {"folds": [f["fold"] for f in common], "differences": diffs.tolist(), "mean": float(diffs.mean()), "ci95": corrected_interval(diffs, ratio)}


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fracture.folds", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders of one recipe, one per fold")
    parser.add_argument("--versus", nargs="+", type=Path, help="run folders of the recipe to compare against, same folds")
    parser.add_argument("--metric", default="val/auroc", help="validation column of metrics.csv (default val/auroc; e.g. val/froc_mean)")
    parser.add_argument("--pick", choices=["best", "last"], default="best", help="each fold's best validated epoch, or its last (the recipe's rule)")
    parser.add_argument("--out", type=Path, help="also write the summary as JSON")
    ns = parser.parse_args(args)
    try:
        result = summarise([fold_score(r, ns.metric, ns.pick) for r in ns.runs])
        if ns.versus:
            base = summarise([fold_score(r, ns.metric, ns.pick) for r in ns.versus])
            result = {"recipe": result, "versus": base, "paired": paired(result["folds"], base["folds"])}
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summaries = [("recipe", result)] if not ns.versus else [("recipe", result["recipe"]), ("versus", result["versus"])]
    for name, s in summaries:
        print(f"{name}: {ns.metric} ({ns.pick} epoch) over {s['runs']} of {s['k']} folds")
        for f in s["folds"]:
            print(f"  fold {f['fold']}: {f['score']:.4f} (epoch {f['epoch']}, {f['n_val']} validation images)  {f['run']}")
        lo, hi = s["ci95"]
        print(f"  mean {s['mean']:.4f}, sd {s['sd']:.4f}, range {s['min']:.4f}-{s['max']:.4f}, 95 % interval {lo:.4f}-{hi:.4f} ({s['interval']})")
    if ns.versus:
        p = result["paired"]
        print(f"recipe - versus, paired by fold {p['folds']}: mean {p['mean']:+.4f}, 95 % interval {p['ci95'][0]:+.4f} to {p['ci95'][1]:+.4f}")
    if ns.out:
        ns.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
