"""The whole path on one machine: sample -> train -> evaluate -> score, with a summary."""

from __future__ import annotations

import logging
import time
from typing import Any

import pyarrow.dataset as pads

from mura_ray import storage
from mura_ray.config import ScoreConfig, TrainConfig
from mura_ray.evaluate import EvalConfig, run_evaluation
from mura_ray.metrics import binary_metrics
from mura_ray.sample import write_sample
from mura_ray.score import run_scoring
from mura_ray.train import run_training

log = logging.getLogger(__name__)


def run_demo(out: str, *, studies: int = 400, epochs: int = 10, image_size: int = 64, workers: int = 2) -> dict[str, Any]:
    """Run the demo under ``out``; returns the figures it prints."""
    t0 = time.monotonic()
    archive = storage.join(out, "archive")
    run_dir = storage.join(out, "run")
    scores = storage.join(out, "scores")
    report_dir = storage.join(out, "evaluation")
    fs, _ = storage.filesystem(out)
    for path in (archive, run_dir, scores, report_dir):  # a rerun starts over, not resumes
        if storage.exists(path):
            fs.rm(storage.filesystem(path)[1], recursive=True)

    log.info("[1/4] writing a synthetic archive of %d studies to %s", studies, archive)
    write_sample(archive, studies=studies, seed=0)
    t_sample = time.monotonic() - t0

    log.info("[2/4] training ResNet18 with %d DDP workers", workers)
    trained = run_training(
        TrainConfig(
            data=archive, out=run_dir, workers=workers, epochs=epochs, image_size=image_size,
            batch_size=16, lr=1e-3, weights="none", patience=4,
        )
    )

    log.info("[3/4] evaluating on the validation split")
    report = run_evaluation(EvalConfig(model=trained["model_dir"], data=archive, out=report_dir, split="valid"))

    log.info("[4/4] scoring the validation split")
    scored = run_scoring(ScoreConfig(model=trained["model_dir"], input=archive, output=scores, split="valid"))

    # Read the committed Parquet back and measure it, as a user of the output would.
    studies_tbl = pads.dataset(storage.join(scores, "studies"), format="parquet", partitioning="hive").to_table()
    study = binary_metrics(studies_tbl["label"].to_numpy(), studies_tbl["prob_abnormal"].to_numpy(), scored.get("threshold", 0.5))
    return {
        "validation_study_metrics_from_parquet": {k: round(v, 4) for k, v in study.items()},
        "evaluation": {
            level: {k: report[level][k] for k in ("n", "kappa", "kappa_ci", "auroc", "auroc_ci", "f1", "sensitivity", "specificity")}
            for level in ("image", "study")
        },
        "threshold": trained["threshold"],
        "best_epoch": trained["metrics"],
        "images_scored": scored["images"],
        "scoring_errors": scored["errors"],
        "wall_seconds": {
            "total": round(time.monotonic() - t0, 1),
            "sample": round(t_sample, 1),
            "train": round(trained["wall_seconds"], 1),
            "evaluate": round(report["seconds"], 1),
            "score": round(scored["seconds"], 1),
        },
        "outputs": {"archive": archive, "model": trained["model_dir"], "metrics": storage.join(run_dir, "metrics.csv"),
                    "curves": storage.join(run_dir, "training_curves.png"), "model_card": storage.join(trained["model_dir"], "model_card.md"),
                    "report": storage.join(report_dir, "report.md"), "scores": scores},
    }
