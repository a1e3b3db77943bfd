"""``mura-ray evaluate``: MURA's metrics for a checkpoint on a labelled split, with intervals and plots.

Predictions come from the scoring pipeline (Ray Data decode tasks, model
actors). Image-level and study-level metrics (a study's score is the mean of
its images', as in the MURA paper) with 95% bootstrap intervals, overall and
per body part, go to ``report.json`` and ``report.md``; the predictions
themselves to ``predictions.parquet``; the study decisions in the MURA
competition's format to ``predictions.csv``, with its own kappa figures
(``mura_format``) in the report; and PNGs: the confusion
matrices, the ROC curves with the operating point, kappa per body part, and
a gallery of the most confident false positives and false negatives.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mura_ray import cluster, console
from mura_ray.archive import storage
from mura_ray.archive.catalog import build_catalog
from mura_ray.config import EvalConfig
from mura_ray.errors import UsageError
from mura_ray.model import backends
from mura_ray.model.calibration import Calibration
from mura_ray.model.checkpoint import read_checkpoint
from mura_ray.model.registry import resolve_model_dir
from mura_ray.options import placement_of
from mura_ray.progress import Progress
from mura_ray.reporting import plots
from mura_ray.reporting.calibration import calibration_line, calibration_report, calibration_table
from mura_ray.reporting.metrics import fmt, fmt_ci, full_report, study_scores
from mura_ray.reporting.mura_format import competition_report, predictions_csv
from mura_ray.review.explain import overlays_of
from mura_ray.scoring.pipeline import ScoringSettings, results_table, scored_dataset
from mura_ray.training.protocol import chose_on

log = logging.getLogger(__name__)

GALLERY_SIZE = 6
AUTO = ("auto", "auto")  # (--backend, --precision)
MURA_CSV = "predictions.csv"  # the MURA competition's submission format: study path,0|1
PLOTS = {
    "confusion": "confusion_matrix.png",
    "roc": "roc.png",
    "body_part_kappa": "body_part_kappa.png",
    "reliability": "reliability.png",
    "gallery": "errors_gallery.png",
}


def predict(
    weights: bytes,
    meta: dict[str, Any],
    data: str,
    split: str,
    batch_size: int | None,
    engine: tuple[str, str] = AUTO,
    tta: str = "none",
    *,
    placement: tuple[str, float, float],
    follow_links: str = "inside",
) -> pa.Table:
    """Labelled images of ``split``: their catalog columns, ``prob_abnormal`` (calibrated; null where
    unreadable), ``prob_uncalibrated`` and ``error``. ``placement``: ``--use-gpu``, ``--gpus-per-actor`` and
    ``--gpu-timeout``; ``follow_links``: ``--follow-links``."""
    catalog = build_catalog(data, split=split, follow_links=follow_links)
    labelled = catalog.filter(pc.is_valid(catalog["label"]))
    if labelled.num_rows == 0:
        raise UsageError(f"no labelled images in split {split!r} under {data!r}: evaluation needs labels")
    backend, precision = engine
    settings = ScoringSettings(
        data=data,
        batch_size=batch_size,
        modalities="ALL",
        backend=backend,
        precision=precision,
        tta=tta,
        use_gpu=placement[0],
        gpus_per_actor=placement[1],
        gpu_timeout=placement[2],
    )
    parts = []
    cluster.connect()
    ds = scored_dataset(labelled, weights, meta, settings)
    with Progress(f"scoring split {split}", labelled.num_rows) as bar:
        for batch in ds.iter_batches(batch_size=128, batch_format="numpy"):
            parts.append(results_table(batch))
            bar.update(parts[-1].num_rows)
    log.info("scored %d images of split %s in %.1fs (%.1f images/s)", labelled.num_rows, split, bar.seconds, bar.rate)
    results = pa.concat_tables(parts)
    columns = ["image_uri", "study_uri", "patient_id", "body_part", "label"]
    return labelled.select(columns).join(results, "image_uri", join_type="inner").sort_by("image_uri")


def run_evaluation(cfg: EvalConfig) -> dict[str, Any]:
    """Predict, compute the report, write report.json/.md, predictions.parquet and the plots under ``cfg.out``."""
    t0 = time.monotonic()
    backends.check_choice(cfg.backend, cfg.precision)
    model_dir = resolve_model_dir(cfg.model)
    weights, meta = read_checkpoint(model_dir)
    threshold = float(cfg.threshold if cfg.threshold is not None else meta.get("threshold", 0.5))
    if not storage.is_remote(cfg.out):
        console.set_ray_log(storage.join(cfg.out, "ray.log"))
    warning = protocol_warning(meta, cfg.split)
    if warning:
        log.warning("%s", warning)
    engine = (cfg.backend, cfg.precision)
    table = predict(
        weights,
        meta,
        cfg.data,
        cfg.split,
        cfg.batch_size,
        engine,
        cfg.tta,
        placement=placement_of(cfg),
        follow_links=cfg.follow_links,
    )
    fs, out = storage.filesystem(cfg.out)
    fs.makedirs(out, exist_ok=True)
    with fs.open(storage.join(out, "predictions.parquet"), "wb") as f:
        pq.write_table(table, f)
    scored = table.filter(pc.is_valid(table["prob_abnormal"]))
    labels = scored["label"].to_numpy().astype(np.int64)
    probs = scored["prob_abnormal"].to_numpy().astype(np.float64)
    studies = np.asarray(scored["study_uri"].to_pylist(), dtype=object)
    parts = np.asarray(scored["body_part"].to_pylist(), dtype=object)
    patients = np.asarray(scored["patient_id"].to_pylist(), dtype=object)
    report = full_report(
        labels, probs, studies, parts, threshold, patients=patients, resamples=cfg.resamples, seed=cfg.seed
    )
    raw = scored["prob_uncalibrated"].to_numpy().astype(np.float64)
    s_ids, s_probs, s_labels = study_scores(studies, probs, labels)
    storage.write_bytes(
        fs, storage.join(out, MURA_CSV), predictions_csv(s_ids, s_probs >= threshold, cfg.data).encode()
    )
    report.update(
        model_id=meta["model_id"],
        model=model_dir,
        data=cfg.data,
        split=cfg.split,
        threshold=threshold,
        threshold_source="--threshold" if cfg.threshold is not None else meta.get("threshold_rule", "checkpoint"),
        unreadable_images=table.num_rows - scored.num_rows,
        bootstrap_resamples=cfg.resamples,
        engines=engines_used(scored),
        tta=cfg.tta,
        protocol=protocol_summary(meta, cfg.split, warning),
        calibration=calibration_report(labels, raw, probs, studies, Calibration.of(meta)),
        mura_competition=competition_report(s_ids, s_labels, s_probs >= threshold, cfg.data),
    )
    storage.write_bytes(fs, storage.join(out, "report.json"), json.dumps(report, indent=2).encode())
    storage.write_bytes(fs, storage.join(out, "report.md"), render_markdown(report).encode())
    _plots(cfg, report, scored, weights, meta, threshold)
    report["seconds"] = time.monotonic() - t0
    report["out"] = cfg.out
    return report


def _plots(
    cfg: EvalConfig, report: dict[str, Any], scored: pa.Table, weights: bytes, meta: dict[str, Any], threshold: float
) -> None:
    labels = scored["label"].to_numpy().astype(np.int64)
    probs = scored["prob_abnormal"].to_numpy().astype(np.float64)
    _, s_probs, s_labels = study_scores(np.asarray(scored["study_uri"].to_pylist(), dtype=object), probs, labels)
    levels = {"image": (labels, probs), "study": (s_labels, s_probs)}
    path = {name: cfg.out.rstrip("/") + "/" + file for name, file in PLOTS.items()}
    plots.confusion(levels, threshold, path["confusion"])
    plots.roc(levels, threshold, path["roc"])
    plots.body_part_kappa(report, path["body_part_kappa"])
    plots.reliability(report["calibration"], path["reliability"])
    plots.gallery(*_gallery_items(scored, threshold, cfg.data, weights, meta), path["gallery"])


def protocol_warning(meta: dict[str, Any], split: str) -> str | None:
    """A warning when ``split`` helped choose the model, so that its figures are optimistic."""
    chose = chose_on(meta, split)
    if not chose:
        return None
    return f"split {split!r} helped choose this model ({', '.join(chose)}): its figures are optimistic"


def protocol_summary(meta: dict[str, Any], split: str, warning: str | None) -> dict[str, Any]:
    p = meta.get("protocol") or {"chosen_on": {"epoch": "valid", "threshold": "valid"}, "tune_fraction": 0}
    return {
        "chosen_on": p["chosen_on"],
        "tune_fraction": p.get("tune_fraction", 0),
        "tune_patients": p.get("tune_patients", 0),
        "reported_split": split,
        "reported_split_chose": chose_on(meta, split),
        "warning": warning,
    }


def engines_used(rows: pa.Table) -> dict[str, int]:
    """Images scored per engine, e.g. ``{"openvino bf16": 2000}``."""
    names = pc.binary_join_element_wise(rows["backend"], rows["precision"], " ")
    counts = pc.value_counts(names.filter(pc.is_valid(names)))
    return {c["values"].as_py(): c["counts"].as_py() for c in counts}


def _gallery_items(
    scored: pa.Table, threshold: float, data: str, weights: bytes, meta: dict[str, Any]
) -> tuple[list[tuple[str, np.ndarray, float, str]], list[str]]:
    """The most confident false positives (highest scores) and false negatives (lowest), as Grad-CAM overlays."""
    rows = scored.to_pylist()
    fp = sorted(
        (r for r in rows if r["label"] == 0 and r["prob_abnormal"] >= threshold), key=lambda r: -r["prob_abnormal"]
    )
    fn = sorted(
        (r for r in rows if r["label"] == 1 and r["prob_abnormal"] < threshold), key=lambda r: r["prob_abnormal"]
    )
    titles = ["false positives", "false negatives"]
    chosen = [(t, r) for t, group in zip(titles, (fp[:GALLERY_SIZE], fn[:GALLERY_SIZE])) for r in group]
    uris, probs = [r["image_uri"] for _, r in chosen], [r["prob_abnormal"] for _, r in chosen]
    pictures = overlays_of(uris, data, weights, meta, display=160, probs=probs)
    items = []
    for (title, r), picture in zip(chosen, pictures):
        if picture is None:
            continue
        caption = r["body_part"] or ""  # never a path: file names in PACS exports hold patient ids and UIDs
        items.append((title, picture, r["prob_abnormal"], caption))
    return items, [f"{t} (none)" if not any(i[0] == t for i in items) else t for t in titles]


def _protocol_lines(p: dict[str, Any]) -> list[str]:
    chosen = ", ".join(f"{choice} on `{split}`" for choice, split in p["chosen_on"].items())
    lines = [f"Which split chose what: {chosen}; this report is on `{p['reported_split']}`."]
    if p["warning"]:
        lines.append(f"**Warning: {p['warning']}.**")
    else:
        lines.append(f"Split `{p['reported_split']}` chose nothing about this model: its figures are an estimate.")
    return lines


def _competition_lines(figures: dict[str, Any]) -> list[str]:
    """The study kappa as the MURA competition's evaluation script computes it, overall and per body part."""
    if not figures:
        return []
    lines = [
        "",
        "## As MURA's evaluation computes it",
        "",
        f"`{MURA_CSV}` is the competition's submission (study path, 0|1). Its script's interval is kappa "
        "+/- 1.96 x pr_a(1 - pr_a) / (n (1 - pr_e)^2), the variance of kappa where a standard error belongs, "
        "so it is much narrower than the 95% bootstrap intervals over patients above; the kappas are the same.",
        "",
        "| body part | studies | kappa | competition's lower-upper |",
        "|---|---|---|---|",
    ]
    for name, f in figures.items():
        lines.append(f"| {name} | {f['studies']} | {fmt(f['kappa'])} | {fmt(f['lower'])}-{fmt(f['upper'])} |")
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    """The report as a readable page."""
    lines = [
        f"# Evaluation of model {report['model_id'][:12]}",
        "",
        f"Data: `{report['data']}`, split `{report['split']}`. Threshold {report['threshold']:.3f} "
        f"({report['threshold_source']}). Intervals: 95% percentile bootstrap over patients (each drawn "
        f"patient brings all their studies and images), {report['bootstrap_resamples']} resamples. "
        f"Test-time augmentation: {report.get('tta', 'none')}. Scored by: "
        + (", ".join(f"{k} ({n} images)" for k, n in report.get("engines", {}).items()) or "-")
        + ".",
        "",
        *_protocol_lines(report["protocol"]),
        "",
        "| level | n | kappa (95% CI) | AUROC (95% CI) | F1 | precision | sensitivity | specificity | accuracy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for level in ("image", "study"):
        m = report[level]
        lines.append(
            f"| {level} | {m['n']} | {fmt(m['kappa'])} {fmt_ci(m['kappa_ci'])} | "
            f"{fmt(m['auroc'])} {fmt_ci(m['auroc_ci'])} | {fmt(m['f1'])} | {fmt(m['precision'])} | "
            f"{fmt(m['sensitivity'])} | {fmt(m['specificity'])} | {fmt(m['accuracy'])} |"
        )
    lines += [
        "",
        "## Per body part (study level)",
        "",
        "| body part | studies | kappa (95% CI) | AUROC (95% CI) | sensitivity | specificity |",
        "|---|---|---|---|---|---|",
    ]
    for part, levels in report["per_body_part"].items():
        m = levels["study"]
        lines.append(
            f"| {part} | {m['n']} | {fmt(m['kappa'])} {fmt_ci(m['kappa_ci'])} | "
            f"{fmt(m['auroc'])} {fmt_ci(m['auroc_ci'])} | "
            f"{fmt(m['sensitivity'])} | {fmt(m['specificity'])} |"
        )
    c = report["calibration"]
    lines += [
        "",
        f"## Calibration ({Calibration.of(c).describe()}, from the checkpoint)",
        "",
        f"ECE over {c['bins']} equal-width bins and Brier score, before and after calibration. Study level: "
        f"{calibration_line(c)}.",
        "",
        *calibration_table(c),
    ]
    lines += _competition_lines(report.get("mura_competition") or {})
    if report.get("unreadable_images"):
        lines += ["", f"{report['unreadable_images']} unreadable images were left out."]
    lines += ["", "## Plots", ""] + [f"![{name}]({file})" for name, file in PLOTS.items()]
    return "\n".join(lines) + "\n"
