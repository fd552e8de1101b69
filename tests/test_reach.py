"""Reach direction as the project scores it (runtime/reach.py): class angles, the resultant's
angle, circular errors, the paper's acc (< pi/8) and delta-acc (< 3 pi/16), and R^2."""
from __future__ import annotations

import numpy as np
import pytest

from swapvae.runtime.reach import (
    angle_from_proba,
    angular_error,
    class_angles,
    classes_of_angles,
    r2_scores,
    reach_scores,
    resultant,
)


def test_class_angles_and_back():
    classes = np.array([0, 2, 3, 7])
    angles = class_angles(classes, 8)
    np.testing.assert_allclose(angles, [0, np.pi / 2, 3 * np.pi / 4, 7 * np.pi / 4])
    np.testing.assert_array_equal(classes_of_angles(angles, 8), classes)
    with pytest.raises(ValueError, match="not multiples of 2 pi / 8"):
        classes_of_angles([0.1], 8)


def test_the_angle_is_that_of_the_probability_weighted_class_vectors():
    angles = class_angles(np.arange(4), 4)
    np.testing.assert_allclose(angle_from_proba(np.array([[0, 1.0, 0, 0]]), angles), [np.pi / 2])
    split = np.array([[0.5, 0.5, 0, 0]])  # between classes 0 and 1: half way, pi/4
    np.testing.assert_allclose(angle_from_proba(split, angles), [np.pi / 4])
    np.testing.assert_allclose(resultant(split, angles), [[0.5, 0.5]], atol=1e-12)


def test_angular_error_wraps_around_the_circle():
    np.testing.assert_allclose(angular_error([np.pi - 0.1, 0.1, 3 * np.pi], [-np.pi + 0.1, -0.1, np.pi]),
                               [0.2, 0.2, 0.0], atol=1e-12)


def test_acc_counts_errors_under_a_sector_and_delta_acc_under_one_and_a_half():
    target = np.zeros(4, int)  # class 0: angle 0
    pred = np.array([0.0, np.pi / 8 - 1e-6, np.pi / 8 + 1e-6, 3 * np.pi / 16 + 1e-6])
    acc, dacc = reach_scores(pred, target, 8)
    assert (acc, dacc) == (0.5, 0.75)
    assert reach_scores(-pred, target, 8) == (acc, dacc)  # symmetric


def test_r2_per_column_and_nan_for_a_constant_target():
    true = np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0]])
    r2 = r2_scores(true + [[0.1, 0], [0, 0], [-0.1, 0]], true)
    assert r2[0] == pytest.approx(1 - 0.02 / 2) and np.isnan(r2[1])
    assert r2_scores(np.full((3, 1), 2.0), true[:, :1])[0] == pytest.approx(0.0)
