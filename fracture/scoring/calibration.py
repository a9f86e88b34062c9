"""Recalibration of an image probability: Platt scaling, fitted on validation and chosen only where it lowers the
calibration error out of sample (torch-free; :class:`fracture.train.choices.ChosenOnValidation` puts it in the graph)."""

from __future__ import annotations

import numpy as np

from fracture.scoring import metrics


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-np.clip(z, -60, 60)))


def platt(logits: np.ndarray, labels: np.ndarray, ridge: float = 1e-3, steps: int = 50) -> tuple[float, float]:
    """Platt scaling: ``(scale, shift)`` of ``sigmoid(scale * logit + shift)`` by maximum likelihood on labelled
    logits (Newton's method; a small ridge keeps a separable set finite). Two numbers, so a few hundred
    validation images fit them without overfitting, and the order of the images (AUROC) cannot change."""
    z, y = np.asarray(logits, np.float64).ravel(), np.asarray(labels, np.float64).ravel()
    x, prior = np.stack([z, np.ones_like(z)], 1), np.array([1.0, 0.0])

    def loss(w: np.ndarray) -> float:  # negative log-likelihood (stable form) plus the ridge towards "as trained"
        v = x @ w
        return float(np.sum(np.logaddexp(0, v) - y * v) + ridge / 2 * np.sum((w - prior) ** 2))

    rate = np.clip(y.mean(), 1e-3, 1 - 1e-3)
    w = np.array([0.0, np.log(rate / (1 - rate))])  # a constant at the base rate: Newton's method is safe from here
    for _ in range(steps):
        p = _sigmoid(x @ w)
        grad = x.T @ (p - y) + ridge * (w - prior)
        hess = (x * (p * (1 - p))[:, None]).T @ x + ridge * np.eye(2)
        step, before = np.linalg.solve(hess, grad), loss(w)
        while loss(w - step) > before and np.abs(step).max() > 1e-12:  # backtrack: never a step that makes the fit worse
            step = step / 2
        w = w - step
        if np.abs(step).max() < 1e-10:
            break
    return float(w[0]), float(w[1])


def cross_fitted_platt(logits: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Each image's probability under a Platt scaling fitted on the other folds (stratified, seeded): what the
    recalibration does on images it was not fitted on, the honest figure for choosing it."""
    z, y = np.asarray(logits, np.float64).ravel(), np.asarray(labels).ravel()
    fold = metrics.stratified_folds(y, folds, seed)
    out = np.empty(len(y))
    for k in range(folds):
        scale, shift = platt(z[fold != k], y[fold != k])
        out[fold == k] = _sigmoid(scale * z[fold == k] + shift)
    return out


def choose_calibration(logits: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 0) -> dict[str, object]:
    """Platt scaling of the image logit when it lowers the expected calibration error out of sample (cross-fitted
    over ``folds``), else none: ``{"method", "scale", "shift", "ece_uncalibrated", "ece_platt_cross_fitted"}``."""
    z, y = np.asarray(logits, np.float64).ravel(), np.asarray(labels).ravel()
    before = metrics.expected_calibration_error(_sigmoid(z), y)
    after = metrics.expected_calibration_error(cross_fitted_platt(z, y, folds, seed), y)
    scale, shift = platt(z, y) if after < before else (1.0, 0.0)
    return {"method": "platt" if after < before else "none", "scale": scale, "shift": shift, "ece_uncalibrated": before,
            "ece_platt_cross_fitted": after, "n": int(y.size), "folds": folds}
