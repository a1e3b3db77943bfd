"""Batch scoring of whole archives into the scores table, incremental and exactly once.

A run lists the archive, and skips every image whose current row in the
scores table (``scoring.delta``) has the same ``scoring_id`` (the model, its
calibration, preprocessing and test-time augmentation) and the same source
fingerprint (size and ETag or mtime); ``full=True`` skips nothing. Listing
and skipping decode nothing, and when nothing is left the run commits its
row without starting Ray.

Ray Data reads and decodes the remaining files in tasks, a pool of
model-holding actors (``Scorer``) scores them, and the driver collects the
small result rows: one row per image file, errors included. Every
``commit_every`` images and at the end the run commits a chunk, one Delta
commit with its image rows and a row for each study it touched, over all
the study's current image rows; a run stopped after K chunks keeps them,
and the next run scores only the rest. With ``--heatmaps flagged`` the
images of flagged studies without an overlay of their current row (this
run's, or a killed run's) get one, committed with the run's last chunk.
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

from mura_ray import cluster, faults
from mura_ray.archive import storage
from mura_ray.archive.catalog import scan_archive
from mura_ray.config import ScoreConfig
from mura_ray.imaging.decode import READ_ERROR
from mura_ray.model import backends
from mura_ray.model.checkpoint import read_checkpoint, scoring_id_of
from mura_ray.model.ensemble import module_from
from mura_ray.model.heatmaps import HEATMAP_LAYER
from mura_ray.model.registry import resolve_model_dir
from mura_ray.options import placement_of
from mura_ray.progress import Progress
from mura_ray.scoring import pseudonyms
from mura_ray.scoring.delta import ScoreStore
from mura_ray.scoring.heatmaps import heatmap_dataset, heatmap_name, index_rows
from mura_ray.scoring.pipeline import ScoringSettings, accepted_modalities, results_table, scored_dataset
from mura_ray.scoring.schemas import HEATMAP_EXTRA, HEATMAPS
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
    """Score what is new under ``cfg.data`` and commit its rows to the scores table under ``cfg.out``, by chunks."""
    t0 = time.monotonic()
    started_at = dt.datetime.now(dt.timezone.utc)
    backends.check_choice(cfg.backend, cfg.precision)
    names = pseudonyms.from_settings(cfg.pseudonymize, cfg.pseudonym_map)
    weights, meta = read_checkpoint(resolve_model_dir(cfg.model))
    module_from(weights, meta)  # fail here, not in every actor, if the weights do not fit
    listed_from = time.monotonic()
    scan = scan_archive(cfg.data, split=cfg.split, follow_links=cfg.follow_links)
    list_seconds = time.monotonic() - listed_from
    if names is not None:
        _write_map(names, scan, cfg)
        scan = dataclasses.replace(scan, table=names.catalog(scan.table))
    store = ScoreStore(cfg.out)
    _note_old_format(cfg.out)
    run_id = cfg.run_id or started_at.strftime("%Y%m%dT%H%M%SZ-") + secrets.token_hex(3)
    planned = store.table()  # one snapshot to plan from (None before the first commit)
    resumed = store.last_chunk(run_id, planned)
    if resumed is not None:
        log.info("run %s committed chunks up to %d before: it goes on from chunk %d", run_id, resumed, resumed + 1)
    key_id = names.key_id if names is not None else None
    runs = store.runs(planned)
    pseudonyms.check_one_key([dict(r["totals"], status="committed") for r in runs], key_id, cfg.out)
    scoring_id = scoring_id_of(meta, cfg.tta)
    todo, skipped = _plan(store, planned, scan, meta["model_id"], scoring_id, cfg)
    faults.maybe_pause("pause-after-plan")
    plan_seconds = time.monotonic() - t0
    threshold, run_date = float(meta.get("threshold", 0.5)), started_at.strftime("%Y-%m-%d")
    first = 0 if resumed is None else resumed + 1
    writer = RunWriter(store, todo, run_id, meta["model_id"], threshold, run_date, scoring_id, chunk=first)
    head = {"input": cfg.data, "split": cfg.split, "full": cfg.full, "started_at": started_at.isoformat()}
    head["pseudonyms"] = key_id
    if todo.num_rows:
        _score_into(writer, todo, weights, meta, cfg, head, names)
    drawn, heatmaps = None, 0
    if cfg.heatmaps == "flagged":
        if writer.has_rows():
            writer.commit(dict(head, final=False))  # the overlays are chosen from committed rows
        drawn = _heatmaps_of(store, writer, scan.table, weights, meta, cfg, names)
        heatmaps = drawn["error"].null_count if drawn is not None else 0
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
        "list_seconds": round(list_seconds, 3),
        "commit_seconds": round(writer.commit_seconds, 3),
        "images_per_second": round(writer.rows / seconds, 3) if seconds else 0.0,
        "resumed_after_chunk": resumed,
    }
    last = writer.commit(dict(head, final=True, run=totals), heatmaps=drawn)
    # commit_seconds counts the last commit too, which the run's row, written in it, cannot.
    totals = dict(last["run"], chunks=last["chunk"] + 1 - first, version=last["version"])
    totals["commit_seconds"] = round(writer.commit_seconds, 3)
    log.info(
        "committed run %(run_id)s: %(images)d image rows, %(studies)d studies updated in %(chunks)d chunk(s), "
        "table version %(version)d",
        totals,
    )
    examples = {"ignored": scan.ignored, "missing": scan.missing, "broken_link": scan.broken_links}
    if names is not None:
        examples = {k: [names.path(p) for p in v[:5]] for k, v in examples.items()}
    return dict(totals, output=cfg.out, **{f"{k}_examples": v[:5] for k, v in examples.items()})


def _note_old_format(out: str) -> None:
    """One line when ``out`` holds scores in the format of mura-ray before the Delta table (``_runs/``)."""
    fs, base = storage.filesystem(out)
    try:
        old = fs.exists(storage.join(base, "_runs"))
    except Exception:
        old = False
    if old:
        log.warning(
            "%s holds scores in the format of mura-ray < 0.3 (_runs/, images/, studies/): they are left as they "
            "are and not read; this run scores the archive anew into %s/scores",
            out,
            out.rstrip("/"),
        )


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
    store: ScoreStore, planned: Any, scan: Any, model_id: str, scoring_id: str, cfg: ScoreConfig
) -> tuple[pa.Table, pa.Table]:
    """(to score, skipped) for this run, against the current image rows of ``scoring_id``."""
    earlier = store.scored(scoring_id, planned)
    earlier = earlier.filter(pc.is_in(earlier["image_uri"], scan.table["image_uri"]))
    not_scored = store.not_scored(planned)
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
    return todo, skipped


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
    cluster.connect()  # only now: a night with nothing to score never starts Ray
    ds = scored_dataset(keys, weights, meta, ScoringSettings.of(cfg))
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


def flagged_without_heatmap(store: ScoreStore, scoring_id: str, catalog: pa.Table) -> pa.Table:
    """The current image rows (of ``scoring_id``, of the images in ``catalog``, with a score) in studies whose
    current row is predicted abnormal and that have no overlay of this row yet: none, or one drawn from a
    file of another size or tag. Read from one snapshot."""
    table = store.table()
    shown = ["image_uri", "study_uri", "prob_abnormal", *HEATMAP_EXTRA]
    if table is None:
        return store.current("image", columns=shown)
    studies = store.current("study", scoring_id, table)
    flagged = studies.filter(pc.fill_null(studies["predicted_abnormal"], False))["study_uri"]
    images = store.current("image", scoring_id, table, columns=shown)
    images = images.filter(
        pc.and_(
            pc.and_(pc.is_in(images["study_uri"], flagged), pc.is_in(images["image_uri"], catalog["image_uri"])),
            pc.is_valid(images["prob_abnormal"]),
        )
    )
    drawn = store.current("heatmap", scoring_id, table)
    done = set(zip(*(drawn[c].to_pylist() for c in ("image_uri", *HEATMAP_EXTRA))))
    lacking = [k not in done for k in zip(*(images[c].to_pylist() for c in ("image_uri", *HEATMAP_EXTRA)))]
    return images.filter(pa.array(lacking, pa.bool_())).sort_by("image_uri")


def _heatmaps_of(
    store: ScoreStore,
    writer: RunWriter,
    catalog: pa.Table,
    weights: bytes,
    meta: dict[str, Any],
    cfg: ScoreConfig,
    names: pseudonyms.Pseudonyms | None,
) -> pa.Table | None:
    """Draw a Grad-CAM overlay of each image of a flagged study that has none of its current row
    (``flagged_without_heatmap``), write the PNGs under ``heatmaps/run_date=D/run_id=R/`` and return their
    rows, to be committed with the run's last chunk (None when there is nothing to draw). With ``names``,
    each PNG is named by its image's pseudonym and captioned with its start."""
    flagged = flagged_without_heatmap(store, writer.scoring_id, catalog)
    if flagged.num_rows == 0:
        return None
    fs, base = storage.filesystem(cfg.out)
    root = cfg.data if names is None else None  # pseudonyms are names already, under no root
    folder = storage.join(HEATMAPS, f"run_date={writer.run_date}", f"run_id={writer.run_id}")
    study_of = dict(zip(flagged["image_uri"].to_pylist(), flagged["study_uri"].to_pylist()))
    keys, by_path = _keys_to_read(catalog.filter(pc.is_in(catalog["image_uri"], flagged["image_uri"])), names)
    if names is not None:
        shown = dict(zip(flagged["image_uri"].to_pylist(), flagged["prob_abnormal"].to_pylist()))
        order = [by_path[p] for p in keys["image_uri"].to_pylist()]
        keys = keys.append_column("prob_abnormal", pa.array([shown[u] for u in order], pa.float32()))
        keys = keys.append_column("caption", pa.array([_caption(u) for u in order], pa.string()))
    else:
        keys = flagged
    parts = []
    cluster.connect()
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
                    storage.write_bytes(fs, storage.inside(base, folder, heatmap_name(str(uri), root)), png)
            parts.append(index_rows(batch, study_of, root, meta, HEATMAP_LAYER, prefix=folder))
            bar.update(len(batch["image_uri"]))
            faults.maybe_kill("heatmap")
    rows = pa.concat_tables(parts).sort_by("image_uri")
    fingerprint = flagged.select(["image_uri", *HEATMAP_EXTRA])
    rows = rows.join(fingerprint, "image_uri", join_type="left outer").sort_by("image_uri")
    made = rows["error"].null_count  # rows without an error
    log.info("drew %d heatmaps of %d flagged studies", made, len(set(flagged["study_uri"].to_pylist())))
    return rows


def _caption(image: str) -> str:
    """What an overlay of a pseudonymized image says it shows: the start of its study's and its own pseudonym."""
    study, _, own = image.partition("/")
    return f"{study[:13]}/{own[:13]}"
