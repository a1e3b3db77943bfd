"""Image- and study-level metrics, their bootstrap intervals and the decision threshold. No Ray, no torch.

Kappa and AUROC have one implementation each (``kappa_rows``,
``auroc_rows``), vectorised over rows so that the same code gives a single
value and a thousand bootstrap resamples at once; the tests check both
against scikit-learn. ``fmt`` is the one way numbers are written in reports.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def fmt(v: Any) -> str:
    """A metric for a report: three decimals, or ``n/a`` when undefined."""
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def fmt_ci(v: list[float]) -> str:
    return f"[{fmt(v[0])}, {fmt(v[1])}]"


def kappa_rows(y: np.ndarray, pred: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Cohen's kappa of 0/1 labels and 0/1 decisions along the last axis, as scikit-learn defines it.

    ``weights`` (same shape, or (R, n) against (n,) rows) count each row that many times,
    as a bootstrap resample does. When both are constant (chance agreement 1) kappa is NaN if they
    agree and 0 if not.
    """
    y = np.asarray(y, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    if y.shape[-1] == 0:
        return np.full(y.shape[:-1], np.nan)
    w = np.ones(np.broadcast_shapes(y.shape, pred.shape)) if weights is None else np.asarray(weights, np.float64)
    total = w.sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        po = (w * (y == pred)).sum(axis=-1) / total
        py, pp = (w * y).sum(axis=-1) / total, (w * pred).sum(axis=-1) / total
        pe = py * pp + (1 - py) * (1 - pp)
        return np.where(pe < 1.0, (po - pe) / (1 - pe), np.where(po == 1.0, np.nan, 0.0))


def auroc_rows(y: np.ndarray, p: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Area under the ROC curve of (n,) labels and scores (ties count half); NaN with one class.

    With (R, n) ``weights`` (how often each row is drawn), one AUROC per row of weights: the
    AUROC of that resample, computed without building it.
    """
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    w = np.ones((1, len(y))) if weights is None else np.atleast_2d(np.asarray(weights, dtype=np.float64))
    order = np.argsort(p, kind="stable")
    p_sorted, y_sorted, w = p[order], y[order], w[:, order]
    pos, neg = w * y_sorted, w * (1 - y_sorted)  # (R, n)
    cum_neg = np.concatenate([np.zeros((len(w), 1)), np.cumsum(neg, axis=1)], axis=1)  # (R, n + 1)
    _, first, counts = np.unique(p_sorted, return_index=True, return_counts=True)
    group = np.repeat(np.arange(len(first)), counts)  # tie group of each sorted row
    below = cum_neg[:, first]  # negative weight strictly below each group's score
    ties = cum_neg[:, first + counts] - below
    n1, n0 = pos.sum(axis=1), neg.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = (pos * (below[:, group] + 0.5 * ties[:, group])).sum(axis=1) / (n1 * n0)
    auc = np.where((n1 > 0) & (n0 > 0), auc, np.nan)
    return auc[0] if weights is None else auc


def cluster_resamples(clusters: np.ndarray, resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap over clusters (patients): ``(counts, inverse)``, where ``counts`` (resamples, clusters) says
    how often each cluster is drawn and ``inverse`` maps each row to its cluster. A row's weight in a
    resample is ``counts[:, inverse]``: a patient drawn twice brings all their studies and images twice."""
    ids, inverse = np.unique(np.asarray(clusters, dtype=str), return_inverse=True)
    k = len(ids)
    draws = np.random.default_rng(seed).integers(0, k, (resamples, k))  # (resamples, k) cluster indices
    flat = (draws + np.arange(resamples)[:, None] * k).ravel()
    return np.bincount(flat, minlength=resamples * k).reshape(resamples, k), inverse


def study_scores(
    study_ids: np.ndarray, probs: np.ndarray, labels: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Mean probability per study, as in the MURA paper.

    Returns ``(unique_study_ids, study_probs, study_labels)``; a study's label
    is its images' label (they share it in MURA). Order follows ``np.unique``.
    """
    ids, inverse = np.unique(np.asarray(study_ids), return_inverse=True)
    counts = np.bincount(inverse, minlength=len(ids))
    study_probs = np.bincount(inverse, weights=np.asarray(probs, dtype=np.float64), minlength=len(ids)) / counts
    study_labels = None
    if labels is not None:
        study_labels = np.zeros(len(ids), dtype=np.int64)
        study_labels[inverse] = np.asarray(labels)
    return ids, study_probs, study_labels


def binary_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Kappa, F1, precision, sensitivity, specificity, accuracy and AUROC for 0/1 labels.

    Kappa and AUROC are NaN where undefined (a constant prediction, one class only).
    """
    labels = np.asarray(labels).astype(np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    pred = (probs >= threshold).astype(np.int64)
    tp = int(((pred == 1) & (labels == 1)).sum())
    fp = int(((pred == 1) & (labels == 0)).sum())
    fn = int(((pred == 0) & (labels == 1)).sum())
    tn = int(((pred == 0) & (labels == 0)).sum())
    return {
        "n": int(len(labels)),
        "kappa": float(kappa_rows(labels, pred)),
        "f1": 2 * tp / (2 * tp + fp + fn) if tp else 0.0,
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "sensitivity": tp / (tp + fn) if tp + fn else 0.0,
        "specificity": tn / (tn + fp) if tn + fp else 0.0,
        "accuracy": (tp + tn) / len(labels) if len(labels) else float("nan"),
        "auroc": float(auroc_rows(labels, probs)) if len(labels) else float("nan"),
        "threshold": float(threshold),
    }


def evaluation_metrics(
    labels: np.ndarray, probs: np.ndarray, study_ids: np.ndarray, threshold: float = 0.5
) -> dict[str, float]:
    """The per-epoch validation summary: image F1 and AUROC, study kappa and F1."""
    image = binary_metrics(labels, probs, threshold)
    _, s_probs, s_labels = study_scores(study_ids, probs, labels)
    study = binary_metrics(s_labels, s_probs, threshold)
    return {
        "f1": image["f1"],
        "auroc": image["auroc"],
        "kappa": image["kappa"],
        "study_kappa": study["kappa"],
        "study_f1": study["f1"],
        "study_auroc": study["auroc"],
        "images": image["n"],
        "studies": study["n"],
    }


def bootstrap_ci(
    labels: np.ndarray,
    probs: np.ndarray,
    threshold: float,
    *,
    clusters: np.ndarray | None = None,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, list[float]]:
    """Percentile bootstrap intervals of kappa and AUROC, all resamples at once.

    ``clusters`` (one id per row, e.g. the patient) are resampled whole, with all their rows, since
    rows of one patient are not independent; without them each row is its own cluster. Resamples where
    a metric is undefined are left out of its interval. Returns ``{"kappa_ci": [lo, hi], "auroc_ci":
    [lo, hi]}`` (NaN when undefined).
    """
    labels = np.asarray(labels).astype(np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n = len(labels)
    nan = [float("nan"), float("nan")]
    if n == 0:
        return {"kappa_ci": nan, "auroc_ci": nan}
    counts, inverse = cluster_resamples(np.arange(n) if clusters is None else clusters, resamples, seed)
    weights = counts[:, inverse]  # (resamples, n)
    alpha = (1 - level) / 2

    def interval(values: np.ndarray) -> list[float]:
        values = values[~np.isnan(values)]
        if not len(values):
            return nan
        return [float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))]

    return {
        "kappa_ci": interval(kappa_rows(labels, probs >= threshold, weights)),
        "auroc_ci": interval(auroc_rows(labels, probs, weights)),
    }


def choose_threshold(labels: np.ndarray, probs: np.ndarray, target_sensitivity: float | None = None) -> float:
    """A decision threshold on validation scores.

    Default: the threshold that maximises Cohen's kappa. With
    ``target_sensitivity``: the highest threshold whose sensitivity reaches it
    (for triage, where a missed abnormal costs more than a false alarm).
    The split is found among the observed scores; the threshold returned lies
    halfway between the lowest score called abnormal and the next lower
    score, so that rounding (float32 Parquet, another machine) cannot move a
    case across it. Ties in kappa keep the split nearest 0.5.
    """
    labels = np.asarray(labels).astype(np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    candidates = np.unique(probs)
    if len(candidates) == 0 or len(np.unique(labels)) < 2:
        return 0.5
    if target_sensitivity is not None:
        positives = probs[labels == 1]
        ok = [t for t in candidates if (positives >= t).mean() >= target_sensitivity]
        split = float(max(ok)) if ok else float(candidates.min())
    else:
        best, split = -np.inf, 0.5
        for t in candidates:
            k = float(kappa_rows(labels, probs >= t))
            if not np.isnan(k) and (k > best + 1e-12 or (abs(k - best) <= 1e-12 and abs(t - 0.5) < abs(split - 0.5))):
                best, split = k, float(t)
    below = candidates[candidates < split]
    return float((split + below.max()) / 2) if len(below) else float(split / 2)


def full_report(
    labels: np.ndarray,
    probs: np.ndarray,
    study_ids: np.ndarray,
    body_parts: np.ndarray,
    threshold: float,
    *,
    patients: np.ndarray | None = None,
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, object]:
    """``image`` and ``study`` metrics with 95% bootstrap intervals, and the same ``per_body_part``.

    The intervals resample patients (``patients``, one id per image; the study when a patient is not
    known), each with all their studies and images, at both levels.
    """
    labels = np.asarray(labels).astype(np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    study_ids = np.asarray(study_ids)
    patients = study_ids if patients is None else np.asarray(patients, dtype=object)
    patients = np.asarray([p if p is not None else s for p, s in zip(patients, study_ids)], dtype=str)
    body_parts = np.asarray([b if b is not None else "UNKNOWN" for b in body_parts])

    def level(m: np.ndarray) -> dict[str, dict[str, object]]:
        y, p, ids, who = labels[m], probs[m], study_ids[m], patients[m]
        boot = dict(resamples=resamples, seed=seed)
        image = binary_metrics(y, p, threshold) | bootstrap_ci(y, p, threshold, clusters=who, **boot)
        s_ids, s_probs, s_labels = study_scores(ids, p, y)
        patient_of = dict(zip(ids.tolist(), who.tolist()))
        s_who = np.asarray([patient_of[s] for s in s_ids.tolist()], dtype=str)
        study = binary_metrics(s_labels, s_probs, threshold) | bootstrap_ci(
            s_labels, s_probs, threshold, clusters=s_who, **boot
        )
        return {"image": image, "study": study}

    report: dict[str, object] = level(np.ones(len(labels), dtype=bool))
    report["per_body_part"] = {part: level(body_parts == part) for part in sorted(set(body_parts.tolist()))}
    report["interval_unit"] = "patient"
    return report
