"""Metrics (no Ray): one kappa and one AUROC, checked against scikit-learn; thresholds; bootstrap intervals."""

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score, f1_score, recall_score, roc_auc_score

from mura_ray.reporting.metrics import (
    auroc_rows,
    binary_metrics,
    bootstrap_ci,
    choose_threshold,
    cluster_resamples,
    fmt,
    kappa_rows,
    study_scores,
)


def test_metrics_equal_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = np.clip(y * 0.3 + rng.random(300) * 0.7, 0, 1)
    m = binary_metrics(y, p, threshold=0.5)
    pred = (p >= 0.5).astype(int)
    assert m["kappa"] == pytest.approx(cohen_kappa_score(y, pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["auroc"] == pytest.approx(roc_auc_score(y, p))
    assert m["sensitivity"] == pytest.approx(((pred == 1) & (y == 1)).sum() / (y == 1).sum())
    ids, sp, sl = study_scores(np.array(["b", "a", "b"]), np.array([0.2, 0.9, 0.4]), np.array([1, 0, 1]))
    assert list(ids) == ["a", "b"] and np.allclose(sp, [0.9, 0.3]) and list(sl) == [0, 1]


@pytest.mark.parametrize(
    "y, pred",
    [([0, 0, 1, 1], [0, 1, 1, 1]), ([0, 0, 0], [0, 0, 0]), ([1, 1, 1], [0, 0, 0]), ([0, 1, 0, 1], [1, 0, 1, 0])],
)
def test_kappa_rows_equals_sklearn_including_constant_cases(y, pred):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = cohen_kappa_score(y, pred)
    got = float(kappa_rows(np.array(y), np.array(pred)))
    assert (np.isnan(got) and np.isnan(expected)) or got == pytest.approx(expected)


def test_fmt_writes_three_decimals_or_na():
    assert (fmt(0.12345), fmt(float("nan")), fmt(None)) == ("0.123", "n/a", "n/a")


def test_target_sensitivity_picks_the_highest_threshold_that_reaches_it():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    probs = np.clip(labels * 0.3 + rng.normal(0.35, 0.2, 300), 0, 1)
    for target in (0.8, 0.9, 0.95):
        t = choose_threshold(labels, probs, target_sensitivity=target)
        assert recall_score(labels, (probs >= t).astype(int)) >= target
        # t lies between two observed scores; the next split up (one case fewer called abnormal) misses the target.
        above = np.unique(probs)[np.unique(probs) > t]
        assert not np.isin(t, probs)
        assert recall_score(labels, (probs >= above[1]).astype(int)) < target
    best = choose_threshold(labels, probs)
    kappa = cohen_kappa_score(labels, (probs >= best).astype(int))
    assert all(cohen_kappa_score(labels, (probs >= c).astype(int)) <= kappa + 1e-12 for c in np.unique(probs))


@pytest.mark.parametrize("by_patient", [False, True])
def test_bootstrap_intervals_equal_sklearn_on_the_same_resamples(by_patient):
    rng = np.random.default_rng(3)
    n = 120
    labels = rng.integers(0, 2, n)
    probs = np.round(np.clip(labels * 0.25 + rng.normal(0.4, 0.2, n), 0, 1), 2)  # ties on purpose
    patients = np.array([f"p{i // 3 + (i % 7 == 0)}" for i in range(n)]) if by_patient else None
    got = bootstrap_ci(labels, probs, 0.5, clusters=patients, resamples=200, seed=7)
    # The same resamples, built explicitly: each drawn patient brings all their rows, as often as drawn.
    counts, inverse = cluster_resamples(np.arange(n) if patients is None else patients, 200, 7)
    rows = [np.repeat(np.arange(n), c[inverse]) for c in counts]
    if by_patient:
        assert len({len(r) for r in rows}) > 1  # patients differ in size, so resamples do too
    kappas = [cohen_kappa_score(labels[i], (probs[i] >= 0.5).astype(int)) for i in rows]
    aurocs = [roc_auc_score(labels[i], probs[i]) for i in rows if 0 < labels[i].sum() < len(i)]
    assert got["kappa_ci"] == pytest.approx(list(np.quantile(kappas, [0.025, 0.975])), abs=1e-12)
    assert got["auroc_ci"] == pytest.approx(list(np.quantile(aurocs, [0.025, 0.975])), abs=1e-12)


def test_auroc_rows_equals_sklearn_with_ties():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 300)
    probs = np.round(rng.random(300) * 0.6 + labels * 0.2, 1)
    assert float(auroc_rows(labels, probs)) == pytest.approx(roc_auc_score(labels, probs), abs=1e-12)


def test_patient_intervals_are_wider_when_a_patients_images_agree():
    """Images of one patient share their errors; resampling images as if independent understates the spread."""
    rng = np.random.default_rng(11)
    patients = np.repeat([f"p{i}" for i in range(40)], 8)
    labels = np.repeat(rng.integers(0, 2, 40), 8)
    shift = np.repeat(rng.normal(0, 0.25, 40), 8)  # a per-patient error, the same on each of their images
    probs = np.clip(0.3 + 0.4 * labels + shift + rng.normal(0, 0.02, len(labels)), 0, 1)
    by_image = bootstrap_ci(labels, probs, 0.5, resamples=500, seed=1)
    by_patient = bootstrap_ci(labels, probs, 0.5, clusters=patients, resamples=500, seed=1)
    width = {k: (by_patient[k][1] - by_patient[k][0]) / (by_image[k][1] - by_image[k][0]) for k in by_image}
    assert width["kappa_ci"] > 1.8 and width["auroc_ci"] > 1.8, width
