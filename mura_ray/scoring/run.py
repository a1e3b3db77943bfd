"""Batch scoring of whole archives to Parquet, incremental and exactly once.

A run lists the archive, and skips every image that a committed run of the
same model already scored with the same source fingerprint (size and ETag
or mtime); ``full=True`` skips nothing. Listing and skipping decode nothing,
and when nothing is left the run commits without starting Ray.

Ray Data reads and decodes the remaining files in tasks, a pool of
model-holding actors (``Scorer``) scores them, and the driver streams the
small result rows into staged Parquet: one row per image file, errors
included. Each study with a new or changed image gets a fresh row that
covers all its images, tonight's and those scored before, so the latest
row of a study is its current one. ``scoring.ledger`` commits the run's
files into ``images/`` and ``studies/`` (partitioned by ``run_date``) only
once all of them are written.
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from mura_ray.archive.catalog import scan_archive
from mura_ray.config import ScoreConfig
from mura_ray.imaging.decode import READ_ERROR
from mura_ray.model.checkpoint import load_checkpoint, resolve_model_dir
from mura_ray.model.resnet import build_model
from mura_ray.progress import Progress
from mura_ray.scoring.ledger import Lease, Ledger
from mura_ray.scoring.pipeline import results_table, scored_dataset
from mura_ray.scoring.writer import RunWriter

log = logging.getLogger(__name__)


def plan_run(catalog: pa.Table, earlier: pa.Table, *, full: bool) -> tuple[pa.Table, pa.Table]:
    """Split the catalog into (to score, skipped) against the earlier current rows of this model.

    An image is skipped when an earlier row has the same size and tag, unless
    that row failed to read the file (which may work tonight) or ``full``.
    """
    if full or earlier.num_rows == 0:
        return catalog, catalog.slice(0, 0)
    prior = earlier.select(["image_uri", "source_size", "source_etag", "error"]).rename_columns(
        ["image_uri", "prior_size", "prior_etag", "prior_error"]
    )
    joined = catalog.join(prior, keys="image_uri", join_type="left outer")
    same_size = pc.fill_null(pc.equal(joined["source_size"], joined["prior_size"]), False)
    same_tag = pc.or_(
        pc.fill_null(pc.equal(joined["source_etag"], joined["prior_etag"]), False),
        pc.and_(
            pc.is_null(joined["source_etag"]),
            pc.and_(pc.is_null(joined["prior_etag"]), pc.is_valid(joined["prior_size"])),
        ),
    )
    retry = pc.fill_null(pc.starts_with(joined["prior_error"], READ_ERROR), False)
    skip = pc.and_(pc.and_(same_size, same_tag), pc.invert(retry))
    columns = catalog.column_names
    todo = joined.filter(pc.invert(skip)).select(columns).sort_by("image_uri")
    skipped = joined.filter(skip).select(columns).sort_by("image_uri")
    return todo, skipped


def run_scoring(cfg: ScoreConfig) -> dict[str, Any]:
    """Score what is new under ``cfg.data`` and commit the run's Parquet under ``cfg.out``."""
    t0 = time.monotonic()
    started_at = dt.datetime.now(dt.timezone.utc)
    model_dir = resolve_model_dir(cfg.model)
    state, meta = load_checkpoint(model_dir)
    build_model().load_state_dict(state)  # fail here, not in every actor, if the weights do not fit
    scan = scan_archive(cfg.data, split=cfg.split)
    run_id = cfg.run_id or started_at.strftime("%Y%m%dT%H%M%SZ-") + secrets.token_hex(3)
    ledger = Ledger(cfg.out)
    lease = Lease(ledger.fs, ledger.base, run_id)
    lease.acquire()
    try:
        recovered = ledger.recover(active_run_id=run_id)
        earlier = ledger.scored(meta["model_id"])
        todo, skipped = plan_run(scan.table, earlier, full=cfg.full)
        log.info(
            "%d images under %s (%d other files ignored): %d to score, %d already scored by model %s",
            scan.table.num_rows,
            cfg.data,
            len(scan.ignored),
            todo.num_rows,
            skipped.num_rows,
            meta["model_id"][:12],
        )
        writer = RunWriter(ledger, todo, run_id, meta["model_id"], float(meta.get("threshold", 0.5)))
        if todo.num_rows:
            _score_into(writer, todo, meta, model_dir, cfg, lease)
        if writer.parts and skipped.num_rows:
            writer.add_earlier(earlier.filter(pc.is_in(earlier["image_uri"], skipped["image_uri"])))
        seconds = time.monotonic() - t0
        manifest = writer.commit(
            started_at.strftime("%Y-%m-%d"),
            {
                "input": cfg.data,
                "split": cfg.split,
                "full": cfg.full,
                "started_at": started_at.isoformat(),
                "skipped": skipped.num_rows,
                "ignored_files": len(scan.ignored),
                "seconds": round(seconds, 3),
                "images_per_second": round(writer.rows / seconds, 3) if seconds else 0.0,
                "recovered": recovered,
            },
        )
    finally:
        lease.release()
    log.info(
        "committed run %s: %d image rows, %d study rows under %s",
        run_id,
        manifest["images"],
        manifest["studies"],
        cfg.out,
    )
    return dict(manifest, output=cfg.out, ignored_examples=scan.ignored[:5])


def _score_into(
    writer: RunWriter, todo: pa.Table, meta: dict[str, Any], model_dir: str, cfg: ScoreConfig, lease: Lease
) -> None:
    """Run the Ray pipeline over ``todo`` and stream every result into ``writer``."""
    ds = scored_dataset(todo, model_dir, meta, cfg)
    with Progress("scoring", todo.num_rows) as bar:
        for batch in ds.iter_batches(batch_size=256, batch_format="numpy"):
            writer.add(results_table(batch))
            lease.refresh()
            bar.set(writer.rows, postfix=f"{writer.errors} errors" if writer.errors else "")
    log.info("scored %d images in %.1fs (%.1f images/s), %d errors", writer.rows, bar.seconds, bar.rate, writer.errors)
    if writer.rows != todo.num_rows:
        raise RuntimeError(f"scored {writer.rows} rows for {todo.num_rows} images; nothing committed")
