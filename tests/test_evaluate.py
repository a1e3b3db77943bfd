"""`mura-ray evaluate` on a real local Ray cluster: every figure equals scikit-learn's on the same predictions."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import (
    accuracy_score,
    brier_score_loss,
    cohen_kappa_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from mura_ray import cli
from mura_ray.model.calibration import Calibration
from mura_ray.reporting.metrics import study_scores

PNG = b"\x89PNG\r\n\x1a\n"


def _sklearn(labels, probs, threshold):
    pred = (probs >= threshold).astype(int)
    return {
        "n": len(labels),
        "kappa": cohen_kappa_score(labels, pred),
        "f1": f1_score(labels, pred, zero_division=0),
        "precision": precision_score(labels, pred, zero_division=0),
        "sensitivity": recall_score(labels, pred, zero_division=0),
        "specificity": recall_score(labels, pred, pos_label=0, zero_division=0),
        "accuracy": accuracy_score(labels, pred),
        "auroc": roc_auc_score(labels, probs) if len(set(labels)) == 2 else float("nan"),
    }


def _ece(labels, probs, bins=10):
    """ECE written out plainly: per equal-width bin, |mean prediction - share positive| weighted by its cases."""
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        m = (probs >= lo) & ((probs < hi) if b < bins - 1 else (probs <= hi))
        if m.any():
            total += m.sum() * abs(probs[m].mean() - labels[m].mean())
    return total / len(labels)


def _check(report_level, expected):
    for key, value in expected.items():
        if isinstance(value, float) and np.isnan(value):
            assert np.isnan(report_level[key]), key
        else:
            assert report_level[key] == pytest.approx(value, abs=1e-9), key


@pytest.mark.timeout(600)
def test_report_matches_sklearn_overall_and_per_body_part(trained_run, learn_archive, tmp_path, capsys):
    _, trained = trained_run
    root, plan = learn_archive
    out = tmp_path / "eval"
    rc = cli.main(
        ["-q", "evaluate", "--model", trained["model_dir"], "--data", root, "--out", str(out), "--resamples", "200"]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    report = json.load(open(out / "report.json"))
    meta = json.load(open(os.path.join(trained["model_dir"], "metadata.json")))
    assert report["threshold"] == pytest.approx(meta["threshold"])
    assert f"threshold {meta['threshold']:.3f}" in printed

    preds = pq.read_table(out / "predictions.parquet")
    assert preds.num_rows == sum(i.split == "valid" for i in plan)
    labels = preds["label"].to_numpy().astype(int)
    probs = preds["prob_abnormal"].to_numpy().astype(float)
    studies = np.asarray(preds["study_uri"].to_pylist(), dtype=object)
    parts = np.asarray(preds["body_part"].to_pylist(), dtype=object)
    t = report["threshold"]

    _check(report["image"], _sklearn(labels, probs, t))
    _, s_probs, s_labels = study_scores(studies, probs, labels)
    _check(report["study"], _sklearn(s_labels, s_probs, t))
    assert report["study"]["n"] == len({i.study_rel for i in plan if i.split == "valid"})
    assert sorted(report["per_body_part"]) == sorted(set(parts))
    for part, levels in report["per_body_part"].items():
        m = parts == part
        _check(levels["image"], _sklearn(labels[m], probs[m], t))
        _, sp, sl = study_scores(studies[m], probs[m], labels[m])
        _check(levels["study"], _sklearn(sl, sp, t))
    for level in ("image", "study"):
        for ci in ("kappa_ci", "auroc_ci"):
            lo, hi = report[level][ci]
            assert lo <= hi
        assert report[level]["kappa_ci"][0] <= report[level]["kappa"] + 0.05  # the point sits near its interval

    # Calibration: the scores are the model's own, tempered; ECE and Brier before and after, as computed here.
    raw = preds["prob_uncalibrated"].to_numpy().astype(float)
    assert np.allclose(probs, Calibration.of(meta).apply(raw), atol=1e-6)
    c = report["calibration"]
    assert c["temperature"] == meta["temperature"]
    assert c["image"]["before"]["ece"] == pytest.approx(_ece(labels, raw))
    assert c["image"]["after"]["ece"] == pytest.approx(_ece(labels, probs))
    assert c["image"]["after"]["brier"] == pytest.approx(brier_score_loss(labels, probs))
    # The validation split chose nothing; the intervals are over patients.
    assert report["protocol"]["warning"] is None and report["protocol"]["chosen_on"]["threshold"] == "tune"
    assert report["interval_unit"] == "patient"

    # MURA's own format: one row per study, its path from MURA-v1.1/ on, the decision at the threshold.
    rows = dict(line.rsplit(",", 1) for line in open(out / "predictions.csv").read().splitlines())
    s_ids, _, _ = study_scores(studies, probs, labels)
    assert len(rows) == len(s_ids) and all(p.startswith("MURA-v1.1/valid/XR_") and p.endswith("/") for p in rows)
    decided = {s.split("MURA-v1.1/", 1)[1].rstrip("/") + "/": int(p >= t) for s, p in zip(s_ids, s_probs)}
    assert {k.split("MURA-v1.1/", 1)[1]: int(v) for k, v in rows.items()} == decided
    competition = report["mura_competition"]
    assert competition["Overall"]["kappa"] == pytest.approx(report["study"]["kappa"])
    assert competition["Overall"]["studies"] == report["study"]["n"]

    md = open(out / "report.md").read()
    assert "| study |" in md and "Per body part" in md and "chose nothing" in md and "ECE before" in md
    assert "As MURA's evaluation computes it" in md
    for name in ("confusion_matrix.png", "roc.png", "body_part_kappa.png", "reliability.png", "errors_gallery.png"):
        with open(out / name, "rb") as f:
            assert f.read(8) == PNG, name

    # An explicit threshold overrides the checkpoint's.
    rc = cli.main(
        [
            "-q",
            "evaluate",
            "--model",
            trained["model_dir"],
            "--data",
            root,
            "--out",
            str(tmp_path / "e2"),
            "--threshold",
            "0.9",
            "--resamples",
            "50",
        ]
    )
    assert rc == 0
    again = json.load(open(tmp_path / "e2" / "report.json"))
    _check(again["image"], _sklearn(labels, probs, 0.9))
