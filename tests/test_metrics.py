from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import (
    binary_accuracy,
    binary_auroc,
    binary_average_precision,
    binary_f1_score,
    binary_precision,
    binary_recall,
    binary_specificity,
)

from fracture.scoring import calibration, metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_numpy_metrics_match_torchmetrics(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 300)
    probs = np.clip(labels * 0.3 + rng.random(300) * 0.7, 0, 1)
    probs[:40] = np.round(probs[:40], 1)  # ties
    ours = metrics.binary_metrics(probs, labels, 0.5)
    p, y = torch.tensor(probs), torch.tensor(labels)
    theirs = {
        "accuracy": binary_accuracy(p, y), "precision": binary_precision(p, y), "sensitivity": binary_recall(p, y),
        "specificity": binary_specificity(p, y), "f1": binary_f1_score(p, y), "auroc": binary_auroc(p, y),
        "average_precision": binary_average_precision(p, y),
    }
    for name, value in theirs.items():
        assert ours[name] == pytest.approx(float(value), abs=1e-6), name


def test_fractured_is_the_positive_class() -> None:
    m = metrics.binary_metrics(np.array([0.9, 0.8, 0.2, 0.1]), np.array([1, 0, 0, 0]))
    assert m["sensitivity"] == 1.0 and m["precision"] == 0.5 and m["specificity"] == 2 / 3


def test_undefined_metrics_are_nan_not_errors() -> None:
    m = metrics.binary_metrics(np.array([0.2, 0.7]), np.array([0, 0]))
    assert np.isnan(m["auroc"]) and np.isnan(m["sensitivity"]) and m["specificity"] == 0.5


def test_operating_points_meet_their_definitions() -> None:
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, 500)
    probs = 1 / (1 + np.exp(-(labels * 2 - 1 + rng.normal(0, 1.2, 500))))
    points = metrics.operating_points(probs, labels, min_sensitivity=0.95, n_boot=0)  # read off the set itself
    assert points["default"] == 0.5
    at = metrics.binary_metrics(probs, labels, points["screening"])
    assert at["sensitivity"] >= 0.95
    next_up = probs[probs > points["screening"]].min()  # the next threshold that changes any decision
    assert metrics.binary_metrics(probs, labels, next_up)["sensitivity"] < 0.95
    youden = lambda t: (lambda m: m["sensitivity"] + m["specificity"])(metrics.binary_metrics(probs, labels, t))  # noqa: E731
    best = max(youden(t) for t in np.r_[np.unique(probs), 0.0] - 1e-9)
    assert youden(points["balanced"]) == pytest.approx(best)


def _validation_set(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One validation set drawn from a fixed population: 18 % fractured, scores separated by 2.2 SD."""
    labels = (rng.random(n) < 0.18).astype(int)
    return 1 / (1 + np.exp(-(rng.normal(0, 1, n) + 2.2 * labels - 1.5))), labels


def test_resampled_operating_points_move_less_between_validation_sets_than_points_read_off_one_set() -> None:
    rng = np.random.default_rng(1)
    sets = [_validation_set(200, rng) for _ in range(40)]
    edge = [metrics.operating_points(p, y, 0.95, n_boot=0) for p, y in sets]
    bagged = [metrics.operating_points(p, y, 0.95) for p, y in sets]
    for name in ("screening", "balanced"):
        old, new = np.array([d[name] for d in edge]), np.array([d[name] for d in bagged])
        assert new.std() < 0.97 * old.std(), name  # the spread a site would see from one small validation set to the next
        assert abs(new.mean() - old.mean()) < 0.02, name  # steadier, not shifted
    for (p, y), points in zip(sets, bagged):
        assert not np.isin([points["screening"], points["balanced"]], p).any()  # never on an observed probability
        assert metrics.binary_metrics(p, y, points["screening"])["sensitivity"] >= 0.95


def test_grouped_resampling_moves_copies_of_one_radiograph_together() -> None:
    for seed in (2, 3, 4):
        rng = np.random.default_rng(seed)
        probs, labels = _validation_set(150, rng)
        hardest = np.flatnonzero(labels == 1)[np.argmin(probs[labels == 1])]  # the fractured image scored lowest, present 6 times
        copies = np.r_[probs, np.repeat(probs[hardest], 5)], np.r_[labels, np.ones(5, int)]
        groups = np.r_[np.arange(150), np.full(5, hardest)]
        grouped, as_images = metrics.operating_points(*copies, 0.95, groups=groups), metrics.operating_points(*copies, 0.95)
        assert grouped["balanced"] != as_images["balanced"]  # the unit of resampling is the radiograph, not the file
        assert grouped == metrics.operating_points(*copies, 0.95, groups=groups)  # seeded: the same set gives the same points
        for points in (grouped, as_images):  # the screening point never falls short of its target where it was chosen
            assert metrics.binary_metrics(*copies, points["screening"])["sensitivity"] >= 0.95


def test_a_proportion_at_zero_or_one_gets_a_wilson_interval_not_a_zero_width_one() -> None:
    # Wilson 95 % for 0/10: (0, z^2/(n+z^2)) = (0, 0.2775); for 10/10 its mirror
    assert metrics.wilson(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-4)
    assert metrics.wilson(10, 10) == pytest.approx((0.72247, 1.0), abs=1e-4)
    lo, hi = metrics.wilson(5, 10)
    assert lo == pytest.approx(0.23659, abs=1e-4) and hi == pytest.approx(0.76341, abs=1e-4)
    # every fractured image above the threshold: the bootstrap's draws all say 1.0; the interval says how sure 12 images make us
    probs = np.r_[np.full(12, 0.9), np.linspace(0.0, 0.8, 30)]
    labels = np.r_[np.ones(12), np.zeros(30)].astype(int)
    ci = metrics.bootstrap(probs, labels, 0.5, n=200)
    assert ci["sensitivity"] == pytest.approx(metrics.wilson(12, 12)) and ci["sensitivity"][0] < 0.8
    assert ci["specificity"][0] < ci["specificity"][1]  # a proportion strictly inside (0, 1) keeps its bootstrap interval


def test_the_screening_point_keeps_images_at_probability_zero() -> None:
    """The lowest validation probability exactly 0.0: the threshold goes under it, so "p > t" still flags them."""
    probs, labels = np.array([0.0, 0.0, 0.3, 0.6]), np.array([1, 0, 0, 1])
    points = metrics.operating_points(probs, labels, min_sensitivity=1.0, n_boot=0)
    flagged = probs > points["screening"]
    assert points["screening"] < 0.0 and flagged[labels == 1].all()
    assert metrics.operating_points(np.array([0.1, 0.2, 0.3, 0.6]), labels, 1.0, n_boot=0)["screening"] == pytest.approx(0.1, abs=1e-5)


def test_platt_scaling_recovers_a_known_miscalibration_and_is_chosen_only_when_it_helps_out_of_sample() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, 20000)
    y = (rng.random(z.size) < 1 / (1 + np.exp(-(0.4 * z - 1.5)))).astype(int)  # over-confident and too high: focal-loss-like
    scale, shift = calibration.platt(z, y)
    assert scale == pytest.approx(0.4, abs=0.03) and shift == pytest.approx(-1.5, abs=0.08)
    small = slice(0, 400)  # a validation set's size: the choice is made on cross-fitted folds, never in sample
    chosen = calibration.choose_calibration(z[small], y[small])
    assert chosen["method"] == "platt" and chosen["ece_platt_cross_fitted"] < chosen["ece_uncalibrated"] - 0.05
    recalibrated = 1 / (1 + np.exp(-(chosen["scale"] * z + chosen["shift"])))
    raw = 1 / (1 + np.exp(-z))
    assert metrics.auroc(recalibrated, y) == pytest.approx(metrics.auroc(raw, y))  # monotone: the ranking is untouched
    assert metrics.expected_calibration_error(recalibrated[400:], y[400:]) < 0.5 * metrics.expected_calibration_error(raw[400:], y[400:])

    for seed in range(4):  # already calibrated: kept, or scaled by next to nothing where the folds' noise says it helps
        r = np.random.default_rng(seed + 1)
        zz = r.normal(0, 3, 400)
        kept = calibration.choose_calibration(zz, (r.random(400) < 1 / (1 + np.exp(-zz))).astype(int))
        assert abs(kept["scale"] - 1) < 0.15 and abs(kept["shift"]) < 0.2
        assert (kept["method"] == "none") == ((kept["scale"], kept["shift"]) == (1.0, 0.0))
    # a separable set stays finite (the ridge): no infinite scale from a perfect ranking
    assert np.isfinite(calibration.platt(np.array([-2.0, -1.0, 1.0, 2.0]), np.array([0, 0, 1, 1]))).all()
