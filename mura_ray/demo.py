"""The whole path on one machine: sample -> train -> evaluate -> score, with a summary."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import pyarrow.dataset as pads

from mura_ray import console
from mura_ray.archive import storage
from mura_ray.archive.sample import write_sample
from mura_ray.config import DemoConfig, EvalConfig, ScoreConfig, TrainConfig
from mura_ray.model.calibration import Calibration
from mura_ray.reporting.metrics import binary_metrics, fmt_ci
from mura_ray.review.evaluate import run_evaluation
from mura_ray.scoring.run import run_scoring
from mura_ray.training.driver import run_training

log = logging.getLogger(__name__)

SUMMARY = "summary.json"


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run the demo under ``cfg.out``; returns the figures it prints (also written to ``summary.json``)."""
    t0 = time.monotonic()
    out = cfg.out
    archive, run_dir = storage.join(out, "archive"), storage.join(out, "run")
    scores, report_dir = storage.join(out, "scores"), storage.join(out, "evaluation")
    fs, _ = storage.filesystem(out)
    for path in (archive, run_dir, scores, report_dir, storage.join(out, "ray.log")):  # a rerun starts over
        if storage.exists(path):
            fs.rm(storage.filesystem(path)[1], recursive=True)
    if not storage.is_remote(out):
        console.set_ray_log(storage.join(out, "ray.log"))

    log.info("[1/4] writing a synthetic archive of %d studies to %s", cfg.studies, archive)
    plan = write_sample(archive, studies=cfg.studies, seed=0)
    t_sample = time.monotonic() - t0
    log.info("wrote %d images in %.1fs", len(plan), t_sample)

    log.info("[2/4] training ResNet18 with %d DDP workers", cfg.workers)
    trained = run_training(demo_train_config(cfg, archive, run_dir))

    log.info("[3/4] evaluating on the validation split")
    report = run_evaluation(EvalConfig(model=trained["model_dir"], data=archive, out=report_dir, split="valid"))

    log.info("[4/4] scoring the validation split")
    scored = run_scoring(
        ScoreConfig(model=trained["model_dir"], data=archive, out=scores, split="valid", heatmaps="flagged")
    )

    paths = {"archive": archive, "run": run_dir, "report": report_dir, "scores": scores, "out": out}
    summary = _summary(paths, trained, report, scored, t_sample, time.monotonic() - t0)
    storage.write_text(storage.join(out, SUMMARY), json.dumps(summary, indent=2))
    return summary


def demo_train_config(cfg: DemoConfig, archive: str, run_dir: str) -> TrainConfig:
    """The demo's training: from scratch, small images, a few epochs; sized for a laptop CPU."""
    return TrainConfig(
        data=archive,
        out=run_dir,
        workers=cfg.workers,
        epochs=cfg.epochs,
        image_size=cfg.image_size,
        fit="crop",  # the demo's figures (README) and its heatmap and leakage tests are measured with it
        batch_size=16,
        lr=1e-3,
        weights="none",
        patience=4,
    )


def _summary(
    paths: dict[str, str],
    trained: dict[str, Any],
    report: dict[str, Any],
    scored: dict[str, Any],
    t_sample: float,
    total: float,
) -> dict[str, Any]:
    """The demo's figures: the evaluation, the study metrics read back from the scores table, times, outputs."""
    # Read the committed study rows back and measure them, as a user of the output would (README).
    from deltalake import DeltaTable

    scores = DeltaTable(storage.join(paths["scores"], "scores")).to_pyarrow_dataset()
    studies_tbl = scores.to_table(filter=pads.field("kind") == "study")
    study = binary_metrics(
        studies_tbl["label"].to_numpy(), studies_tbl["prob_abnormal"].to_numpy(), scored.get("threshold", 0.5)
    )
    summary = {
        "validation_study_metrics_from_parquet": {k: round(v, 4) for k, v in study.items()},
        "evaluation": {
            level: {
                k: report[level][k]
                for k in ("n", "kappa", "kappa_ci", "auroc", "auroc_ci", "f1", "sensitivity", "specificity")
            }
            for level in ("image", "study")
        },
        "threshold": trained["threshold"],
        "protocol": report["protocol"],
        "calibration": {
            level: {
                when: {k: report["calibration"][level][when][k] for k in ("ece", "brier")}
                for when in ("before", "after")
            }
            for level in ("image", "study")
        },
        "calibrated_by": Calibration.of(report["calibration"]).describe(),
        "heatmaps": scored["heatmaps"],
        "best_epoch": trained["metrics"],
        "images_scored": scored["images"],
        "scoring_errors": scored["errors"],
        "scored_by": scored["engines"],
        "wall_seconds": {
            "total": round(total, 1),
            "sample": round(t_sample, 1),
            "train": round(trained["wall_seconds"], 1),
            "evaluate": round(report["seconds"], 1),
            "score": round(scored["seconds"], 1),
        },
        "outputs": {
            "archive": paths["archive"],
            "model": trained["model_dir"],
            "model_card": storage.join(trained["model_dir"], "model_card.md"),
            "curves": storage.join(paths["run"], "training_curves.png"),
            "report": storage.join(paths["report"], "report.md"),
            "scores": paths["scores"],
            "summary": storage.join(paths["out"], SUMMARY),
        },
    }
    return summary


def render_summary(s: dict[str, Any]) -> str:
    """The demo's result as a short table a person reads."""
    ev, w, o = s["evaluation"], s["wall_seconds"], s["outputs"]
    p = s["protocol"]
    chooser = "tuning split" if p["chosen_on"]["threshold"] == "tune" else "validation split"
    lines = [
        "",
        f"validation split (chose nothing; 95% CIs over patients); epoch {s['best_epoch']['epoch']}, calibration "
        f"{s['calibrated_by']} and threshold {s['threshold']:.3f} chosen on the {chooser} "
        f"({p['tune_patients']} training patients)",
        f"  {'level':<6} {'n':>5}  {'kappa (95% CI)':<22} {'AUROC (95% CI)':<22} {'sens.':>6} {'spec.':>6}",
    ]
    for level in ("study", "image"):
        m = ev[level]
        lines.append(
            f"  {level:<6} {m['n']:>5}  {m['kappa']:.3f} {fmt_ci(m['kappa_ci']):<16} "
            f"{m['auroc']:.3f} {fmt_ci(m['auroc_ci']):<16} "
            f"{m['sensitivity']:>6.3f} {m['specificity']:>6.3f}"
        )
    if p["warning"]:
        lines.append(f"  warning: {p['warning']}")
    for level in ("study", "image"):
        b, a = s["calibration"][level]["before"], s["calibration"][level]["after"]
        lines.append(
            f"  {level} calibration: ECE {b['ece']:.3f} -> {a['ece']:.3f}, Brier {b['brier']:.3f} -> {a['brier']:.3f}"
        )
    p = s["validation_study_metrics_from_parquet"]
    lines += [
        f"  study kappa read back from the scores table: {p['kappa']:.3f} ({s['images_scored']} images, "
        f"{s['scoring_errors']} errors; scored by "
        + ", ".join(f"{k} ({n})" for k, n in s.get("scored_by", {}).items())
        + ")",
        "",
        f"wall time: sample {w['sample']:.0f}s, train {w['train']:.0f}s, evaluate {w['evaluate']:.0f}s, "
        f"score {w['score']:.0f}s; total {w['total']:.0f}s",
        "",
        "outputs:",
        f"  model        {o['model']}/  (model.safetensors, metadata.json)",
        f"  model card   {o['model_card']}",
        f"  curves       {o['curves']}",
        f"  evaluation   {o['report']}  (and its PNGs: reliability, errors with heatmaps, ...)",
        f"  scores       {o['scores']}/scores  (a Delta table: image, study and heatmap rows, by kind)",
        f"  heatmaps     {o['scores']}/heatmaps  ({s['heatmaps']} overlays of the studies flagged abnormal;"
        " their rows: kind = 'heatmap')",
        f"  all figures  {o['summary']}",
    ]
    return "\n".join(lines)
