"""A scoring run's Parquet: image rows streamed to staged files, study rows at the end.

The pipeline's results (``image_uri``, ``prob_abnormal``, ``error``) are
joined onto the run's catalog by key; study totals are partial
``Table.group_by`` aggregates per batch, combined when the run commits.
Files are staged under ``_staging/<run_id>/`` and made visible by the ledger.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mura_ray import faults
from mura_ray.archive import storage
from mura_ray.scoring.ledger import Ledger

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
STUDY_PARTS = [("image_uri", "count"), ("prob_abnormal", "sum"), ("prob_abnormal", "count")]


def study_parts(rows: pa.Table) -> pa.Table:
    """Partial study totals of some image rows: images, sum and count of the scores (errors have none)."""
    rows = rows.select(["study_uri", "image_uri"]).append_column(
        "prob_abnormal", pc.cast(rows["prob_abnormal"], pa.float64())
    )
    return rows.group_by("study_uri", use_threads=False).aggregate(STUDY_PARTS)


def at_or_above(prob: pa.ChunkedArray | pa.Array, threshold: float) -> pa.ChunkedArray:
    """``prob >= threshold`` in float64, as the threshold was chosen (null where there is no score)."""
    return pc.greater_equal(pc.cast(prob, pa.float64()), pa.scalar(threshold, pa.float64()))


@dataclass
class RunWriter:
    """Streams one run's image rows to staged Parquet and keeps the partial study totals."""

    ledger: Ledger
    catalog: pa.Table  # the images this run scores, with every catalog column
    run_id: str
    model_id: str
    threshold: float
    staged: list[str] = field(default_factory=list)  # relative to the output root
    parts: list[pa.Table] = field(default_factory=list)
    rows: int = 0
    errors: int = 0
    scored_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))
    _writer: pq.ParquetWriter | None = None
    _file_rows: int = 0

    def __post_init__(self) -> None:
        self._index = {uri: i for i, uri in enumerate(self.catalog["image_uri"].to_pylist())}

    @property
    def fs(self) -> Any:
        return self.ledger.fs

    def add(self, results: pa.Table) -> None:
        """Write the image rows of a batch of results (``image_uri``, ``prob_abnormal``, ``error``)."""
        n = results.num_rows
        known = self.catalog.take(pa.array([self._index[u] for u in results["image_uri"].to_pylist()], pa.int64()))
        prob = results["prob_abnormal"]
        table = pa.table(
            {
                **{k: known[k] for k in ("image_uri", "study_uri", "patient_id", "body_part", "label")},
                "prob_abnormal": prob,
                "predicted_abnormal": at_or_above(prob, self.threshold),
                "threshold": pa.array([self.threshold] * n, pa.float32()),
                "model_id": pa.array([self.model_id] * n, pa.string()),
                "run_id": pa.array([self.run_id] * n, pa.string()),
                "scored_at": pa.array([dt.datetime.now(dt.timezone.utc)] * n, pa.timestamp("us", tz="UTC")),
                # The listing's fingerprint, so that the next run can tell whether the file changed.
                "source_size": known["source_size"],
                "source_etag": known["source_etag"],
                "error": results["error"],
            },
            schema=IMAGES_SCHEMA,
        )
        if self._writer is None or self._file_rows >= ROWS_PER_FILE:
            self._close()
            self._open()
        self._writer.write_table(table)
        self._file_rows += n
        self.rows += n
        self.errors += prob.null_count
        self.parts.append(study_parts(table))
        faults.maybe_kill("score")

    def add_earlier(self, earlier: pa.Table) -> None:
        """Earlier runs' current rows of skipped images, counted into the studies this run touches."""
        touched = self.touched()
        self.parts.append(study_parts(earlier.filter(pc.is_in(earlier["study_uri"], touched))))

    def touched(self) -> pa.Array:
        if not self.parts:
            return pa.array([], pa.string())
        return pc.unique(pa.concat_tables(self.parts)["study_uri"])

    def studies_table(self) -> pa.Table:
        """One row per study this run touched, over all its images so far."""
        totals = (
            pa.concat_tables(self.parts)
            .group_by("study_uri", use_threads=False)
            .aggregate([("image_uri_count", "sum"), ("prob_abnormal_sum", "sum"), ("prob_abnormal_count", "sum")])
        )
        known = self.catalog.group_by("study_uri", use_threads=False).aggregate(
            [("patient_id", "first"), ("body_part", "first"), ("label", "first")]
        )
        totals = totals.join(known, "study_uri", join_type="inner").sort_by("study_uri")
        n_images = totals["image_uri_count_sum"]
        scored = totals["prob_abnormal_count_sum"]
        mean = pc.divide(
            totals["prob_abnormal_sum_sum"],
            pc.if_else(pc.equal(scored, 0), pa.scalar(None, pa.float64()), pc.cast(scored, pa.float64())),
        )
        prob = pc.cast(mean, pa.float32())
        n = totals.num_rows
        return pa.table(
            {
                "study_uri": totals["study_uri"],
                "patient_id": totals["patient_id_first"],
                "body_part": totals["body_part_first"],
                "n_images": pc.cast(n_images, pa.int32()),
                "n_errors": pc.cast(pc.subtract(n_images, scored), pa.int32()),
                "prob_abnormal": prob,
                "predicted_abnormal": at_or_above(mean, self.threshold),
                "label": totals["label_first"],
                "model_id": pa.array([self.model_id] * n, pa.string()),
                "run_id": pa.array([self.run_id] * n, pa.string()),
                "scored_at": pa.array([self.scored_at] * n, pa.timestamp("us", tz="UTC")),
            },
            schema=STUDIES_SCHEMA,
        )

    def commit(self, run_date: str, manifest: dict[str, Any]) -> dict[str, Any]:
        """Stage the studies file, then commit every staged file through the ledger."""
        self._close()
        moves = [
            (rel, storage.join("images", f"run_date={run_date}", f"{self.run_id}-{i:05d}.parquet"))
            for i, rel in enumerate(self.staged)
        ]
        studies = self.studies_table() if self.parts else None
        if studies is not None and studies.num_rows:
            rel = storage.join("_staging", self.run_id, "studies", "part-00000.parquet")
            self.fs.makedirs(self.ledger.path("_staging", self.run_id, "studies"), exist_ok=True)
            with self.fs.open(self.ledger.path(rel), "wb") as f:
                pq.write_table(studies, f)
            moves.append((rel, storage.join("studies", f"run_date={run_date}", f"{self.run_id}.parquet")))
        manifest = dict(
            manifest,
            run_id=self.run_id,
            model_id=self.model_id,
            run_date=run_date,
            threshold=self.threshold,
            images=self.rows,
            errors=self.errors,
            studies=studies.num_rows if studies is not None else 0,
        )
        return self.ledger.commit(manifest, moves)

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
