"""A scoring run's Parquet: image rows streamed to staged files, committed in chunks.

The pipeline's results (``image_uri``, ``prob_abnormal``, ``error``,
``modality``) are joined onto the run's catalog by key. Each chunk's files
are staged under ``_staging/<run_id>/<chunk>/`` and made visible by the
ledger; each chunk also writes a row for every study it touched, and the
DICOM files it found not to be radiographs (``not_scored/``).
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mura_ray import faults
from mura_ray.archive import storage
from mura_ray.scoring.distribution import ScoreDistribution
from mura_ray.scoring.lease import Lease
from mura_ray.scoring.ledger import NOT_SCORED_SCHEMA, Ledger
from mura_ray.scoring.studies import StudyTotals, at_or_above

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
        ("scoring_id", pa.string()),
        ("run_id", pa.string()),
        ("scored_at", pa.timestamp("us", tz="UTC")),
        ("source_size", pa.int64()),
        ("source_etag", pa.string()),
        ("error", pa.string()),
        ("backend", pa.string()),
        ("precision", pa.string()),
    ]
)
ROWS_PER_FILE = 500_000


@dataclass
class RunWriter:
    """Streams one run's image rows to staged Parquet and commits them chunk by chunk.

    A study row is written with each chunk that scores one of the study's
    images; it covers the study's current rows at that commit: this run's
    rows so far and, for its other images, the rows of earlier runs
    (``earlier``). So the latest row of a study is its current one, and
    after the run's last chunk it covers every image of the study."""

    ledger: Ledger
    lease: Lease
    catalog: pa.Table  # the images this run scores, with every catalog column
    earlier: pa.Table  # earlier runs' current rows of this scoring id for the archive's images
    run_id: str
    model_id: str
    threshold: float
    run_date: str
    scoring_id: str = ""  # ``checkpoint.scoring_id_of``; the model_id where nothing but the weights is set
    chunk: int = 0
    rows: int = 0
    errors: int = 0
    studies: int = 0
    not_radiographs: dict[str, int] = field(default_factory=dict)
    engines: dict[str, int] = field(default_factory=dict)  # images scored per "backend precision"
    _staged: list[str] = field(default_factory=list)  # this chunk's image files, relative to the output root
    _chunk_start: int = 0
    _chunk_errors: int = 0
    _others: list[pa.Table] = field(default_factory=list)
    _writer: pq.ParquetWriter | None = None
    _file_rows: int = 0
    distribution: ScoreDistribution = field(default_factory=ScoreDistribution)
    keep_scores: bool = False  # keep this run's scores in memory, for the heatmaps of flagged studies
    _scores: list[pa.Table] = field(default_factory=list)
    _extra: list[tuple[str, str]] = field(default_factory=list)  # (staged, final) of files staged by stage_file

    def __post_init__(self) -> None:
        self.scoring_id = self.scoring_id or self.model_id
        self._studies = StudyTotals(
            self.catalog, self.earlier, self.model_id, self.run_id, self.threshold, self.scoring_id
        )
        self._index = {uri: i for i, uri in enumerate(self.catalog["image_uri"].to_pylist())}

    @property
    def fs(self) -> Any:
        return self.ledger.fs

    @property
    def pending(self) -> int:
        """Image rows written since the last commit."""
        return self.rows - self._chunk_start

    def add(self, results: pa.Table) -> None:
        """Write a batch of results (``image_uri``, ``prob_abnormal``, ``error``, ``modality``)."""
        if self.lease.lost is not None:
            self.lease.check()
        skipped = pc.fill_null(pc.not_equal(results["modality"], ""), False)
        if pc.any(skipped).as_py():
            self._add_not_scored(results.filter(skipped))
            results = results.filter(pc.invert(skipped))
        n = results.num_rows
        if n == 0:
            return
        known = self._catalog_rows(results)
        prob = results["prob_abnormal"]
        table = pa.table(
            {
                **{k: known[k] for k in ("image_uri", "study_uri", "patient_id", "body_part", "label")},
                "prob_abnormal": prob,
                "predicted_abnormal": at_or_above(prob, self.threshold),
                "threshold": pa.array([self.threshold] * n, pa.float32()),
                "model_id": pa.array([self.model_id] * n, pa.string()),
                "scoring_id": pa.array([self.scoring_id] * n, pa.string()),
                "run_id": pa.array([self.run_id] * n, pa.string()),
                "scored_at": pa.array([dt.datetime.now(dt.timezone.utc)] * n, pa.timestamp("us", tz="UTC")),
                # The listing's fingerprint, so that the next run can tell whether the file changed.
                "source_size": known["source_size"],
                "source_etag": known["source_etag"],
                "error": results["error"],
                "backend": results["backend"],
                "precision": results["precision"],
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
        self._chunk_errors += prob.null_count
        self._studies.add(table)
        self.distribution.add(table)
        if self.keep_scores:
            self._scores.append(table.select(["image_uri", "study_uri", "prob_abnormal"]))
        self._count_engines(table)
        faults.maybe_kill("score")

    def flagged_images(self) -> pa.Table:
        """This run's scored images (``image_uri``, ``study_uri``, ``prob_abnormal``) in studies whose current
        row is predicted abnormal (needs ``keep_scores``)."""
        if not self._scores:
            return pa.table({"image_uri": pa.array([], pa.string())})
        rows = pa.concat_tables(self._scores)
        flagged = pa.array(self._studies.flagged(), pa.string())
        return rows.filter(pc.and_(pc.is_in(rows["study_uri"], flagged), pc.is_valid(rows["prob_abnormal"])))

    def stage_file(self, final: str, data: bytes) -> None:
        """Stage ``data`` to appear at ``final`` (relative to the output root) when the next chunk commits."""
        rel = storage.join(self._staged_root(), "files", final)
        storage.write_bytes(self.fs, self.ledger.path(rel), data)
        self._sync(rel)
        self._extra.append((rel, final))

    def _count_engines(self, table: pa.Table) -> None:
        names = pc.binary_join_element_wise(table["backend"], table["precision"], " ")
        for row in pc.value_counts(names.filter(pc.is_valid(names))):
            name = row["values"].as_py()
            self.engines[name] = self.engines.get(name, 0) + row["counts"].as_py()

    def _catalog_rows(self, results: pa.Table) -> pa.Table:
        """The catalog rows of a batch of results, in the batch's order."""
        return self.catalog.take(pa.array([self._index[u] for u in results["image_uri"].to_pylist()], pa.int64()))

    def _add_not_scored(self, results: pa.Table) -> None:
        known = self._catalog_rows(results)
        n = results.num_rows
        self._others.append(
            pa.table(
                {
                    "image_uri": known["image_uri"],
                    "source_size": known["source_size"],
                    "source_etag": known["source_etag"],
                    "modality": results["modality"],
                    "run_id": pa.array([self.run_id] * n, pa.string()),
                    "scored_at": pa.array([dt.datetime.now(dt.timezone.utc)] * n, pa.timestamp("us", tz="UTC")),
                },
                schema=NOT_SCORED_SCHEMA,
            )
        )
        for modality in results["modality"].to_pylist():
            self.not_radiographs[modality] = self.not_radiographs.get(modality, 0) + 1

    def _stage_table(self, folder: str, table: pa.Table) -> str:
        rel = storage.join(self._staged_root(), folder, "part-00000.parquet")
        self.fs.makedirs(self.ledger.path(self._staged_root(), folder), exist_ok=True)
        with self.fs.open(self.ledger.path(rel), "wb") as f:
            pq.write_table(table, f)
        self._sync(rel)
        return rel

    def commit(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Commit what was written since the last commit as the next chunk; return its manifest."""
        self._close()
        stem = f"{self.run_id}-{self.chunk:05d}"
        partition = f"run_date={self.run_date}"
        moves = [
            (rel, storage.join("images", partition, f"{stem}-{i:02d}.parquet")) for i, rel in enumerate(self._staged)
        ]
        chunk_studies = 0
        if self.pending:
            studies = self._studies.chunk_table()
            chunk_studies = studies.num_rows
            moves.append((self._stage_table("studies", studies), storage.join("studies", partition, f"{stem}.parquet")))
        if self._others:
            rel = self._stage_table("not_scored", pa.concat_tables(self._others))
            moves.append((rel, storage.join("not_scored", partition, f"{stem}.parquet")))
        moves += self._extra
        self.studies += chunk_studies
        if "run" in manifest:  # the run's totals, in its last chunk's manifest
            manifest = dict(manifest, run=dict(manifest["run"], studies=self.studies))
        manifest = dict(
            manifest,
            run_id=self.run_id,
            chunk=self.chunk,
            model_id=self.model_id,
            scoring_id=self.scoring_id,
            run_date=self.run_date,
            threshold=self.threshold,
            images=self.pending,
            errors=self._chunk_errors,
            studies=chunk_studies,
            not_radiographs=sum(len(t) for t in self._others),
        )
        committed = self.ledger.commit(manifest, moves, self.lease)
        self.chunk += 1
        self._staged, self._others, self._extra = [], [], []
        self._chunk_start, self._chunk_errors = self.rows, 0
        return committed

    def _staged_root(self) -> str:  # this chunk's staging folder, relative to the output root
        return storage.join("_staging", self.run_id, f"{self.chunk:05d}")

    def _sync(self, rel: str) -> None:
        """Staged files reach the disk before any manifest can name them committed."""
        if storage.is_local(self.fs):
            with open(self.ledger.path(rel), "rb+") as f:
                os.fsync(f.fileno())

    def _open(self) -> None:
        rel = storage.join(self._staged_root(), "images", f"part-{len(self._staged):05d}.parquet")
        self.fs.makedirs(self.ledger.path(self._staged_root(), "images"), exist_ok=True)
        self._sink = self.fs.open(self.ledger.path(rel), "wb")
        self._writer = pq.ParquetWriter(self._sink, IMAGES_SCHEMA)
        self._staged.append(rel)
        self._file_rows = 0

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._sync(self._staged[-1])
            self._writer = None
