"""Image- and study-level metrics (scikit-learn underneath). No Ray, no torch."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import cohen_kappa_score, confusion_matrix, f1_score, roc_auc_score


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

    AUROC is NaN when only one class is present.
    """
    labels = np.asarray(labels).astype(np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    pred = (probs >= threshold).astype(np.int64)
    tn, fp, fn, tp = confusion_matrix(labels, pred, labels=[0, 1]).ravel()
    both = len(np.unique(labels)) == 2
    return {
        "n": int(len(labels)),
        "kappa": float(cohen_kappa_score(labels, pred)) if len(labels) else float("nan"),
        "f1": float(f1_score(labels, pred, zero_division=0)),
        "precision": float(tp / (tp + fp)) if tp + fp else 0.0,
        "sensitivity": float(tp / (tp + fn)) if tp + fn else 0.0,
        "specificity": float(tn / (tn + fp)) if tn + fp else 0.0,
        "accuracy": float((tp + tn) / len(labels)) if len(labels) else float("nan"),
        "auroc": float(roc_auc_score(labels, probs)) if both else float("nan"),
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
