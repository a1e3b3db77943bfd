"""``mura-ray monitor``: the nightly scoring runs of an output, side by side, and an alert on drift.

Each finished scoring run's row in the scores table (``kind = 'run'``, its ``totals``) holds its totals and the
distribution of its scores (``scoring.distribution``). The monitor reads
them, one row per run that scored images (a "night"): images, error rate,
images/s, the share predicted abnormal overall and per body part, and the
population stability index (PSI) of the night's scores against a reference:
the model's validation predictions (``--model``), else the first night.
PSI = sum over bins of (p - q) ln(p / q), over the reference's deciles; by
a common rule of thumb under 0.1 is stable, over 0.2 a shift worth a look.

A small night drifts by chance: for n images drawn from the reference's own
population, against N reference images, PSI over k groups is about
(1/n + 1/N) times a chi-square with k - 1 degrees of freedom (its mean is
(k - 1)(1/n + 1/N): 0.1 for 140 images against 265). ``psi_noise`` is that
chi-square's ``NOISE_QUANTILE`` quantile, and a night is flagged only when
its PSI is over both ``--psi-alert`` and its ``psi_noise``. Images of one
study are alike, so the effective n is smaller and the bound is a floor.
``alerts`` name what the latest night crossed; the CLI exits 4 on any.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from scipy.stats import chi2

from mura_ray.archive import storage
from mura_ray.config import MonitorConfig
from mura_ray.errors import UsageError
from mura_ray.model.checkpoint import read_checkpoint
from mura_ray.model.registry import resolve_model_dir
from mura_ray.reporting import plots
from mura_ray.scoring.delta import ScoreStore
from mura_ray.scoring.distribution import BINS, histogram

GROUPS = 10
EPS = 1e-4  # share given to an empty bin, so that ln(p / q) stays finite
NOISE_QUANTILE = 0.999  # an unchanged population crosses psi_noise once in 1000 nights


def decile_groups(reference: np.ndarray, groups: int = GROUPS) -> list[tuple[int, int]]:
    """Runs of fine bins [start, end) that each hold about 1/groups of the reference's mass."""
    cum = np.cumsum(reference) / max(reference.sum(), 1)
    edges, start = [], 0
    for k in range(1, groups):
        end = int(np.searchsorted(cum, k / groups, side="left")) + 1
        if end > start and end < len(reference):
            edges.append((start, end))
            start = end
    edges.append((start, len(reference)))
    return edges


def psi(reference: np.ndarray, counts: np.ndarray, groups: list[tuple[int, int]]) -> float:
    """Population stability index of ``counts`` against ``reference`` (both fine-bin histograms)."""
    ref = np.array([reference[a:b].sum() for a, b in groups], dtype=np.float64)
    new = np.array([counts[a:b].sum() for a, b in groups], dtype=np.float64)
    p = np.maximum(new / max(new.sum(), 1), EPS)
    q = np.maximum(ref / max(ref.sum(), 1), EPS)
    return float(np.sum((p - q) * np.log(p / q)))


def psi_noise(reference_images: int, night_images: int, groups: int, quantile: float = NOISE_QUANTILE) -> float:
    """The PSI that ``night_images`` drawn from the reference's population exceed with probability 1 - quantile."""
    if reference_images < 1 or night_images < 1:
        return float("inf")
    return float(chi2.ppf(quantile, max(groups - 1, 1)) * (1 / night_images + 1 / reference_images))


def nights(scores: str, model_id: str | None) -> list[dict[str, Any]]:
    """The committed runs of ``scores`` (of ``model_id`` when given, else of the latest run's model) that
    scored images and recorded their distribution, oldest first."""
    finals = [r["totals"] for r in ScoreStore(scores).runs() if r["final"] and "run" in r["totals"]]
    if not finals:
        raise UsageError(f"no committed scoring runs under {scores!r}")
    model_id = model_id or finals[-1]["model_id"]
    return [m for m in finals if m["model_id"] == model_id and m["run"].get("images") and "distribution" in m["run"]]


def night_row(m: dict[str, Any], reference: np.ndarray, groups: list[tuple[int, int]]) -> dict[str, Any]:
    run, d = m["run"], m["run"]["distribution"]
    parts = d["body_parts"]
    scored = run["images"] - run["errors"]
    counts = np.asarray(d["histogram"])
    return {
        "run_id": m["run_id"],
        "run_date": m["run_date"],
        "started_at": m.get("started_at"),
        "images": run["images"],
        "errors": run["errors"],
        "error_rate": run["errors"] / run["images"],
        "images_per_second": run.get("images_per_second"),
        "flagged_share": sum(p["flagged"] for p in parts.values()) / max(scored, 1),
        "flagged_share_by_body_part": {
            k: p["flagged"] / max(p["images"] - p["errors"], 1) for k, p in parts.items() if p["images"] > p["errors"]
        },
        "psi": psi(reference, counts, groups),
        "psi_noise": psi_noise(int(reference.sum()), int(counts.sum()), len(groups)),
        "histogram": d["histogram"],
    }


def run_monitor(cfg: MonitorConfig) -> dict[str, Any]:
    """Write monitor.json, monitor.md and monitor.png under ``cfg.out``; returns the report (``alerts`` set)."""
    model_id, reference, reference_name = None, None, "the first night"
    if cfg.model:
        model_dir = resolve_model_dir(cfg.model)
        _, meta = read_checkpoint(model_dir)
        model_id = meta["model_id"]
        preds = pq.read_table(
            storage.filesystem(model_dir)[0].open(storage.join(model_dir, "valid_predictions.parquet"))
        )
        reference = histogram(preds["prob_abnormal"].drop_null().to_numpy())
        reference_name = f"the model's validation predictions ({int(reference.sum())} images)"
    runs = nights(cfg.scores, model_id)
    if not runs:
        raise UsageError(f"no committed run under {cfg.scores!r} scored images with this model and recorded scores")
    if reference is None:
        reference = np.asarray(runs[0]["run"]["distribution"]["histogram"])
    groups = decile_groups(reference)
    rows = [night_row(m, reference, groups) for m in runs]
    latest = rows[-1]
    alerts = []
    if latest["psi"] > max(cfg.psi_alert, latest["psi_noise"]):
        alerts.append(
            f"PSI {latest['psi']:.3f} of run {latest['run_id']} is over --psi-alert {cfg.psi_alert} and over "
            f"{latest['psi_noise']:.3f}, what chance reaches once in {1 / (1 - NOISE_QUANTILE):.0f} nights of "
            f"{int(np.sum(latest['histogram']))} images"
        )
    if latest["error_rate"] > cfg.max_error_rate:
        alerts.append(
            f"error rate {latest['error_rate']:.1%} of run {latest['run_id']} is over --max-error-rate "
            f"{cfg.max_error_rate:.1%}"
        )
    report = {
        "scores": cfg.scores,
        "model_id": runs[-1]["model_id"],
        "reference": reference_name,
        "reference_histogram": reference.tolist(),
        "bins": BINS,
        "psi_alert": cfg.psi_alert,
        "noise_quantile": NOISE_QUANTILE,
        "max_error_rate": cfg.max_error_rate,
        "nights": rows,
        "alerts": alerts,
    }
    out = cfg.out or storage.join(cfg.scores, "monitor")
    fs, base = storage.filesystem(out)
    fs.makedirs(base, exist_ok=True)
    storage.write_bytes(fs, storage.join(base, "monitor.json"), json.dumps(report, indent=2).encode())
    storage.write_bytes(fs, storage.join(base, "monitor.md"), render_markdown(report).encode())
    plots.monitor(report, storage.join(out, "monitor.png"))
    return dict(report, out=out)


def render_markdown(r: dict[str, Any]) -> str:
    lines = [
        f"# Nightly monitor of `{r['scores']}`",
        "",
        f"Model `{r['model_id'][:12]}`. PSI of each night's scores against {r['reference']}, over its deciles; "
        f"alert over {r['psi_alert']} when also over the night's chance bound (the PSI that an unchanged "
        f"population of its size exceeds once in {1 / (1 - r['noise_quantile']):.0f} nights). "
        f"Error rate alert over {r['max_error_rate']:.1%}.",
        "",
        "| run | date | images | error rate | flagged abnormal | PSI | chance bound | images/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for n in r["nights"]:
        lines.append(
            f"| {n['run_id']} | {n['run_date']} | {n['images']} | {n['error_rate']:.1%} | {n['flagged_share']:.1%} | "
            f"{n['psi']:.3f} | {n['psi_noise']:.3f} | {n['images_per_second'] or 0:.1f} |"
        )
    parts = sorted({p for n in r["nights"] for p in n["flagged_share_by_body_part"]})
    lines += ["", "## Share flagged abnormal per body part", "", "| run | " + " | ".join(parts) + " |"]
    lines.append("|---|" + "---:|" * len(parts))
    for n in r["nights"]:
        shares = n["flagged_share_by_body_part"]
        lines.append(
            f"| {n['run_id']} | " + " | ".join(f"{shares[p]:.0%}" if p in shares else "-" for p in parts) + " |"
        )
    lines += ["", "## Alerts", ""] + ([f"- **{a}**" for a in r["alerts"]] or ["None for the latest night."])
    lines += ["", "![monitor](monitor.png)"]
    return "\n".join(lines) + "\n"
