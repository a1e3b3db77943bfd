"""``mura-ray bench recipe``: what the preprocessing and an ensemble change, measured on the hard sample.

On ``sample --kind hard`` (MURA-like shapes, fractures anywhere along the
bone), it trains the same recipe with ``--fit crop`` and ``--fit pad`` and two
more ``pad`` members with other ``--seed``s (the same tuning split), builds
the ensemble of the three ``pad`` models, and fine-tunes ``pad`` from the
crop model's weights with the stem, layer1 and layer2 frozen, once with
their batch norms frozen too and once following the batches (as before the
fix). Each is reported on the validation
split (which chose nothing): study kappa and AUROC with patient-level 95%
intervals, and the image-level sensitivity split by where the drawn fracture
lies: inside the square a centre crop keeps, or outside it. Models start
from random weights (no ImageNet here), so the figures are about the
preprocessing, not about MURA's numbers.
"""

from __future__ import annotations

import csv
import datetime as dt
import os
import time
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from mura_ray import cluster
from mura_ray.archive import storage
from mura_ray.archive.sample import FINDINGS_CSV, write_sample
from mura_ray.bench.scoring import cpu_text
from mura_ray.config import EnsembleConfig, TrainConfig
from mura_ray.hardware import cpu_info
from mura_ray.imaging.preprocess import RESIZE_RATIO
from mura_ray.reporting.metrics import fmt, fmt_ci
from mura_ray.training.driver import run_training
from mura_ray.training.ensemble import build_ensemble
from mura_ray.training.rundir import VALID_PREDICTIONS


def crop_keeps(box: tuple[int, int, int, int], height: int, width: int) -> bool:
    """Whether the centre of a finding's box lies in what ``--fit crop`` shows the model: the centre square of
    the short side, cut again by the evaluation crop (1 / RESIZE_RATIO of it)."""
    side = min(height, width) / RESIZE_RATIO
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return abs(cx - width / 2) <= side / 2 and abs(cy - height / 2) <= side / 2


def findings_by_place(archive: str) -> dict[str, bool]:
    """Image path (relative, as in the sidecar) -> whether its fracture lies inside the crop's square."""
    with open(os.path.join(archive, FINDINGS_CSV)) as f:
        return {
            r["image"]: crop_keeps(
                (int(r["x0"]), int(r["y0"]), int(r["x1"]), int(r["y1"])), int(r["height"]), int(r["width"])
            )
            for r in csv.DictReader(f)
        }


def sensitivity_by_place(model_dir: str, meta: dict[str, Any], archive: str) -> dict[str, Any]:
    """Image-level sensitivity at the model's threshold on the validation images that show a fracture, split by
    whether a centre crop keeps it."""
    preds = pq.read_table(os.path.join(model_dir, VALID_PREDICTIONS)).to_pylist()
    places = findings_by_place(archive)
    root = os.path.abspath(archive)
    out: dict[str, Any] = {}
    for name, inside in (("inside", True), ("outside", False)):
        hits = [
            r["prob_abnormal"] >= meta["threshold"]
            for r in preds
            if places.get(os.path.relpath(storage.path_in(r["image_uri"]), root)) is inside
        ]
        out[name] = {"images": len(hits), "sensitivity": float(np.mean(hits)) if hits else float("nan")}
    return out


def bench_recipe(
    *, studies: int = 400, image_size: int = 112, epochs: int = 6, out: str, workers: int = 2
) -> dict[str, Any]:
    """Train crop, pad and two more pad members on the hard sample; the ensemble; one row each."""
    archive = os.path.join(out, "archive")
    if not os.path.exists(os.path.join(archive, FINDINGS_CSV)):
        write_sample(archive, studies=studies, seed=0, kind="hard")
    cluster.connect()
    runs: list[dict[str, Any]] = []
    t0 = time.perf_counter()

    def train(name: str, fit: str, seed: int, **changes: Any) -> dict[str, Any]:
        started = time.perf_counter()
        settings = dict(
            data=archive,
            out=os.path.join(out, "run-" + name.replace(", ", "-").replace(" ", "_")),
            workers=workers,
            epochs=epochs,
            image_size=image_size,
            fit=fit,
            batch_size=16,
            lr=1e-3,
            weights="none",
            patience=4,
            seed=seed,
            guard_images=0,
        )
        result = run_training(TrainConfig(**dict(settings, **changes)))
        row = {"name": name, "fit": fit, "model_dir": result["model_dir"], "meta": result}
        runs.append(dict(row, seconds=time.perf_counter() - started))
        return result

    crop = train("crop, seed 0", "crop", 0)
    pads = [train(f"pad, seed {seed}", "pad", seed)["model_dir"] for seed in (0, 1, 2)]
    ens = build_ensemble(EnsembleConfig(models=pads, out=os.path.join(out, "run-ensemble")))
    runs.append({"name": "pad, ensemble of seeds 0-2", "fit": "pad", "model_dir": ens["model_dir"], "meta": ens})
    start = os.path.join(crop["model_dir"], "model.safetensors")
    for frozen, words in ((True, "frozen"), (False, "following the batches")):
        train(
            f"pad from the crop model, layers 1-2 frozen, their BN {words}",
            "pad",
            0,
            weights=start,
            trainable="layer3,layer4,fc",
            frozen_norms=frozen,
        )
    rows = []
    for r in runs:
        v = r["meta"]["validation"]["study"]
        rows.append(
            {
                "model": r["name"],
                "fit": r["fit"],
                "study_kappa": v["kappa"],
                "study_kappa_ci": v["kappa_ci"],
                "study_auroc": v["auroc"],
                "study_auroc_ci": v["auroc_ci"],
                "studies": v["n"],
                "image_sensitivity": sensitivity_by_place(r["model_dir"], r["meta"], archive),
                "seconds": r.get("seconds"),
            }
        )
    return {
        "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_info(),
        "studies": studies,
        "image_size": image_size,
        "epochs": epochs,
        "workers": workers,
        "rows": rows,
        "total_seconds": time.perf_counter() - t0,
    }


def recipe_table(result: dict[str, Any]) -> str:
    """The result as a Markdown table, with the machine and the settings."""
    lines = [
        f"hard sample, {result['studies']} studies; {result['image_size']} px, at most {result['epochs']} epochs, "
        f"{result['workers']} workers, random start; validation split (chose nothing), 95% CIs over patients",
        "",
        "| model | study kappa | study AUROC | image sensitivity, fracture inside the crop | outside |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        s = r["image_sensitivity"]
        lines.append(
            f"| {r['model']} | {fmt(r['study_kappa'])} {fmt_ci(r['study_kappa_ci'])} | {fmt(r['study_auroc'])} "
            f"{fmt_ci(r['study_auroc_ci'])} | {fmt(s['inside']['sensitivity'])} ({s['inside']['images']}) | "
            f"{fmt(s['outside']['sensitivity'])} ({s['outside']['images']}) |"
        )
    lines += ["", f"{cpu_text(result)}; {result['total_seconds']:.0f}s in all"]
    return "\n".join(lines)
