"""The whole path on one machine: sample -> train -> score, with a summary."""

from __future__ import annotations

import logging
import time
from typing import Any

import pyarrow.dataset as pads

from mura_ray import storage
from mura_ray.config import ScoreConfig, TrainConfig
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

    log.info("[1/3] writing a synthetic archive of %d studies to %s", studies, archive)
    write_sample(archive, studies=studies, seed=0)
    t_sample = time.monotonic() - t0

    log.info("[2/3] training ResNet18 with %d DDP workers", workers)
    trained = run_training(
        TrainConfig(
            data=archive, out=run_dir, workers=workers, epochs=epochs, image_size=image_size,
            batch_size=16, lr=1e-3, weights="none", patience=4,
        )
    )

    log.info("[3/3] scoring the validation split")
    scored = run_scoring(ScoreConfig(model=trained["model_dir"], input=archive, output=scores, split="valid"))

    # Read the committed Parquet back and measure it, as a user of the output would.
    studies_tbl = pads.dataset(storage.join(scores, "studies"), format="parquet", partitioning="hive").to_table()
    study = binary_metrics(studies_tbl["label"].to_numpy(), studies_tbl["prob_abnormal"].to_numpy(), scored.get("threshold", 0.5))
    return {
        "validation_study_metrics_from_parquet": {k: round(v, 4) for k, v in study.items()},
        "best_epoch": trained["metrics"],
        "images_scored": scored["images"],
        "scoring_errors": scored["errors"],
        "wall_seconds": {
            "total": round(time.monotonic() - t0, 1),
            "sample": round(t_sample, 1),
            "train": round(trained["wall_seconds"], 1),
            "score": round(scored["seconds"], 1),
        },
        "outputs": {"archive": archive, "model": trained["model_dir"], "metrics": storage.join(run_dir, "metrics.csv"), "scores": scores},
    }
