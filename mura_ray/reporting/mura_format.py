"""Results in the MURA competition's own format, and the study kappa as its evaluation script computes it.

The competition takes a CSV of ``study path,0|1`` (one row per study, the
path as in MURA's ``valid_labeled_studies.csv``, e.g.
``MURA-v1.1/valid/XR_WRIST/patient11185/study1_positive/``) and reports
Cohen's kappa from the confusion matrix, overall and per body part (a study
belongs to a body part when its path contains its upper-cased name), with
``kappa +/- 1.96 * pr_a (1 - pr_a) / (n (1 - pr_e)^2)``: that term is the
large-sample variance of kappa, not its standard error (no square root), so
its interval is far narrower than a 95% interval. mura-ray's own intervals
are a bootstrap over patients, which also counts that a patient's studies
are not independent.
"""

from __future__ import annotations

import posixpath
from typing import Any

import numpy as np

BODY_PARTS = ("Elbow", "Finger", "Forearm", "Hand", "Humerus", "Shoulder", "Wrist")
MURA_ROOT = "MURA-v1.1/"


def study_path(study_uri: str, data: str) -> str:
    """The study's path as MURA's CSVs write it: from ``MURA-v1.1/`` on, or else relative to the archive root
    ``data``; with a trailing slash."""
    uri = study_uri.rstrip("/") + "/"
    at = uri.find(MURA_ROOT)
    if at >= 0:
        return uri[at:]
    root = data.rstrip("/") + "/"
    return uri[len(root) :] if uri.startswith(root) else posixpath.basename(uri.rstrip("/")) + "/"


def predictions_csv(study_uris: np.ndarray, predicted: np.ndarray, data: str) -> str:
    """The competition's submission: ``study path,0|1`` per study, sorted by path, no header."""
    rows = sorted(zip((study_path(str(s), data) for s in study_uris), (int(bool(p)) for p in predicted)))
    return "".join(f"{path},{label}\n" for path, label in rows)


def competition_kappa(truth: np.ndarray, predicted: np.ndarray) -> tuple[float, float, float]:
    """(kappa, lower, upper) with the competition's interval term (see the module's docstring)."""
    truth, predicted = np.asarray(truth, dtype=np.int64), np.asarray(predicted, dtype=np.int64)
    n = len(truth)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    cnf = np.zeros((2, 2), dtype=np.float64)
    np.add.at(cnf, (truth, predicted), 1)
    pr_a = (cnf[0, 0] + cnf[1, 1]) / n
    pr_e = float(np.sum(cnf.sum(axis=1) * cnf.sum(axis=0))) / n / n
    if pr_e == 1.0:  # one class only, on both sides: kappa is undefined
        return float("nan"), float("nan"), float("nan")
    kappa = (pr_a - pr_e) / (1 - pr_e)
    term = pr_a * (1 - pr_a) / (n * (1 - pr_e) ** 2)
    return float(kappa), float(kappa - 1.96 * term), float(kappa + 1.96 * term)


def competition_report(study_uris: np.ndarray, labels: np.ndarray, predicted: np.ndarray, data: str) -> dict[str, Any]:
    """The competition's figures: for ``Overall`` and each body part, the studies, kappa, lower and upper."""
    paths = np.array([study_path(str(s), data) for s in study_uris], dtype=object)
    out: dict[str, Any] = {}
    for name, needle in [("Overall", "/"), *((p, p.upper()) for p in BODY_PARTS)]:
        keep = np.array([needle in p for p in paths], dtype=bool)
        if not keep.any():
            continue
        kappa, lower, upper = competition_kappa(np.asarray(labels)[keep], np.asarray(predicted)[keep])
        out[name] = {"studies": int(keep.sum()), "kappa": kappa, "lower": lower, "upper": upper}
    return out
