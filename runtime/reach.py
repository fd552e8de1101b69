"""Reach direction as the project reads it, in numpy: the one home of these rules.

Direction classes are sectors of the circle: class ``c`` of ``n`` is the angle 2 pi c / n.
A readout's angle is that of the probability-weighted class unit vectors (the resultant), so
a split decision lands between two sectors. Scores follow the paper's Table 1: acc is the
share of bins whose circular error is under pi / 8 (inside the sector), delta-acc under
3 pi / 16. Velocity decoding is scored by R^2 per component.

Training (readout fitting, evaluation), export (reference outputs), the engine's callers and
the replay all use these functions, so every number is computed the same way.
"""
from __future__ import annotations

import numpy as np


def class_angles(classes: np.ndarray, n_directions: int) -> np.ndarray:
    """Angles (radians) of direction classes."""
    return 2 * np.pi * np.asarray(classes, dtype=np.float64) / n_directions


def classes_of_angles(angles: np.ndarray, n_directions: int) -> np.ndarray:
    """Direction classes whose angles these are; ValueError if one is not a class angle."""
    angles = np.asarray(angles, dtype=np.float64)
    classes = np.rint(angles * n_directions / (2 * np.pi)).astype(np.int64)
    if not np.allclose(class_angles(classes, n_directions), angles):
        raise ValueError(f"angles {angles} are not multiples of 2 pi / {n_directions}")
    return classes


def resultant(proba: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """(B, 2): the probability-weighted sum of the class unit vectors (cos, sin)."""
    return proba @ np.stack([np.cos(angles), np.sin(angles)], axis=1)


def angle_from_proba(proba: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """The readout's angle: atan2 of the resultant of the class probabilities."""
    r = resultant(proba, angles)
    return np.arctan2(r[:, 1], r[:, 0])


def angular_error(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Absolute circular difference in [0, pi]."""
    return np.abs(np.angle(np.exp(1j * (np.asarray(pred, np.float64) - true))))


def reach_scores(pred_angle: np.ndarray, target: np.ndarray, n_directions: int) -> tuple[float, float]:
    """(acc, delta-acc): error < pi/8 (within the sector), and < 3 pi/16."""
    err = angular_error(pred_angle, class_angles(target, n_directions))
    return float(np.mean(err < np.pi / 8)), float(np.mean(err < 3 * np.pi / 16))


def r2_scores(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Coefficient of determination of each column (1 - SSE / SST)."""
    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    sst = ((true - true.mean(axis=0)) ** 2).sum(axis=0)
    return 1 - ((true - pred) ** 2).sum(axis=0) / np.where(sst > 0, sst, np.nan)
