"""Batch scoring of whole archives to Parquet, incremental and exactly once.

A run lists the archive, and skips every image that a committed run of the
same model, with the same calibration, preprocessing and test-time
augmentation (the rows' ``scoring_id``), already scored with the same source
fingerprint (size and ETag or mtime); ``full=True`` skips nothing. Listing and skipping decode nothing,
and when nothing is left the run commits without starting Ray.

Ray Data reads and decodes the remaining files in tasks, a pool of
model-holding actors (``Scorer``) scores them, and the driver streams the
small result rows into staged Parquet: one row per image file, errors
included. Each study with a new or changed image gets a fresh row that
covers all its images, tonight's and those scored before, so the latest
row of a study is its current one. ``scoring.ledger`` commits the run's
files into ``images/`` and ``studies/`` (partitioned by ``run_date``) every
``commit_every`` images and at the end, each chunk once; a run stopped
after K chunks keeps them, and the next run scores only the rest.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import secrets
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from mura_ray import faults
from mura_ray.archive import storage
from mura_ray.archive.catalog import scan_archive
from mura_ray.config import ScoreConfig
from mura_ray.imaging.decode import READ_ERROR
from mura_ray.model import backends
from mura_ray.model.checkpoint import read_checkpoint, resolve_model_dir, scoring_id_of
from mura_ray.model.ensemble import module_from
from mura_ray.model.heatmaps import HEATMAP_LAYER
from mura_ray.options import placement_of
from mura_ray.progress import Progress
from mura_ray.scoring import pseudonyms
from mura_ray.scoring.heatmaps import heatmap_dataset, heatmap_name, index_rows
from mura_ray.scoring.lease import Lease
from mura_ray.scoring.ledger import Ledger
from mura_ray.scoring.pipeline import accepted_modalities, results_table, scored_dataset
from mura_ray.scoring.writer import RunWriter

log = logging.getLogger(__name__)


def plan_run(
    catalog: pa.Table, earlier: pa.Table, *, full: bool, not_scored: pa.Table | None = None
) -> tuple[pa.Table, pa.Table]:
    """Split the catalog into (to score, skipped) against the earlier current rows of this model.

    An image is skipped when an earlier row has the same size and tag, unless
    that row failed to read the file (which may work tonight) or ``full``.
    A file an earlier run found to be a DICOM of a modality not scored
    (``not_scored``) is skipped while its size and tag stay the same.
    """
    if not_scored is not None and not_scored.num_rows:
        known = not_scored.select(["image_uri", "source_size", "source_etag"]).rename_columns(
            ["image_uri", "prior_size", "prior_etag"]
        )
        joined = catalog.join(known, keys="image_uri", join_type="left outer")
        same = pc.and_(_same(joined["source_size"], joined["prior_size"]), _same_tag(joined))
        catalog = joined.filter(pc.invert(same)).select(catalog.column_names).sort_by("image_uri")
    if full or earlier.num_rows == 0:
        return catalog, catalog.slice(0, 0)
    prior = earlier.select(["image_uri", "source_size", "source_etag", "error"]).rename_columns(
        ["image_uri", "prior_size", "prior_etag", "prior_error"]
    )
    joined = catalog.join(prior, keys="image_uri", join_type="left outer")
    retry = pc.fill_null(pc.starts_with(joined["prior_error"], READ_ERROR), False)
    skip = pc.and_(pc.and_(_same(joined["source_size"], joined["prior_size"]), _same_tag(joined)), pc.invert(retry))
    columns = catalog.column_names
    todo = joined.filter(pc.invert(skip)).select(columns).sort_by("image_uri")
    skipped = joined.filter(skip).select(columns).sort_by("image_uri")
    return todo, skipped


def _same(a: pa.ChunkedArray, b: pa.ChunkedArray) -> pa.ChunkedArray:
    return pc.fill_null(pc.equal(a, b), False)


def _same_tag(joined: pa.Table) -> pa.ChunkedArray:
    """Same change tag, or no tag on either side of a row that was found before."""
    return pc.or_(
        _same(joined["source_etag"], joined["prior_etag"]),
        pc.and_(
            pc.is_null(joined["source_etag"]),
            pc.and_(pc.is_null(joined["prior_etag"]), pc.is_valid(joined["prior_size"])),
        ),
    )


def run_scoring(cfg: ScoreConfig) -> dict[str, Any]:
    """Score what is new under ``cfg.data`` and commit the run's Parquet under ``cfg.out``, chunk by chunk."""
    t0 = time.monotonic()
    started_at = dt.datetime.now(dt.timezone.utc)
    backends.check_choice(cfg.backend, cfg.precision)
    names = pseudonyms.from_settings(cfg.pseudonymize, cfg.pseudonym_map)
    weights, meta = read_checkpoint(resolve_model_dir(cfg.model))
    module_from(weights, meta)  # fail here, not in every actor, if the weights do not fit
    scan = scan_archive(cfg.data, split=cfg.split, follow_links=cfg.follow_links)
    if names is not None:
        _write_map(names, scan, cfg)
        scan = dataclasses.replace(scan, table=names.catalog(scan.table))
    ledger = Ledger(cfg.out)
    run_id = cfg.run_id or started_at.strftime("%Y%m%dT%H%M%SZ-") + secrets.token_hex(3)
    ledger.check_new_run_id(run_id)
    lease = Lease(ledger.fs, ledger.base, run_id)
    lease.acquire()
    faults.maybe_pause("pause-after-lease")
    try:
        if lease.taken_from is not None:
            ledger.fence(lease.taken_from["run_id"], by=run_id, lease=lease)
        recovered = ledger.recover(active_run_id=run_id, lease=lease)
        key_id = names.key_id if names is not None else None
        pseudonyms.check_one_key(ledger.manifests(), key_id, cfg.out)
        scoring_id = scoring_id_of(meta, cfg.tta)
        earlier, todo, skipped = _plan(ledger, scan, meta["model_id"], scoring_id, cfg)
        plan_seconds = time.monotonic() - t0
        threshold, run_date = float(meta.get("threshold", 0.5)), started_at.strftime("%Y-%m-%d")
        writer = RunWriter(ledger, lease, todo, earlier, run_id, meta["model_id"], threshold, run_date, scoring_id)
        writer.keep_scores = cfg.heatmaps == "flagged"
        head = {"input": cfg.data, "split": cfg.split, "full": cfg.full, "started_at": started_at.isoformat()}
        head["pseudonyms"] = key_id
        heatmaps = 0
        if todo.num_rows:
            _score_into(writer, todo, weights, meta, cfg, head, names)
            if writer.keep_scores:
                heatmaps = _heatmaps_into(writer, todo, weights, meta, cfg, names)
        seconds = time.monotonic() - t0
        totals = {
            "run_id": run_id,
            "model_id": meta["model_id"],
            "scoring_id": scoring_id,
            "threshold": writer.threshold,
            "images": writer.rows,
            "errors": writer.errors,
            "skipped": skipped.num_rows,
            "not_radiographs": writer.not_radiographs,
            "engines": writer.engines,
            "heatmaps": heatmaps,
            "distribution": writer.distribution.record(),
            "tta": cfg.tta,
            "not_radiographs_known": scan.table.num_rows - todo.num_rows - skipped.num_rows,
            "ignored_files": len(scan.ignored),
            "missing_files": len(scan.missing),
            "broken_links": len(scan.broken_links),
            **scan.counts(),
            "seconds": round(seconds, 3),
            "plan_seconds": round(plan_seconds, 3),
            "images_per_second": round(writer.rows / seconds, 3) if seconds else 0.0,
            "recovered": recovered,
        }
        last = writer.commit(dict(head, final=True, run=totals))
        ledger.update_index(scoring_id, lease)
        ledger.drop_staging(run_id)
    finally:
        lease.release()
    totals = dict(last["run"], chunks=last["chunk"] + 1)
    log.info("committed run %(run_id)s: %(images)d image rows, %(studies)d study rows in %(chunks)d chunk(s)", totals)
    examples = {"ignored": scan.ignored, "missing": scan.missing, "broken_link": scan.broken_links}
    if names is not None:
        examples = {k: [names.path(p) for p in v[:5]] for k, v in examples.items()}
    return dict(totals, output=cfg.out, **{f"{k}_examples": v[:5] for k, v in examples.items()})


def _write_map(names: pseudonyms.Pseudonyms, scan: Any, cfg: ScoreConfig) -> None:
    """``--pseudonym-map``: every pseudonym the run can make from this listing, and what it stands for."""
    if not cfg.pseudonym_map:
        return
    table = names.mapping(scan.table, scan.ignored + scan.missing + scan.broken_links)
    pseudonyms.write_map(table, cfg.pseudonym_map)
    inside = cfg.pseudonym_map.startswith(cfg.out.rstrip("/") + "/")
    log.log(
        logging.WARNING if inside else logging.INFO,
        "wrote %d pseudonyms and what they stand for to %s%s",
        table.num_rows,
        cfg.pseudonym_map,
        " (inside --out: whoever reads the scores can undo them)" if inside else "",
    )


def _plan(
    ledger: Ledger, scan: Any, model_id: str, scoring_id: str, cfg: ScoreConfig
) -> tuple[pa.Table, pa.Table, pa.Table]:
    """(earlier current rows of the archive's images, to score, skipped) for this run."""
    earlier = ledger.scored(scoring_id)
    earlier = earlier.filter(pc.is_in(earlier["image_uri"], scan.table["image_uri"]))
    not_scored = ledger.not_scored()
    accepted = accepted_modalities(cfg.modalities)
    # Set aside while their modality is still not asked for: with --modalities extended, they are scored.
    keep = (
        pc.invert(pc.is_in(not_scored["modality"], pa.array(accepted, pa.string())))
        if accepted is not None
        else pa.array([False] * not_scored.num_rows, pa.bool_())
    )
    todo, skipped = plan_run(scan.table, earlier, full=cfg.full, not_scored=not_scored.filter(keep))
    log.info(
        "%d images under %s (%d other files ignored): %d to score, %d already scored by model %s (scoring id %s)",
        scan.table.num_rows,
        cfg.data,
        len(scan.ignored),
        todo.num_rows,
        skipped.num_rows,
        model_id[:12],
        scoring_id[:12],
    )
    return earlier, todo, skipped


def _score_into(
    writer: RunWriter,
    todo: pa.Table,
    weights: bytes,
    meta: dict[str, Any],
    cfg: ScoreConfig,
    head: dict[str, Any],
    names: pseudonyms.Pseudonyms | None,
) -> None:
    """Run the Ray pipeline over ``todo``, streaming every result into ``writer`` and committing every
    ``cfg.commit_every`` images. With ``names``, the tasks read the real paths and the writer sees only
    their pseudonyms."""
    keys, by_path = _keys_to_read(todo, names)
    ds = scored_dataset(keys, weights, meta, cfg)
    seen = 0
    with Progress("scoring", todo.num_rows) as bar:
        for batch in ds.iter_batches(batch_size=min(256, cfg.commit_every), batch_format="numpy"):
            results = results_table(batch)
            if names is not None:
                results = names.results(results, by_path)
            seen += results.num_rows
            writer.add(results)
            if writer.pending >= cfg.commit_every:
                writer.commit(dict(head, final=False))
                faults.maybe_kill("chunk-committed")
            bar.set(seen, postfix=f"{writer.errors} errors" if writer.errors else "")
    log.info("scored %d images in %.1fs (%.1f images/s), %d errors", seen, bar.seconds, bar.rate, writer.errors)
    if seen != todo.num_rows:
        raise RuntimeError(f"scored {seen} rows for {todo.num_rows} images; the rest is not committed")


def _keys_to_read(todo: pa.Table, names: pseudonyms.Pseudonyms | None) -> tuple[pa.Table, dict[str, str]]:
    """(``image_uri`` rows of the files to read, each real path -> its row's ``image_uri``)."""
    if names is None:
        return todo, {}
    paths = todo[pseudonyms.SOURCE]
    keys = todo.select([c for c in ("source_size", "source_etag") if c in todo.column_names])
    keys = keys.add_column(0, "image_uri", paths)
    return keys, dict(zip(paths.to_pylist(), todo["image_uri"].to_pylist()))


def _heatmaps_into(
    writer: RunWriter,
    todo: pa.Table,
    weights: bytes,
    meta: dict[str, Any],
    cfg: ScoreConfig,
    names: pseudonyms.Pseudonyms | None,
) -> int:
    """Stage a Grad-CAM overlay of each image this run scored in a study predicted abnormal, and their index,
    to be committed with the run's last chunk: the PNGs under ``heatmaps/run_date=D/run_id=R/``, the index as
    ``heatmap_index/run_date=D/R.parquet``; returns how many. With ``names``, each PNG is named by its image's
    pseudonym and captioned with its start."""
    flagged = writer.flagged_images()
    if flagged.num_rows == 0:
        return 0
    root = cfg.data if names is None else None  # pseudonyms are names already, under no root
    folder = storage.join("heatmaps", f"run_date={writer.run_date}", f"run_id={writer.run_id}")
    study_of = dict(zip(todo["image_uri"].to_pylist(), todo["study_uri"].to_pylist()))
    keys, by_path = _keys_to_read(todo.filter(pc.is_in(todo["image_uri"], flagged["image_uri"])), names)
    if names is not None:
        shown = dict(zip(flagged["image_uri"].to_pylist(), flagged["prob_abnormal"].to_pylist()))
        order = [by_path[p] for p in keys["image_uri"].to_pylist()]
        keys = keys.append_column("prob_abnormal", pa.array([shown[u] for u in order], pa.float32()))
        keys = keys.append_column("caption", pa.array([_caption(u) for u in order], pa.string()))
    else:
        keys = flagged
    parts = []
    ds = heatmap_dataset(keys, weights, meta, cfg.data, placement=placement_of(cfg))
    with Progress("heatmaps of flagged studies", flagged.num_rows) as bar:
        for batch in ds.iter_batches(batch_size=16, batch_format="numpy"):
            if names is not None:
                paths, errors = [str(p) for p in batch["image_uri"]], [str(e) for e in batch["error"]]
                named = [by_path[p] for p in paths]
                scrubbed = [pseudonyms.scrub(e, p, n) if e else e for e, p, n in zip(errors, paths, named)]
                batch = dict(batch, image_uri=named, error=scrubbed)
            for uri, png in zip(batch["image_uri"], batch["png"]):
                if len(png):
                    writer.stage_file(storage.join(folder, heatmap_name(str(uri), root)), png)
            parts.append(index_rows(batch, study_of, root, meta, HEATMAP_LAYER, prefix=folder))
            bar.update(len(batch["image_uri"]))
    index = pa.concat_tables(parts).sort_by("image_uri")
    index_file = storage.join("heatmap_index", f"run_date={writer.run_date}", f"{writer.run_id}.parquet")
    writer.stage_file(index_file, storage.parquet_bytes(index))
    made = index["error"].null_count  # rows without an error
    log.info("staged %d heatmaps of %d flagged studies", made, len(set(flagged["study_uri"].to_pylist())))
    return made


def _caption(image: str) -> str:
    """What an overlay of a pseudonymized image says it shows: the start of its study's and its own pseudonym."""
    study, _, own = image.partition("/")
    return f"{study[:13]}/{own[:13]}"
