"""MURA's competition format and its kappa: the submission CSV, the study paths, the script's interval term."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from mura_ray.reporting.mura_format import competition_kappa, competition_report, predictions_csv, study_path


@pytest.mark.parametrize(
    ("uri", "data", "want"),
    [
        (
            "/d/MURA-v1.1/valid/XR_WRIST/patient11185/study1_positive",
            "/d",
            "MURA-v1.1/valid/XR_WRIST/patient11185/study1_positive/",
        ),
        (
            "s3://b/x/MURA-v1.1/valid/XR_HAND/patient1/study2_negative/",
            "s3://b/x/MURA-v1.1",
            "MURA-v1.1/valid/XR_HAND/patient1/study2_negative/",
        ),
        ("/scans/2026/XR_ELBOW/patient7/study1_positive", "/scans", "2026/XR_ELBOW/patient7/study1_positive/"),
    ],
)
def test_study_paths_are_written_as_murass_csvs_write_them(uri, data, want):
    assert study_path(uri, data) == want


def test_the_submission_has_one_sorted_row_per_study_with_the_decision():
    studies = np.array(
        ["/d/MURA-v1.1/valid/XR_HAND/p2/study1_negative", "/d/MURA-v1.1/valid/XR_ELBOW/p1/study1_positive"]
    )
    assert predictions_csv(studies, np.array([False, True]), "/d") == (
        "MURA-v1.1/valid/XR_ELBOW/p1/study1_positive/,1\nMURA-v1.1/valid/XR_HAND/p2/study1_negative/,0\n"
    )


def test_the_competitions_kappa_is_cohens_and_its_interval_term_is_the_variance():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 2, 200)
    predicted = np.where(rng.random(200) < 0.8, truth, 1 - truth)
    kappa, lower, upper = competition_kappa(truth, predicted)
    assert kappa == pytest.approx(cohen_kappa_score(truth, predicted))
    n, pr_a = 200, float(np.mean(truth == predicted))
    pr_e = (np.mean(truth) * np.mean(predicted)) + (np.mean(1 - truth) * np.mean(1 - predicted))
    term = pr_a * (1 - pr_a) / (n * (1 - pr_e) ** 2)
    assert (lower, upper) == pytest.approx((kappa - 1.96 * term, kappa + 1.96 * term))
    assert upper - lower < 2 * 1.96 * np.sqrt(term)  # narrower than the textbook interval with the square root
    assert np.isnan(competition_kappa(np.zeros(5, int), np.zeros(5, int))[0])  # one class: undefined


def test_the_report_has_the_overall_and_each_body_part_found():
    studies = np.array(
        [f"/d/MURA-v1.1/valid/XR_{p}/p{i}/study1_x" for i, p in enumerate(["HAND", "HAND", "WRIST", "WRIST"])]
    )
    labels, predicted = np.array([1, 0, 1, 0]), np.array([1, 0, 0, 0])
    report = competition_report(studies, labels, predicted, "/d")
    assert list(report) == ["Overall", "Hand", "Wrist"]
    assert report["Hand"]["studies"] == 2 and report["Hand"]["kappa"] == pytest.approx(1.0)
    assert report["Overall"]["kappa"] == pytest.approx(cohen_kappa_score(labels, predicted))
