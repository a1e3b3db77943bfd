"""After training: what the tuning split chooses, and what the validation split then reports.

``choose_and_report`` fits the calibration on the kept epoch's tuning
predictions, chooses the decision threshold on them after calibration
(study level), and reports on the validation split, which chose nothing:
metrics with patient-level intervals, and calibration before and after.
``validation_predictions`` scores the validation split with the kept weights
(torch fp32, the reference every engine is checked against).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch
from safetensors.torch import load as st_load

from mura_ray.model.calibration import Calibration, fit
from mura_ray.model.resnet import build_model
from mura_ray.model.steps import evaluate
from mura_ray.reporting.calibration import calibration_report
from mura_ray.reporting.metrics import choose_threshold, full_report, study_scores

JOIN_COLUMNS = ["image_uri", "study_uri", "body_part", "patient_id"]


def validation_predictions(weights: bytes, dataset: Any, catalog: pa.Table) -> pa.Table:
    """``image_uri``, ``label``, ``prob_abnormal`` (uncalibrated) and the catalog's study, body part and
    patient of every image of ``dataset`` (eval-cropped squares with ``image_uri`` and ``label``)."""
    model = build_model()
    model.load_state_dict(st_load(weights))
    out = evaluate(
        model,
        dataset.iter_batches(batch_size=128, batch_format="numpy"),
        torch.device("cpu"),
        keep=("image_uri",),
        precision="fp32",
    )
    table = pa.table(
        {
            "image_uri": pa.array(out["image_uri"].astype(str), pa.string()),
            "label": pa.array(out["label"].astype(np.int8)),
            "prob_abnormal": pa.array(out["prob"].astype(np.float32)),
        }
    )
    return table.join(catalog.select(JOIN_COLUMNS), "image_uri", join_type="left outer").sort_by("image_uri")


def _columns(predictions: pa.Table) -> tuple[np.ndarray, ...]:
    labels = predictions["label"].to_numpy().astype(np.int64)
    probs = predictions["prob_abnormal"].to_numpy().astype(np.float64)
    studies = np.asarray(predictions["study"].to_pylist(), dtype=object)
    return labels, probs, studies


def choose_and_report(
    tune: pa.Table,
    valid: pa.Table,
    *,
    target_sensitivity: float | None,
    seed: int,
    chooser: str,
    method: str = "platt",
) -> dict[str, Any]:
    """Calibration (``method``) and threshold from ``tune`` (the kept epoch's predictions on the split that
    chooses), the report from ``valid``; both keyed (``predictions.keyed``: ``study`` and ``patient`` keys).
    Returns the metadata fields: the calibration's (``temperature``, ``logit_offset``,
    ``calibration_method``), ``threshold``, ``threshold_rule``, ``validation``, ``calibration`` (validation
    split) and ``tuning_calibration``."""
    t_labels, t_probs, t_studies = _columns(tune)
    calibration = fit(t_labels, t_probs, method)
    t_calibrated = calibration.apply(t_probs).astype(np.float64)
    _, s_probs, s_labels = study_scores(t_studies, t_calibrated, t_labels)
    threshold = choose_threshold(s_labels, s_probs, target_sensitivity)
    where = "the tuning split" if chooser == "tune" else "the validation split"
    rule = (
        f"highest threshold with study-level sensitivity >= {target_sensitivity} on {where}, after calibration"
        if target_sensitivity is not None
        else f"maximises study-level Cohen's kappa on {where}, after calibration"
    )
    v_labels, v_probs, v_studies = _columns(valid)
    v_calibrated = calibration.apply(v_probs).astype(np.float64)
    parts = np.asarray(valid["body_part"].to_pylist(), dtype=object)
    patients = np.asarray(valid["patient"].to_pylist(), dtype=object)
    return {
        **calibration.record(),
        "threshold": threshold,
        "threshold_rule": rule,
        "validation": full_report(v_labels, v_calibrated, v_studies, parts, threshold, patients=patients, seed=seed),
        "calibration": calibration_report(v_labels, v_probs, v_calibrated, v_studies, calibration),
        "tuning_calibration": calibration_report(t_labels, t_probs, t_calibrated, t_studies, calibration),
    }


def with_calibrated(predictions: pa.Table, calibration: Calibration) -> pa.Table:
    """The predictions with ``prob_abnormal`` calibrated and the model's own output kept as ``prob_uncalibrated``."""
    raw = predictions["prob_abnormal"].to_numpy()
    i = predictions.schema.get_field_index("prob_abnormal")
    table = predictions.set_column(i, "prob_abnormal", pa.array(calibration.apply(raw)))
    return table.append_column("prob_uncalibrated", pa.array(raw.astype(np.float32)))
