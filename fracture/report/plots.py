"""The evaluation report's figures (matplotlib, torch-free): ROC, precision-recall, confusion matrices,
reliability, score histograms, training curves and the most confident errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fracture.imaging import preprocess
from fracture.scoring import metrics

COLOURS = {"default": "tab:gray", "screening": "tab:red", "balanced": "tab:blue"}


def evaluation_plots(out: Path, probs: np.ndarray, labels: np.ndarray, thresholds: dict[str, float], paths: list[str], run_dir: Path | None) -> list[str]:
    """Write the PNGs; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {"roc.png": lambda: roc(plt, probs, labels, thresholds), "pr.png": lambda: precision_recall(plt, probs, labels, thresholds),
               "confusion.png": lambda: confusion(plt, probs, labels, thresholds), "reliability.png": lambda: reliability(plt, probs, labels),
               "training_curves.png": lambda: training_curves(plt, run_dir), "errors.png": lambda: errors(plt, probs, labels, paths)}
    made = []
    for name, draw in figures.items():
        fig = draw()
        if fig is None:
            continue
        fig.tight_layout()
        fig.savefig(out / name, dpi=110 if name == "errors.png" else 120)
        plt.close(fig)
        made.append(name)
    return made


def roc(plt, probs: np.ndarray, labels: np.ndarray, thresholds: dict[str, float]):
    fpr, tpr, _ = metrics.roc_curve(probs, labels)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, lw=2, label=f"ROC (AUROC {metrics.auroc(probs, labels):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    for name, t in thresholds.items():
        m = metrics.binary_metrics(probs, labels, t)
        ax.plot(1 - m["specificity"], m["sensitivity"], "o", ms=8, color=COLOURS.get(name, "tab:green"), label=f"{name} (t={t:.3f})")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC, fractured = positive")
    ax.legend(loc="lower right", fontsize=8)
    return fig


def precision_recall(plt, probs: np.ndarray, labels: np.ndarray, thresholds: dict[str, float]):
    order = np.argsort(-probs, kind="mergesort")
    tp = np.cumsum(labels[order])
    precision = tp / np.arange(1, len(order) + 1)
    recall = tp / max(labels.sum(), 1)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(recall, precision, lw=2, label=f"AP {metrics.average_precision(probs, labels):.3f}")
    ax.axhline(labels.mean(), color="k", ls="--", lw=0.8, label=f"prevalence {labels.mean():.2f}")
    for name, t in thresholds.items():
        m = metrics.binary_metrics(probs, labels, t)
        ax.plot(m["sensitivity"], m["precision"], "o", ms=8, color=COLOURS.get(name, "tab:green"), label=name)
    ax.set(xlabel="recall (sensitivity)", ylabel="precision", title="Precision-recall", ylim=(0, 1.02))
    ax.legend(fontsize=8)
    return fig


def confusion(plt, probs: np.ndarray, labels: np.ndarray, thresholds: dict[str, float]):
    fig, axes = plt.subplots(1, len(thresholds), figsize=(3.3 * len(thresholds), 3.3))
    for ax, (name, t) in zip(np.atleast_1d(axes), thresholds.items()):
        c = metrics.confusion(probs, labels, t)
        grid = np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]])
        ax.imshow(grid, cmap="Blues")
        for (i, j), v in np.ndenumerate(grid):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=12, color="black")
        ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["not fr.", "fractured"], yticklabels=["not fr.", "fractured"], xlabel="predicted", ylabel="true", title=f"{name} (t={t:.3f})")
    return fig


def reliability(plt, probs: np.ndarray, labels: np.ndarray):
    bins = metrics.calibration_bins(probs, labels)
    fig, ax = plt.subplots(figsize=(5, 5))
    full = [b for b in bins if b["n"]]
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect calibration")
    ax.plot([b["mean_prob"] for b in full], [b["observed"] for b in full], "o-", label=f"model (ECE {metrics.expected_calibration_error(probs, labels):.3f})")
    ax2 = ax.twinx()
    ax2.bar([(b["lo"] + b["hi"]) / 2 for b in bins], [b["n"] for b in bins], width=0.09, alpha=0.2, color="gray")
    ax2.set_ylabel("images per bin")
    ax.set(xlabel="predicted probability", ylabel="observed fractured rate", title="Reliability", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left", fontsize=8)
    return fig


def training_curves(plt, run_dir: Path | None):
    """Loss and validation metrics per epoch from the run's metrics.csv; None without one."""
    log = run_dir / "metrics.csv" if run_dir else None
    if not (log and log.is_file()):
        return None
    by_epoch = pd.read_csv(log).groupby("epoch").max(numeric_only=True)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
    for key in ("train/loss_epoch", "val/loss"):
        if key in by_epoch:
            a1.plot(by_epoch.index, by_epoch[key], "o-", label=key)
    for key in ("train/auroc", "val/auroc", "val/sensitivity", "val/specificity"):
        if key in by_epoch:
            a2.plot(by_epoch.index, by_epoch[key], "o-", label=key)
    a1.set(xlabel="epoch", title="loss")
    a2.set(xlabel="epoch", title="validation metrics", ylim=(0, 1.02))
    a1.legend(fontsize=8)
    a2.legend(fontsize=8)
    return fig


def errors(plt, probs: np.ndarray, labels: np.ndarray, paths: list[str]):
    """The most confident misses (top row) and false alarms (bottom row)."""
    fn = [i for i in np.argsort(probs) if labels[i] == 1][:6]
    fp = [i for i in np.argsort(-probs) if labels[i] == 0][:6]
    cols = max(len(fn), len(fp), 1)
    fig, axes = plt.subplots(2, cols, figsize=(2.2 * cols, 5), squeeze=False)
    for row, (title, picks) in enumerate((("missed fracture", fn), ("false alarm", fp))):
        for k in range(cols):
            ax = axes[row][k]
            ax.axis("off")
            if k < len(picks):
                i = picks[k]
                ax.imshow(preprocess.read_image(paths[i]), cmap="gray")
                ax.set_title(f"{title}\np={probs[i]:.3f}\n{Path(paths[i]).name}", fontsize=7)
    fig.suptitle("Most confident errors (false negatives top, false positives bottom)", fontsize=9)
    return fig
