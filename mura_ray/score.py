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
row of a study is its current one. ``mura_ray.ledger`` commits the run's
files into ``images/`` and ``studies/`` (partitioned by ``run_date``) only
once all of them are written.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import torch

from mura_ray import cluster, faults, storage
from mura_ray.catalog import scan_archive
from mura_ray.checkpoint import load_checkpoint
from mura_ray.config import ScoreConfig
from mura_ray.data import catalog_dataset
from mura_ray.decode import READ_ERROR, read_and_decode
from mura_ray.engine import score_step
from mura_ray.ledger import Lease, Ledger
from mura_ray.model import build_model, for_inference
from mura_ray.progress import Progress
from mura_ray.transforms import EvalPreset

log = logging.getLogger(__name__)

IMAGES_SCHEMA = pa.schema(
    [
        ("image_uri", pa.string()),
        ("study_uri", pa.string()),
        ("patient_id", pa.string()),
        ("body_part", pa.string()),
        ("label", pa.int8()),
        ("prob_abnormal", pa.float32()),
        ("predicted_abnormal", pa.bool_()),
        ("threshold", pa.float32()),
        ("model_id", pa.string()),
        ("run_id", pa.string()),
        ("scored_at", pa.timestamp("us", tz="UTC")),
        ("source_size", pa.int64()),
        ("source_etag", pa.string()),
        ("error", pa.string()),
    ]
)
STUDIES_SCHEMA = pa.schema(
    [
        ("study_uri", pa.string()),
        ("patient_id", pa.string()),
        ("body_part", pa.string()),
        ("n_images", pa.int32()),
        ("n_errors", pa.int32()),
        ("prob_abnormal", pa.float32()),
        ("predicted_abnormal", pa.bool_()),
        ("label", pa.int8()),
        ("model_id", pa.string()),
        ("run_id", pa.string()),
        ("scored_at", pa.timestamp("us", tz="UTC")),
    ]
)
ROWS_PER_FILE = 500_000


class Scorer:
    """Model-holding actor: loads the weights once, scores batches of cached squares."""

    def __init__(self, model_dir: str, image_size: int, threads: int, use_gpu: bool) -> None:
        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        state, _ = load_checkpoint(model_dir)
        model = build_model()
        model.load_state_dict(state)
        self.model = for_inference(model, self.device)
        self.crop = EvalPreset(size=image_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["error"] == ""
        probs = np.full(len(ok), np.nan, dtype=np.float32)
        if ok.any():
            pixels = self.crop({"pixels": batch["pixels"][ok]})["pixels"]
            probs[ok] = score_step(self.model, torch.from_numpy(pixels).to(self.device)).cpu().numpy()
        out = {k: v for k, v in batch.items() if k != "pixels"}
        out["prob_abnormal"] = probs
        return out


@dataclass
class StudyTotals:
    patient_id: str | None
    body_part: str | None
    label: int | None
    n_images: int = 0
    n_errors: int = 0
    prob_sum: float = 0.0

    def add(self, prob: float | None) -> None:
        self.n_images += 1
        if prob is None:
            self.n_errors += 1
        else:
            self.prob_sum += prob


@dataclass
class RunWriter:
    """Streams image rows to staged Parquet files and keeps per-study totals."""

    ledger: Ledger
    run_id: str
    model_id: str
    threshold: float
    staged: list[str] = field(default_factory=list)  # relative to the output root
    studies: dict[str, StudyTotals] = field(default_factory=dict)
    rows: int = 0
    errors: int = 0
    scored_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))
    _writer: pq.ParquetWriter | None = None
    _file_rows: int = 0

    @property
    def fs(self):
        return self.ledger.fs

    def _open(self) -> None:
        rel = storage.join("_staging", self.run_id, "images", f"part-{len(self.staged):05d}.parquet")
        self.fs.makedirs(self.ledger.path("_staging", self.run_id, "images"), exist_ok=True)
        self._sink = self.fs.open(self.ledger.path(rel), "wb")
        self._writer = pq.ParquetWriter(self._sink, IMAGES_SCHEMA)
        self.staged.append(rel)
        self._file_rows = 0

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._writer = None

    def add(self, batch: dict[str, np.ndarray]) -> None:
        n = len(batch["image_uri"])
        probs = batch["prob_abnormal"].astype(np.float32)
        valid = ~np.isnan(probs)
        now = dt.datetime.now(dt.timezone.utc)
        table = pa.table(
            {
                "image_uri": pa.array(nullable_strings(batch["image_uri"]), pa.string()),
                "study_uri": pa.array(nullable_strings(batch["study_uri"]), pa.string()),
                "patient_id": pa.array(nullable_strings(batch["patient_id"]), pa.string()),
                "body_part": pa.array(nullable_strings(batch["body_part"]), pa.string()),
                "label": pa.array(nullable_ints(batch["label"]), pa.int8()),
                "prob_abnormal": pa.array(probs, pa.float32(), mask=~valid),
                "predicted_abnormal": pa.array(probs >= self.threshold, pa.bool_(), mask=~valid),
                "threshold": pa.array(np.full(n, self.threshold, np.float32)),
                "model_id": pa.array([self.model_id] * n, pa.string()),
                "run_id": pa.array([self.run_id] * n, pa.string()),
                "scored_at": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
                # The listing's fingerprint, so that the next run can tell whether the file changed.
                "source_size": pa.array(nullable_ints(batch["source_size"]), pa.int64()),
                "source_etag": pa.array(nullable_strings(batch["source_etag"]), pa.string()),
                "error": pa.array([e or None for e in batch["error"].tolist()], pa.string()),
            },
            schema=IMAGES_SCHEMA,
        )
        if self._writer is None or self._file_rows >= ROWS_PER_FILE:
            self._close()
            self._open()
        self._writer.write_table(table)
        self._file_rows += n
        self.rows += n
        self.errors += int((~valid).sum())
        for row in table.select(["study_uri", "patient_id", "body_part", "label", "prob_abnormal"]).to_pylist():
            self._study(row).add(row["prob_abnormal"])
        faults.maybe_kill("score")

    def _study(self, row: dict[str, Any]) -> StudyTotals:
        st = self.studies.get(row["study_uri"])
        if st is None:
            st = self.studies[row["study_uri"]] = StudyTotals(row["patient_id"], row["body_part"], row["label"])
        return st

    def add_earlier(self, rows: list[dict[str, Any]]) -> None:
        """Earlier runs' current rows of skipped images, counted into the studies this run touches."""
        for row in rows:
            if row["study_uri"] in self.studies:
                self.studies[row["study_uri"]].add(row["prob_abnormal"])

    def studies_table(self) -> pa.Table:
        rows = []
        for uri in sorted(self.studies):
            st = self.studies[uri]
            scored = st.n_images - st.n_errors
            prob = st.prob_sum / scored if scored else None
            rows.append(
                {
                    "study_uri": uri,
                    "patient_id": st.patient_id,
                    "body_part": st.body_part,
                    "n_images": st.n_images,
                    "n_errors": st.n_errors,
                    "prob_abnormal": prob,
                    "predicted_abnormal": None if prob is None else prob >= self.threshold,
                    "label": st.label,
                    "model_id": self.model_id,
                    "run_id": self.run_id,
                    "scored_at": self.scored_at,
                }
            )
        return pa.Table.from_pylist(rows, schema=STUDIES_SCHEMA)

    def commit(self, run_date: str, manifest: dict[str, Any]) -> dict[str, Any]:
        """Stage the studies file, then commit every staged file through the ledger."""
        self._close()
        moves = [
            (rel, storage.join("images", f"run_date={run_date}", f"{self.run_id}-{i:05d}.parquet"))
            for i, rel in enumerate(self.staged)
        ]
        if self.studies:
            rel = storage.join("_staging", self.run_id, "studies", "part-00000.parquet")
            self.fs.makedirs(self.ledger.path("_staging", self.run_id, "studies"), exist_ok=True)
            with self.fs.open(self.ledger.path(rel), "wb") as f:
                pq.write_table(self.studies_table(), f)
            moves.append((rel, storage.join("studies", f"run_date={run_date}", f"{self.run_id}.parquet")))
        manifest = dict(
            manifest,
            run_id=self.run_id,
            model_id=self.model_id,
            run_date=run_date,
            threshold=self.threshold,
            images=self.rows,
            errors=self.errors,
            studies=len(self.studies),
        )
        return self.ledger.commit(manifest, moves)


def _is_missing(v: Any) -> bool:
    # Ray Data turns an all-null column into NaN floats on the way to numpy.
    return v is None or (isinstance(v, float) and np.isnan(v))


def nullable_strings(values: np.ndarray) -> list[str | None]:
    return [None if _is_missing(v) else str(v) for v in values.tolist()]


def nullable_ints(values: np.ndarray) -> list[int | None]:
    return [None if _is_missing(v) else int(v) for v in values.tolist()]


def resolve_model_dir(model: str) -> str:
    """Accept a checkpoint directory or a training run directory holding ``model/``."""
    fs, path = storage.filesystem(model)
    if fs.exists(storage.join(path, "model", "metadata.json")):
        return storage.join(model, "model")
    return model


def _actor_plan(cfg: ScoreConfig) -> tuple[int, float, int, bool]:
    """(actors, CPUs per actor, torch threads per actor, use GPU)."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else gpus > 0
    if use_gpu:
        cpus = cfg.cpus_per_actor or 1.0
        return cfg.actors or max(1, gpus), cpus, max(1, math.ceil(cpus)), True
    total = resources.get("CPU", 1)
    largest_node = cluster.largest_node_cpus(default=total)
    # Decoding costs about a tenth of the forward pass on a CPU: keep that share
    # (at least half a CPU) for the read/decode tasks, give the rest to model actors.
    for_model = total - max(0.5, 0.1 * total)
    per_actor = cfg.cpus_per_actor or min(4.0, for_model, largest_node)
    actors = cfg.actors or max(1, int(for_model // per_actor))
    return actors, per_actor, max(1, math.ceil(per_actor)), False


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
        pc.and_(pc.is_null(joined["source_etag"]), pc.and_(pc.is_null(joined["prior_etag"]), pc.is_valid(joined["prior_size"]))),
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
    scan = scan_archive(cfg.data, split=cfg.split)
    catalog = scan.table
    threshold = float(meta.get("threshold", 0.5))
    run_id = cfg.run_id or started_at.strftime("%Y%m%dT%H%M%SZ-") + secrets.token_hex(3)
    run_date = started_at.strftime("%Y-%m-%d")
    ledger = Ledger(cfg.out)
    lease = Lease(ledger.fs, ledger.base, run_id)
    lease.acquire()
    try:
        recovered = ledger.recover(active_run_id=run_id)
        earlier = ledger.scored(meta["model_id"])
        todo, skipped = plan_run(catalog, earlier, full=cfg.full)
        log.info(
            "%d images under %s (%d other files ignored): %d to score, %d already scored by model %s",
            catalog.num_rows, cfg.data, len(scan.ignored), todo.num_rows, skipped.num_rows, meta["model_id"][:12],
        )
        writer = RunWriter(ledger, run_id, meta["model_id"], threshold)
        if todo.num_rows:
            _score_into(writer, todo, state, meta, model_dir, cfg, lease, t0)
        touched = set(writer.studies)
        if touched and skipped.num_rows:
            kept = earlier.filter(pc.is_in(earlier["image_uri"], skipped["image_uri"]))
            kept = kept.filter(pc.is_in(kept["study_uri"], pa.array(sorted(touched), pa.string())))
            writer.add_earlier(kept.select(["study_uri", "prob_abnormal"]).to_pylist())
        seconds = time.monotonic() - t0
        manifest = writer.commit(
            run_date,
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
    log.info("committed run %s: %d image rows, %d study rows under %s", run_id, manifest["images"], manifest["studies"], cfg.out)
    manifest["output"] = cfg.out
    manifest["ignored_examples"] = scan.ignored[:5]
    return manifest


def scored_dataset(table: pa.Table, model_dir: str, meta: dict[str, Any], cfg: ScoreConfig) -> ray.data.Dataset:
    """Catalog rows -> rows with ``prob_abnormal`` (NaN where ``error`` is set): decode tasks, then model actors."""
    cluster.connect()
    actors, cpus, threads, use_gpu = _actor_plan(cfg)
    fs, _ = storage.filesystem(cfg.data)
    ds = catalog_dataset(table).map_batches(
        read_and_decode, fn_kwargs={"side": int(meta["cache_side"]), "fs": fs}, batch_size=16, num_cpus=0.5
    )
    return ds.map_batches(
        Scorer,
        fn_constructor_kwargs={
            "model_dir": model_dir,
            "image_size": int(meta["image_size"]),
            "threads": threads,
            "use_gpu": use_gpu,
        },
        batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus,
        num_gpus=1 if use_gpu else 0,
    )


def _score_into(writer: RunWriter, todo: pa.Table, state, meta: dict[str, Any], model_dir: str, cfg: ScoreConfig, lease: Lease, t0: float) -> None:
    """Run the Ray pipeline over ``todo`` and stream every row into ``writer``."""
    build_model().load_state_dict(state)  # fail here, not in every actor, if the weights do not fit
    ds = scored_dataset(todo, model_dir, meta, cfg)
    with Progress("scoring", todo.num_rows) as bar:
        for batch in ds.iter_batches(batch_size=256, batch_format="numpy"):
            writer.add(batch)
            lease.refresh()
            bar.set(writer.rows, postfix=f"{writer.errors} errors" if writer.errors else "")
    log.info("scored %d images in %.1fs (%.1f images/s), %d errors", writer.rows, bar.seconds, bar.rate, writer.errors)
    if writer.rows != todo.num_rows:
        raise RuntimeError(f"scored {writer.rows} rows for {todo.num_rows} images; nothing committed")
