"""Temperature scaling and the calibration figures, on data whose calibration is known."""

import numpy as np
import pytest
from sklearn.metrics import brier_score_loss, roc_auc_score

from mura_ray.model.calibration import apply_temperature, fit_temperature, logit
from mura_ray.reporting.calibration import calibration_report, ece, reliability_bins


def _overconfident(n: int = 4000, true_t: float = 2.5, seed: int = 0):
    """Labels drawn from calibrated probabilities, and those probabilities made overconfident by 1/T."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, n)
    labels = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)
    return labels, 1 / (1 + np.exp(-z * true_t))


def test_fit_temperature_recovers_the_overconfidence_and_lowers_ece_and_brier():
    labels, probs = _overconfident()
    t = fit_temperature(labels, probs)
    assert t == pytest.approx(2.5, rel=0.1)
    calibrated = apply_temperature(probs, t)
    assert ece(labels, calibrated) < 0.5 * ece(labels, probs)
    assert brier_score_loss(labels, calibrated) < brier_score_loss(labels, probs)
    # The order of the scores, hence AUROC, does not change.
    assert roc_auc_score(labels, calibrated) == pytest.approx(roc_auc_score(labels, probs), abs=1e-9)


def test_temperature_one_and_one_class_change_nothing():
    probs = np.array([0.1, 0.4, 0.9], np.float32)
    assert np.array_equal(apply_temperature(probs, 1.0), probs)
    assert fit_temperature(np.array([1, 1, 1]), probs) == 1.0
    assert np.allclose(1 / (1 + np.exp(-logit(probs))), probs, atol=1e-6)


def test_ece_by_hand():
    # Bin [0.1, 0.2): two cases at 0.15, one positive -> |0.15 - 0.5| = 0.35, weight 2/4.
    # Bin [0.9, 1.0]: two cases at 0.95 and 1.0, both positive -> |0.975 - 1| = 0.025, weight 2/4.
    labels = np.array([0, 1, 1, 1])
    probs = np.array([0.15, 0.15, 0.95, 1.0])
    assert ece(labels, probs) == pytest.approx(0.5 * 0.35 + 0.5 * 0.025)
    bins = reliability_bins(labels, probs)
    assert bins["count"][1] == 2 and bins["count"][9] == 2 and sum(bins["count"]) == 4


def test_calibration_report_has_both_levels_before_and_after():
    labels, probs = _overconfident(n=400, seed=3)
    studies = np.array([f"s{i // 2}" for i in range(400)])
    t = fit_temperature(labels, probs)
    r = calibration_report(labels, probs, apply_temperature(probs, t), studies, t)
    assert r["temperature"] == t
    assert r["image"]["after"]["ece"] < r["image"]["before"]["ece"]
    assert sum(r["study"]["before"]["bins"]["count"]) == 200
