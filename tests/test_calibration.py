"""Calibration (Platt and temperature scaling) and the calibration figures, on data whose calibration is known."""

import numpy as np
import pytest
from sklearn.metrics import brier_score_loss, roc_auc_score

from mura_ray.model.calibration import Calibration, class_weight_offset, fit, fit_temperature, logit
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
    calibrated = Calibration(t).apply(probs)
    assert ece(labels, calibrated) < 0.5 * ece(labels, probs)
    assert brier_score_loss(labels, calibrated) < brier_score_loss(labels, probs)
    # The order of the scores, hence AUROC, does not change.
    assert roc_auc_score(labels, calibrated) == pytest.approx(roc_auc_score(labels, probs), abs=1e-9)


def test_temperature_one_and_one_class_change_nothing():
    probs = np.array([0.1, 0.4, 0.9], np.float32)
    assert np.array_equal(Calibration().apply(probs), probs)
    assert fit(np.array([1, 1, 1]), probs) == Calibration(1.0, 0.0, "platt")
    assert fit_temperature(np.array([1, 1, 1]), probs) == 1.0
    assert np.allclose(1 / (1 + np.exp(-logit(probs))), probs, atol=1e-6)


def _class_weighted(n: int = 6000, seed: int = 0):
    """Labels with 1 abnormal in 4, and the probabilities of a model trained with inverse-frequency class weights:
    its logit is the true one (overconfident by 1.5) shifted by log(w1 / w0) = log(n0 / n1)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(-1.5, 1.5, n)
    labels = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)
    weights = [n / (2 * np.sum(labels == 0)), n / (2 * np.sum(labels == 1))]
    shift = class_weight_offset(weights)
    return labels, 1 / (1 + np.exp(-(1.5 * z + shift))), weights, shift


def test_platt_takes_back_the_class_weights_shift_that_temperature_cannot():
    labels, probs, weights, shift = _class_weighted()
    platt, temperature = fit(labels, probs, "platt"), fit(labels, probs, "temperature")
    # z' = z_model / T + b = z when T = 1.5 and b = -shift / 1.5.
    assert platt.temperature == pytest.approx(1.5, rel=0.1) and platt.offset == pytest.approx(-shift / 1.5, abs=0.15)
    assert shift == pytest.approx(np.log(3), abs=0.15) and temperature.offset == 0.0
    e_raw, e_t, e_p = (ece(labels, c.apply(probs)) for c in (Calibration(), temperature, platt))
    print(f"ECE raw {e_raw:.3f}, temperature {e_t:.3f}, platt {e_p:.3f}; offset {platt.offset:+.3f}")
    assert e_p < 0.02 and e_p < 0.5 * e_t
    # The mean calibrated probability matches the prevalence only when the offset is taken back.
    assert abs(platt.apply(probs).mean() - labels.mean()) < 0.01 < abs(temperature.apply(probs).mean() - labels.mean())
    assert roc_auc_score(labels, platt.apply(probs)) == pytest.approx(roc_auc_score(labels, probs), abs=1e-6)


def test_a_calibration_round_trips_through_the_metadata_and_old_models_read_as_temperature_only():
    cal = Calibration(1.7, -0.4, "platt")
    assert Calibration.of(dict(cal.record(), threshold=0.5)) == cal
    assert Calibration.of({"temperature": 2.0}) == Calibration(2.0, 0.0, "temperature")
    probs = np.array([0.2, 0.5, 0.8])
    expected = 1 / (1 + np.exp(-(logit(probs) / 1.7 - 0.4)))
    assert np.allclose(cal.apply(probs), expected, atol=1e-6)
    with pytest.raises(ValueError, match="unknown calibration"):
        fit(np.array([0, 1]), probs[:2], "isotonic")


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
    cal = fit(labels, probs, "temperature")
    r = calibration_report(labels, probs, cal.apply(probs), studies, cal)
    assert r["temperature"] == cal.temperature and Calibration.of(r) == cal
    assert r["image"]["after"]["ece"] < r["image"]["before"]["ece"]
    assert sum(r["study"]["before"]["bins"]["count"]) == 200
