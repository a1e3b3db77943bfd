"""Batch scoring of whole archives to Parquet.

Ray Data reads and decodes the files in tasks, a pool of model-holding
actors (``Scorer``) scores them, and the driver streams the small result
rows into Parquet: ``OUTPUT/images/`` (one row per input file, errors
included) and ``OUTPUT/studies/`` (one row per study). A run's files are
written under ``OUTPUT/_staging/<run_id>/`` and moved into place, partitioned
by ``run_date=YYYY-MM-DD``, only once the run has completed; a manifest
``OUTPUT/_runs/<run_id>.json`` records it.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from mura_ray import cluster, storage
from mura_ray.catalog import build_catalog
from mura_ray.checkpoint import load_checkpoint
from mura_ray.config import ScoreConfig
from mura_ray.data import catalog_dataset
from mura_ray.decode import read_and_decode
from mura_ray.engine import score_step
from mura_ray.model import build_model
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
        self.model = model.to(self.device, memory_format=torch.channels_last).eval()
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


@dataclass
class RunWriter:
    """Streams image rows to staged Parquet files and keeps per-study totals."""

    output: str
    run_id: str
    model_id: str
    threshold: float
    fs: Any = None
    base: str = ""
    staged: list[str] = field(default_factory=list)
    studies: dict[str, StudyTotals] = field(default_factory=dict)
    rows: int = 0
    errors: int = 0
    _writer: pq.ParquetWriter | None = None
    _file_rows: int = 0

    def __post_init__(self) -> None:
        self.fs, self.base = storage.filesystem(self.output)
        self.staging = storage.join(self.base, "_staging", self.run_id)

    def _open(self) -> None:
        path = storage.join(self.staging, "images", f"part-{len(self.staged):05d}.parquet")
        self.fs.makedirs(storage.join(self.staging, "images"), exist_ok=True)
        self._sink = self.fs.open(path, "wb")
        self._writer = pq.ParquetWriter(self._sink, IMAGES_SCHEMA)
        self.staged.append(path)
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
        sizes = np.where(batch["read_size"] >= 0, batch["read_size"], batch["source_size"].astype(np.float64))
        table = pa.table(
            {
                "image_uri": pa.array(_nullable_strings(batch["image_uri"]), pa.string()),
                "study_uri": pa.array(_nullable_strings(batch["study_uri"]), pa.string()),
                "patient_id": pa.array(_nullable_strings(batch["patient_id"]), pa.string()),
                "body_part": pa.array(_nullable_strings(batch["body_part"]), pa.string()),
                "label": pa.array(_nullable_ints(batch["label"]), pa.int8()),
                "prob_abnormal": pa.array(probs, pa.float32(), mask=~valid),
                "predicted_abnormal": pa.array(probs >= self.threshold, pa.bool_(), mask=~valid),
                "threshold": pa.array(np.full(n, self.threshold, np.float32)),
                "model_id": pa.array([self.model_id] * n, pa.string()),
                "run_id": pa.array([self.run_id] * n, pa.string()),
                "scored_at": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
                "source_size": pa.array(_nullable_ints(sizes), pa.int64()),
                "source_etag": pa.array(_nullable_strings(batch["source_etag"]), pa.string()),
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
            st = self.studies.get(row["study_uri"])
            if st is None:
                st = self.studies[row["study_uri"]] = StudyTotals(row["patient_id"], row["body_part"], row["label"])
            st.n_images += 1
            if row["prob_abnormal"] is None:
                st.n_errors += 1
            else:
                st.prob_sum += row["prob_abnormal"]

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
                }
            )
        return pa.Table.from_pylist(rows, schema=STUDIES_SCHEMA)

    def commit(self, run_date: str, extra: dict[str, Any]) -> dict[str, Any]:
        """Write the studies file, move the staged files into place, record the manifest."""
        self._close()
        studies_staged = storage.join(self.staging, "studies", "part-00000.parquet")
        self.fs.makedirs(storage.join(self.staging, "studies"), exist_ok=True)
        with self.fs.open(studies_staged, "wb") as f:
            pq.write_table(self.studies_table(), f)
        moves = [
            (p, storage.join(self.base, "images", f"run_date={run_date}", f"{self.run_id}-{i:05d}.parquet"))
            for i, p in enumerate(self.staged)
        ]
        moves.append((studies_staged, storage.join(self.base, "studies", f"run_date={run_date}", f"{self.run_id}.parquet")))
        for src, dst in moves:
            self.fs.makedirs(dst.rsplit("/", 1)[0], exist_ok=True)
            self.fs.mv(src, dst)
        manifest = dict(
            extra,
            run_id=self.run_id,
            model_id=self.model_id,
            run_date=run_date,
            threshold=self.threshold,
            images=self.rows,
            errors=self.errors,
            studies=len(self.studies),
            files=[storage.to_uri(self.fs, d) for _, d in moves],
        )
        storage.write_bytes(self.fs, storage.join(self.base, "_runs", f"{self.run_id}.json"), json.dumps(manifest, indent=2).encode())
        if self.fs.exists(self.staging):
            self.fs.rm(self.staging, recursive=True)
        staging_root = storage.join(self.base, "_staging")
        if self.fs.exists(staging_root) and not self.fs.ls(staging_root):
            self.fs.rmdir(staging_root)
        return manifest


def _is_missing(v: Any) -> bool:
    # Ray Data turns an all-null column into NaN floats on the way to numpy.
    return v is None or (isinstance(v, float) and np.isnan(v))


def _nullable_strings(values: np.ndarray) -> list[str | None]:
    return [None if _is_missing(v) else str(v) for v in values.tolist()]


def _nullable_ints(values: np.ndarray) -> list[int | None]:
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
    # Decoding costs about a tenth of the forward pass on a CPU: keep that share
    # (at least half a CPU) for the read/decode tasks, give the rest to model actors.
    for_model = total - max(0.5, 0.1 * total)
    per_actor = cfg.cpus_per_actor or min(4.0, for_model)
    actors = cfg.actors or max(1, int(for_model // per_actor))
    return actors, per_actor, max(1, math.ceil(per_actor)), False


def run_scoring(cfg: ScoreConfig) -> dict[str, Any]:
    """Score every image under ``cfg.input`` and commit the run's Parquet under ``cfg.output``."""
    t0 = time.monotonic()
    model_dir = resolve_model_dir(cfg.model)
    state, meta = load_checkpoint(model_dir)
    catalog = build_catalog(cfg.input, split=cfg.split)
    threshold = float(meta.get("threshold", 0.5))
    run_id = cfg.run_id or dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + secrets.token_hex(3)
    run_date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    writer = RunWriter(cfg.output, run_id, meta["model_id"], threshold)
    log.info("scoring %d images from %s with model %s (threshold %.3f)", catalog.num_rows, cfg.input, meta["model_id"][:12], threshold)

    cluster.connect()
    actors, cpus, threads, use_gpu = _actor_plan(cfg)
    fs, _ = storage.filesystem(cfg.input)
    build_model().load_state_dict(state)  # fail here, not in every actor, if the weights do not fit
    ds = catalog_dataset(catalog).map_batches(
        read_and_decode, fn_kwargs={"side": int(meta["cache_side"]), "fs": fs}, batch_size=16, num_cpus=0.5
    )
    ds = ds.map_batches(
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
    last_log = time.monotonic()
    for batch in ds.iter_batches(batch_size=256, batch_format="numpy"):
        writer.add(batch)
        if time.monotonic() - last_log > 10:
            rate = writer.rows / (time.monotonic() - t0)
            log.info("scored %d/%d images (%.0f/s), %d errors", writer.rows, catalog.num_rows, rate, writer.errors)
            last_log = time.monotonic()
    if writer.rows != catalog.num_rows:
        raise RuntimeError(f"scored {writer.rows} rows for {catalog.num_rows} catalog images; nothing committed")
    seconds = time.monotonic() - t0
    manifest = writer.commit(run_date, {"input": cfg.input, "split": cfg.split, "seconds": round(seconds, 3)})
    manifest["images_per_second"] = writer.rows / seconds if seconds else 0.0
    manifest["output"] = cfg.output
    return manifest
