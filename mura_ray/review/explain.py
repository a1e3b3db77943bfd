"""``mura-ray explain``: Grad-CAM overlays of the studies asked for, and an index of them.

Writes ``DIR/<path under ROOT>.heatmap.png`` per image (the radiograph, the
same under its heatmap, and the calibrated score) and ``DIR/index.parquet``
(``scoring.schemas.INDEX_SCHEMA``). ``--studies flagged`` first scores the
archive with the fast engines and keeps the studies predicted abnormal;
``all`` takes every study; a comma list names study folders.
``overlays_of`` makes the same pictures in-process for the evaluation's gallery.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from mura_ray import cluster, console
from mura_ray.archive import storage
from mura_ray.archive.catalog import build_catalog
from mura_ray.config import ExplainConfig
from mura_ray.errors import UsageError
from mura_ray.imaging.decode import MAX_BYTES, one_line
from mura_ray.imaging.preprocess import EvalPreset, fit_of, load_square, read_capped
from mura_ray.model.calibration import Calibration
from mura_ray.model.checkpoint import read_checkpoint
from mura_ray.model.ensemble import module_from
from mura_ray.model.heatmaps import HEATMAP_LAYER, display_square, grad_cam, overlay
from mura_ray.model.registry import resolve_model_dir
from mura_ray.options import placement_of
from mura_ray.progress import Progress
from mura_ray.reporting.metrics import study_scores
from mura_ray.scoring.heatmaps import heatmap_dataset, heatmap_name, index_rows
from mura_ray.scoring.pipeline import ScoringSettings, results_table, scored_dataset
from mura_ray.scoring.studies import at_or_above

log = logging.getLogger(__name__)

INDEX = "index.parquet"


def overlays_of(
    uris: list[str], data: str, weights: bytes, meta: dict[str, Any], display: int = 160, probs: list | None = None
) -> list:
    """Overlay pictures ((H, W, 3) uint8) of a few images, computed here without Ray (for galleries); each shows
    its score from ``probs`` when given (as a report recorded it), else the one computed with the heatmap.
    An image that cannot be read or decoded now (gone or changed since it was scored) gets None."""
    fs, _ = storage.filesystem(data)
    size, side = int(meta["image_size"]), int(meta["cache_side"])
    fit = fit_of(meta)
    squares, views, kept = [], [], []
    for i, u in enumerate(uris):
        try:
            blob = read_capped(fs, u, MAX_BYTES)
            squares.append(load_square(blob, side, fit=fit, name=u))
            views.append(load_square(blob, round(display * side / size), fit=fit, name=u))
            kept.append(i)
        except Exception as exc:  # a picture fewer, never the report
            log.warning("no overlay of %s: %s", u, one_line(f"{type(exc).__name__}: {exc}"))
    pictures: list = [None] * len(uris)
    if not kept:
        return pictures
    model = module_from(weights, meta)
    pixels = EvalPreset(size=size)({"pixels": np.stack(squares)})["pixels"]
    with torch.enable_grad():
        maps, own = grad_cam(model, pixels, layer=HEATMAP_LAYER, calibration=Calibration.of(meta))
    for j, (i, view, heat) in enumerate(zip(kept, views, maps)):
        p = own[j] if probs is None else probs[i]
        pictures[i] = overlay(display_square(view, size, side, side=display), heat, float(p))
    return pictures


def run_explain(cfg: ExplainConfig) -> dict[str, Any]:
    """Write the overlays and their index under ``cfg.out``; returns counts and where they are."""
    t0 = time.monotonic()
    weights, meta = read_checkpoint(resolve_model_dir(cfg.model))
    catalog = build_catalog(cfg.data, split=cfg.split, follow_links=cfg.follow_links)
    if not storage.is_remote(cfg.out):
        console.set_ray_log(storage.join(cfg.out, "ray.log"))
    cluster.connect()  # _choose scores the archive to find the flagged studies
    chosen = _choose(catalog, cfg, weights, meta)
    fs, out = storage.filesystem(cfg.out)
    fs.makedirs(out, exist_ok=True)
    study_of = dict(zip(catalog["image_uri"].to_pylist(), catalog["study_uri"].to_pylist()))
    parts = []
    ds = heatmap_dataset(
        chosen, weights, meta, cfg.data, layer=cfg.layer, batch_size=cfg.batch_size, placement=placement_of(cfg)
    )
    with Progress("heatmaps", chosen.num_rows) as bar:
        for batch in ds.iter_batches(batch_size=16, batch_format="numpy"):
            for uri, png in zip(batch["image_uri"], batch["png"]):
                if len(png):
                    storage.write_bytes(fs, storage.join(out, heatmap_name(str(uri), cfg.data)), png)
            parts.append(index_rows(batch, study_of, cfg.data, meta, cfg.layer))
            bar.update(len(batch["image_uri"]))
    index = pa.concat_tables(parts).sort_by("image_uri") if parts else None
    if index is not None:
        with fs.open(storage.join(out, INDEX), "wb") as f:
            pq.write_table(index, f)
    written = index["error"].null_count if index is not None else 0  # rows without an error
    errors = index.num_rows - written if index is not None else 0
    studies = len({study_of[u] for u in chosen["image_uri"].to_pylist()})
    return {"images": written, "errors": errors, "studies": studies, "out": cfg.out, "seconds": time.monotonic() - t0}


def _choose(catalog: pa.Table, cfg: ExplainConfig, weights: bytes, meta: dict[str, Any]) -> pa.Table:
    """The images to explain (``image_uri``, with ``prob_abnormal`` when they were scored to choose them)."""
    if cfg.studies == "all":
        return catalog.select(["image_uri"])
    if cfg.studies == "flagged":
        return _flagged(catalog, cfg, weights, meta)
    root = cfg.data.rstrip("/") + "/"
    wanted = {s.strip() for s in cfg.studies.split(",") if s.strip()}
    names = {w: (w if "://" in w or w.startswith("/") else root + w).rstrip("/") for w in wanted}
    known = {s.rstrip("/"): s for s in catalog["study_uri"].to_pylist()}
    missing = sorted(w for w, uri in names.items() if uri not in known)
    if missing:
        raise UsageError(f"--studies: no images of {', '.join(missing[:3])} under {cfg.data!r}")
    chosen = pa.array(sorted(known[uri] for uri in names.values()), pa.string())
    rows = catalog.filter(pc.is_in(catalog["study_uri"], chosen))
    return rows.select(["image_uri"])


def _flagged(catalog: pa.Table, cfg: ExplainConfig, weights: bytes, meta: dict[str, Any]) -> pa.Table:
    """The images of the studies whose mean calibrated score is at or above the model's threshold."""
    parts = []
    settings = ScoringSettings(
        data=cfg.data,
        modalities="ALL",
        use_gpu=cfg.use_gpu,
        gpus_per_actor=cfg.gpus_per_actor,
        gpu_timeout=cfg.gpu_timeout,
    )
    with Progress("scoring to find flagged studies", catalog.num_rows) as bar:
        for batch in scored_dataset(catalog, weights, meta, settings).iter_batches(batch_size=128):
            parts.append(results_table(batch))
            bar.update(parts[-1].num_rows)
    scored = catalog.select(["image_uri", "study_uri"]).join(pa.concat_tables(parts), "image_uri")
    scored = scored.filter(pc.is_valid(scored["prob_abnormal"]))
    studies = np.asarray(scored["study_uri"].to_pylist(), dtype=object)
    ids, means, _ = study_scores(studies, scored["prob_abnormal"].to_numpy())
    # The scores table's rule for a study row's predicted_abnormal, so both flag the same studies.
    flagged = ids[at_or_above(pa.array(means), float(meta.get("threshold", 0.5))).to_numpy(zero_copy_only=False)]
    log.info("%d of %d studies are predicted abnormal", len(flagged), len(ids))
    chosen = scored.filter(pc.is_in(scored["study_uri"], pa.array(flagged.tolist(), pa.string())))
    return chosen.select(["image_uri", "prob_abnormal"]).sort_by("image_uri")
