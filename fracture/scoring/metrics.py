"""Binary classification metrics in plain numpy (fractured = 1 = positive).

Torch-free so the deployed predictor can score a labelled set on a CPU box;
the definitions match torchmetrics' binary metrics (tested against them),
including its rule that an image is called fractured when its probability is
strictly above the threshold.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

METRIC_NAMES = ("accuracy", "precision", "sensitivity", "specificity", "f1", "auroc", "average_precision")


def _check(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(np.int64)
    if probs.shape != labels.shape:
        raise ValueError(f"{probs.size} probabilities but {labels.size} labels")
    if labels.size and not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (not fractured) or 1 (fractured)")
    return probs, labels


def confusion(probs: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> dict[str, int]:
    """Counts at a threshold; fractured means probability > threshold (as torchmetrics)."""
    probs, labels = _check(probs, labels)
    pred = probs > threshold
    return {
        "tp": int(np.sum(pred & (labels == 1))),
        "fp": int(np.sum(pred & (labels == 0))),
        "tn": int(np.sum(~pred & (labels == 0))),
        "fn": int(np.sum(~pred & (labels == 1))),
    }


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else float("nan")


def auroc(probs: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties count half); NaN when a class is absent."""
    probs, labels = _check(probs, labels)
    n_pos, n_neg = int(labels.sum()), int((labels == 0).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(probs, kind="mergesort")
    ranks = np.empty(probs.size, dtype=np.float64)
    sorted_p = probs[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_p, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false-positive rate, true-positive rate, cut) per distinct probability, high to low; positive = prob >= cut."""
    probs, labels = _check(probs, labels)
    thresholds = np.unique(probs)[::-1]
    order = np.argsort(-probs, kind="mergesort")
    p, y = probs[order], labels[order]
    tps = np.cumsum(y)
    fps = np.cumsum(1 - y)
    last = np.searchsorted(-p, -thresholds, side="right") - 1  # last index with prob >= t
    tpr = tps[last] / max(int(labels.sum()), 1)
    fpr = fps[last] / max(int((labels == 0).sum()), 1)
    return np.r_[0.0, fpr], np.r_[0.0, tpr], np.r_[np.inf, thresholds]


def average_precision(probs: np.ndarray, labels: np.ndarray) -> float:
    """Step-wise area under the precision-recall curve (as torchmetrics/sklearn)."""
    probs, labels = _check(probs, labels)
    n_pos = int(labels.sum())
    if n_pos == 0:
        return float("nan")
    thresholds = np.unique(probs)[::-1]
    order = np.argsort(-probs, kind="mergesort")
    p, y = probs[order], labels[order]
    last = np.searchsorted(-p, -thresholds, side="right") - 1
    tps = np.cumsum(y)[last]
    fps = np.cumsum(1 - y)[last]
    precision = tps / (tps + fps)
    recall = tps / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def binary_metrics(probs: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Accuracy, precision, sensitivity, specificity, F1 at ``threshold``; AUROC and AP over all thresholds."""
    c = confusion(probs, labels, threshold)
    tp, fp, tn, fn = c["tp"], c["fp"], c["tn"], c["fn"]
    precision = _ratio(tp, tp + fp)
    sensitivity = _ratio(tp, tp + fn)
    return {
        "accuracy": _ratio(tp + tn, tp + fp + tn + fn),
        "precision": precision,
        "sensitivity": sensitivity,
        "specificity": _ratio(tn, tn + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "auroc": auroc(probs, labels),
        "average_precision": average_precision(probs, labels),
    }


OPERATING_POINT_RESAMPLES = 200


def operating_points(probs: np.ndarray, labels: np.ndarray, min_sensitivity: float = 0.95, groups: np.ndarray | None = None,
                     n_boot: int = OPERATING_POINT_RESAMPLES, seed: int = 0) -> dict[str, float]:
    """Named thresholds chosen on (validation) predictions.

    ``screening``: the highest threshold whose sensitivity is at least ``min_sensitivity``.
    ``balanced``: the threshold maximising Youden's J (sensitivity + specificity - 1).
    ``default``: 0.5.

    Read off one set, a point sits at the edge of a few images and moves with them: on a small validation set
    the screening point can land far from where new images need it. So each point is the mean of its threshold
    over ``n_boot`` bootstrap resamples of the set (whole ``groups`` at a time when given: copies of one
    radiograph move together) — for the screening point a smoothed quantile in the manner of Harrell and Davis
    — which moves less from one validation set to the next (``tests/test_metrics.py``). The screening point
    takes the lower of that and the point read off the set, so it never falls short of ``min_sensitivity`` on
    the set it was chosen on (a resample mean is pulled up when a few low-scored fractures drop out).
    ``n_boot=0`` gives the points read off the set itself, where each definition holds exactly.
    Thresholds sit halfway between neighbouring observed probabilities, so tiny numeric differences (ONNX vs
    torch) do not flip a decision.
    """
    probs, labels = _check(probs, labels)
    points = {"default": 0.5}
    if labels.sum() == 0 or (labels == 0).sum() == 0:
        return points
    edge = _edge_points(probs, labels, min_sensitivity)
    if n_boot <= 0:
        return {**points, **edge}
    rng = np.random.default_rng(seed)
    members = group_members(labels.size, groups)
    draws: dict[str, list[float]] = {name: [] for name in edge}
    for _ in range(n_boot):
        idx = resample(members, rng)
        if labels[idx].min() == labels[idx].max():
            continue
        for name, t in _edge_points(probs[idx], labels[idx], min_sensitivity).items():
            draws[name].append(t)
    smooth = {name: _between(float(np.mean(d)), probs) if d else edge[name] for name, d in draws.items()}
    smooth["screening"] = min(smooth["screening"], edge["screening"])  # never short of its target on the set it was chosen on
    return {**points, **smooth}


def _edge_points(probs: np.ndarray, labels: np.ndarray, min_sensitivity: float) -> dict[str, float]:
    """The screening and balanced thresholds read off one set (both classes present), exact on that set."""
    fpr, tpr, cut = roc_curve(probs, labels)
    fpr, tpr, cut = fpr[1:], tpr[1:], cut[1:]
    below = np.r_[cut[1:], cut[-1] - 1e-6]  # under the lowest: not clamped at 0, or "p > 0" would drop the images at p = 0
    thresholds = (cut + below) / 2  # probability > threshold  <=>  probability >= cut
    ok = np.flatnonzero(tpr >= min_sensitivity)
    return {"screening": float(thresholds[ok[0]]),  # cuts run high → low
            "balanced": float(thresholds[int(np.argmax(tpr - fpr))])}


def _between(t: float, probs: np.ndarray) -> float:
    """The threshold that makes ``t``'s decisions on the set ("fractured when p > t"), moved to the middle of its
    gap between observed probabilities: a resample's midpoint can fall on a probability the resample left out."""
    u = np.unique(probs)
    i = int(np.searchsorted(u, t, side="right"))  # u[i-1] <= t < u[i]: the same decisions anywhere in that gap
    if i == 0:
        return float(u[0] - 5e-7)
    if i == u.size:
        return float((u[-1] + 1.0) / 2) if u[-1] < 1.0 else float(u[-1] + 5e-7)
    return float((u[i - 1] + u[i]) / 2)


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean squared error of the probabilities (lower is better)."""
    probs, labels = _check(probs, labels)
    return float(np.mean((probs - labels) ** 2)) if labels.size else float("nan")


def calibration_bins(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> list[dict[str, float]]:
    """Equal-width probability bins: count, mean predicted probability, observed fractured rate."""
    probs, labels = _check(probs, labels)
    which = np.minimum((probs * bins).astype(int), bins - 1)
    out = []
    for b in range(bins):
        mask = which == b
        n = int(mask.sum())
        out.append({"lo": b / bins, "hi": (b + 1) / bins, "n": n,
                    "mean_prob": float(probs[mask].mean()) if n else float("nan"),
                    "observed": float(labels[mask].mean()) if n else float("nan")})
    return out


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """Count-weighted mean |observed rate - mean probability| over equal-width bins."""
    table = calibration_bins(probs, labels, bins)
    total = sum(b["n"] for b in table)
    if not total:
        return float("nan")
    return float(sum(b["n"] * abs(b["observed"] - b["mean_prob"]) for b in table if b["n"]) / total)


def all_metrics(probs: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """``binary_metrics`` plus Brier score and expected calibration error."""
    return {**binary_metrics(probs, labels, threshold), "brier": brier(probs, labels), "ece": expected_calibration_error(probs, labels)}


def bootstrap(probs: np.ndarray, labels: np.ndarray, threshold: float, groups: np.ndarray | None = None,
              n: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of ``all_metrics``; resamples whole groups when ``groups`` is given.

    Resamples where a metric is undefined (a class missing) are skipped for that metric. A proportion whose
    draws all agree (0 of 12 missed: every resample says sensitivity 1.0) gets its Wilson interval instead
    of a zero-width one.
    """
    probs, labels = _check(probs, labels)
    rng = np.random.default_rng(seed)
    members = group_members(labels.size, groups)
    draws: dict[str, list[float]] = {}
    for _ in range(n):
        idx = resample(members, rng)
        for name, value in all_metrics(probs[idx], labels[idx], threshold).items():
            if not np.isnan(value):
                draws.setdefault(name, []).append(value)
    out = {name: interval(v, level) for name, v in draws.items()}
    for name, (k, total) in proportions(confusion(probs, labels, threshold)).items():
        if name in out:
            out[name] = proportion_interval(out[name], k, total, level)
    return out


def proportion_interval(ci: tuple[float, float], k: float, n: float, level: float = 0.95) -> tuple[float, float]:
    """A bootstrap interval of the proportion ``k / n``, or its Wilson interval where every draw agreed (zero width)."""
    return wilson(k, n, level) if ci[0] == ci[1] and n else ci


def proportions(c: dict[str, int]) -> dict[str, tuple[int, int]]:
    """(successes, trials) of each metric that is a proportion of images."""
    tp, fp, tn, fn = c["tp"], c["fp"], c["tn"], c["fn"]
    return {"accuracy": (tp + tn, tp + fp + tn + fn), "precision": (tp, tp + fp), "sensitivity": (tp, tp + fn), "specificity": (tn, tn + fp)}


def wilson(k: float, n: float, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``k / n``: never of zero width, inside [0, 1] (also at 0/n and n/n)."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (0.0 if k == 0 else float(centre - half)), (1.0 if k == n else float(centre + half))  # exact ends: no rounding below 1


def interval(draws: Sequence[float] | np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of bootstrap draws."""
    alpha = (1 - level) / 2
    return float(np.quantile(draws, alpha)), float(np.quantile(draws, 1 - alpha))


def stratified_folds(labels: np.ndarray, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Each image's fold (0 .. folds-1), both classes dealt evenly over the folds in a seeded order: for
    cross-fitting a choice (thresholds, a recalibration) so every image is judged by one made without it."""
    labels = np.asarray(labels).ravel()
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), int)
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        fold[idx[rng.permutation(len(idx))]] = np.arange(len(idx)) % folds
    return fold


def group_members(n: int, groups: np.ndarray | None = None) -> list[np.ndarray]:
    """Indices of each resampling unit: one image each, or all images of a group."""
    if groups is None:
        return [np.array([i]) for i in range(n)]
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    order = np.argsort(inverse, kind="mergesort")
    return np.split(order, np.flatnonzero(np.diff(inverse[order])) + 1)


def resample(members: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """One bootstrap draw: as many units as there are, with replacement, all images of each."""
    pick = rng.integers(0, len(members), len(members))
    return np.concatenate([members[g] for g in pick])


STUDY_AGGREGATIONS = ("max", "mean", "noisy_or")


def aggregate_studies(probs: np.ndarray, studies: np.ndarray, method: str = "max", labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One probability per study from its images: ``max``, ``mean`` or ``noisy_or`` (1 - prod(1 - p)).

    Returns (study keys in sorted order, study probabilities, study labels = any image fractured, when given).
    """
    if method not in STUDY_AGGREGATIONS:
        raise ValueError(f"study aggregation must be one of {STUDY_AGGREGATIONS}, got {method!r}")
    keys, inverse = np.unique(np.asarray(studies).astype(str), return_inverse=True)
    p = np.asarray(probs, np.float64)
    if method == "max":
        out = np.full(len(keys), -np.inf)
        np.maximum.at(out, inverse, p)
    elif method == "mean":
        out = np.bincount(inverse, p, len(keys)) / np.bincount(inverse, minlength=len(keys))
    else:
        out = 1 - np.exp(np.bincount(inverse, np.log1p(-np.clip(p, 0, 1 - 1e-12)), len(keys)))
    study_labels = None
    if labels is not None:
        study_labels = np.zeros(len(keys), np.int64)
        np.maximum.at(study_labels, inverse, np.asarray(labels, np.int64))
    return keys, out, study_labels


def choose_study_aggregation(probs: np.ndarray, labels: np.ndarray, studies: np.ndarray) -> dict[str, object]:
    """The aggregation with the best study-level AUROC on a split with study keys; ``max`` when it cannot tell.

    ``max`` also wins ties: a fracture seen on one view is a fractured study.
    """
    keys = np.asarray(studies).astype(str)
    multi = len(np.unique(keys)) < len(keys)
    if not multi:
        return {"method": "max", "chosen_on": "default: no study with more than one image in the validation split"}
    scores = {}
    for method in STUDY_AGGREGATIONS:
        _, p, y = aggregate_studies(probs, keys, method, labels)
        scores[method] = auroc(p, y)
    best = max(STUDY_AGGREGATIONS, key=lambda m: (np.nan_to_num(scores[m], nan=-1.0), m == "max"))
    return {"method": best, "chosen_on": f"validation split: {len(np.unique(keys))} studies, {len(keys)} images", "val_study_auroc": scores}
