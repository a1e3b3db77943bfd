"""How well probabilities are calibrated: ECE, Brier score and the reliability diagram's bins. No Ray, no torch.

ECE is the expected calibration error over 10 equal-width bins of the
predicted probability: the bins' |mean prediction - observed frequency|,
weighted by their share of the cases. The Brier score is scikit-learn's.
Both are reported before and after calibration (``model.calibration``), for images and for
studies (a study's probability is the mean of its images').
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import brier_score_loss

from mura_ray.model.calibration import Calibration
from mura_ray.reporting.metrics import fmt, study_scores

BINS = 10


def reliability_bins(labels: np.ndarray, probs: np.ndarray, bins: int = BINS) -> dict[str, list[float]]:
    """Per equal-width bin: ``count``, ``mean_prob`` and ``frequency`` (observed share of label 1; NaN if empty)."""
    labels = np.asarray(labels, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    which = np.clip((probs * bins).astype(np.int64), 0, bins - 1)  # a probability of 1.0 goes to the last bin
    count = np.bincount(which, minlength=bins).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_prob = np.bincount(which, weights=probs, minlength=bins) / count
        frequency = np.bincount(which, weights=labels, minlength=bins) / count
    return {"count": count.tolist(), "mean_prob": mean_prob.tolist(), "frequency": frequency.tolist()}


def ece(labels: np.ndarray, probs: np.ndarray, bins: int = BINS) -> float:
    """Expected calibration error over ``bins`` equal-width bins (NaN with no cases)."""
    b = reliability_bins(labels, probs, bins)
    count = np.asarray(b["count"])
    if count.sum() == 0:
        return float("nan")
    gap = np.abs(np.nan_to_num(np.asarray(b["mean_prob"]) - np.asarray(b["frequency"])))
    return float((gap * count).sum() / count.sum())


def brier(labels: np.ndarray, probs: np.ndarray) -> float:
    return float(brier_score_loss(labels, probs)) if len(labels) else float("nan")


def calibration_report(
    labels: np.ndarray, raw: np.ndarray, calibrated: np.ndarray, studies: np.ndarray, calibration: Calibration
) -> dict[str, Any]:
    """ECE, Brier and reliability bins before and after ``calibration``, for images and studies."""
    report: dict[str, Any] = {**calibration.record(), "bins": BINS}
    for level in ("image", "study"):
        report[level] = {}
        for when, probs in (("before", raw), ("after", calibrated)):
            if level == "study":
                _, p, y = study_scores(studies, probs, labels)
            else:
                y, p = labels, probs
            report[level][when] = {"ece": ece(y, p), "brier": brier(y, p), "bins": reliability_bins(y, p)}
    return report


def calibration_table(report: dict[str, Any]) -> list[str]:
    """ECE and Brier before and after calibration, per level, as Markdown table lines."""
    lines = ["| level | ECE before | ECE after | Brier before | Brier after |", "|---|---|---|---|---|"]
    for level in ("image", "study"):
        b, a = report[level]["before"], report[level]["after"]
        lines.append(f"| {level} | {fmt(b['ece'])} | {fmt(a['ece'])} | {fmt(b['brier'])} | {fmt(a['brier'])} |")
    return lines


def calibration_line(report: dict[str, Any], level: str = "study") -> str:
    """``ECE 0.081 -> 0.032, Brier 0.110 -> 0.098 (T = 1.62, b = -0.41 (platt))`` for one level."""
    before, after = report[level]["before"], report[level]["after"]
    return (
        f"ECE {before['ece']:.3f} -> {after['ece']:.3f}, Brier {before['brier']:.3f} -> {after['brier']:.3f} "
        f"({Calibration.of(report).describe()})"
    )
