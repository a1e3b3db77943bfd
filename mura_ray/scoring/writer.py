"""A scoring run's rows, committed to the scores table chunk by chunk.

The pipeline's results (``image_uri``, ``prob_abnormal``, ``error``,
``modality``) are joined onto the run's catalog by key and kept in memory
until the chunk commits (a chunk of 10,000 images is about 2 MB of Arrow).
Each chunk's commit (``ScoreStore.commit_chunk``) holds its image rows, a
row for every study it touched, the DICOM files it found not to be
radiographs, and the run's own row with its totals so far.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from mura_ray import faults
from mura_ray.scoring.delta import Commit, ScoreStore
from mura_ray.scoring.distribution import ScoreDistribution
from mura_ray.scoring.schemas import IMAGES_SCHEMA, NOT_SCORED_SCHEMA, RUNS_SCHEMA
from mura_ray.scoring.studies import StudyTotals, at_or_above

__all__ = ["IMAGES_SCHEMA", "RunWriter"]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass
class RunWriter:
    """Collects one run's image rows and commits them chunk by chunk.

    A study row is written with each chunk that scores one of the study's
    images; it covers the study's current image rows in the snapshot the
    chunk commits onto (this run's rows so far and, for its other images,
    whatever run scored them last with this scoring id). So after the run's
    last chunk a study's row covers every image of the study."""

    store: ScoreStore
    catalog: pa.Table  # the images this run scores, with every catalog column
    run_id: str
    model_id: str
    threshold: float
    run_date: str
    scoring_id: str = ""  # ``checkpoint.scoring_id_of``; the model_id where nothing but the weights is set
    chunk: int = 0  # the number of the next chunk to commit (above the last one of a resumed run)
    rows: int = 0
    errors: int = 0
    studies: int = 0
    commit_seconds: float = 0.0  # spent in the chunks' commits so far
    not_radiographs: dict[str, int] = field(default_factory=dict)
    engines: dict[str, int] = field(default_factory=dict)  # images scored per "backend precision"
    distribution: ScoreDistribution = field(default_factory=ScoreDistribution)
    _images: list[pa.Table] = field(default_factory=list)  # this chunk's image rows
    _others: list[pa.Table] = field(default_factory=list)  # this chunk's files of other modalities
    _chunk_start: int = 0
    _chunk_errors: int = 0
    _studies_touched: set[str] = field(default_factory=set)  # every study this run wrote a row for

    def __post_init__(self) -> None:
        self.scoring_id = self.scoring_id or self.model_id
        self._studies = StudyTotals(self.catalog, self.model_id, self.run_id, self.threshold, self.scoring_id)
        self._index = {uri: i for i, uri in enumerate(self.catalog["image_uri"].to_pylist())}

    @property
    def pending(self) -> int:
        """Image rows added since the last commit."""
        return self.rows - self._chunk_start

    def has_rows(self) -> bool:
        """Whether anything was added since the last commit (image rows or files of other modalities)."""
        return bool(self._images or self._others)

    def add(self, results: pa.Table) -> None:
        """Add a batch of results (``image_uri``, ``prob_abnormal``, ``error``, ``modality``)."""
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
                "scored_at": pa.array([_now()] * n, pa.timestamp("us", tz="UTC")),
                # The listing's fingerprint, so that the next run can tell whether the file changed.
                "source_size": known["source_size"],
                "source_etag": known["source_etag"],
                "error": results["error"],
                "backend": results["backend"],
                "precision": results["precision"],
            },
            schema=IMAGES_SCHEMA,
        )
        self._images.append(table)
        self.rows += n
        self.errors += prob.null_count
        self._chunk_errors += prob.null_count
        self._studies.add(table)
        self.distribution.add(table)
        self._count_engines(table)
        faults.maybe_kill("score")

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
                    "scored_at": pa.array([_now()] * n, pa.timestamp("us", tz="UTC")),
                },
                schema=NOT_SCORED_SCHEMA,
            )
        )
        for modality in results["modality"].to_pylist():
            self.not_radiographs[modality] = self.not_radiographs.get(modality, 0) + 1

    def _study_rows(self, table: Any) -> dict[str, pa.Table]:
        """The chunk's study rows over the current image rows of ``table``'s snapshot."""
        touched = self._studies.touched()
        if not touched:
            return {}
        current = self.store.current(
            "image", self.scoring_id, table, columns=["image_uri", "study_uri", "prob_abnormal"]
        )
        current = current.filter(pc.is_in(current["study_uri"], pa.array(touched, pa.string())))
        return {"study": self._studies.chunk_table(current)}

    def commit(self, manifest: dict[str, Any], heatmaps: pa.Table | None = None) -> dict[str, Any]:
        """Commit what was added since the last commit as the next chunk, with the run's row (``manifest``:
        what the run read and, in its last chunk, ``run``: its totals); returns the manifest as committed."""
        images = pa.concat_tables(self._images) if self._images else None
        others = pa.concat_tables(self._others) if self._others else None
        touched = self._studies.touched()
        chunk_studies = len(touched)
        if "run" in manifest:  # the run's totals, in its last chunk: the studies it updated
            manifest = dict(manifest, run=dict(manifest["run"], studies=len(self._studies_touched | set(touched))))
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
            not_radiographs=others.num_rows if others is not None else 0,
            heatmaps=heatmaps.num_rows if heatmaps is not None else 0,
        )
        run = pa.table(
            {
                "run_id": [self.run_id],
                "model_id": [self.model_id],
                "scoring_id": [self.scoring_id],
                "scored_at": pa.array([_now()], pa.timestamp("us", tz="UTC")),
                "chunks": pa.array([self.chunk + 1], pa.int32()),
                "final": [bool(manifest.get("final"))],
                "totals": [json.dumps(manifest, default=str)],
            },
            schema=RUNS_SCHEMA,
        )
        t0 = time.monotonic()
        done: Commit = self.store.commit_chunk(
            run_id=self.run_id,
            scoring_id=self.scoring_id,
            chunk=self.chunk,
            images=images,
            heatmaps=heatmaps,
            not_scored=others,
            run=run,
            prepare=self._study_rows,
        )
        self.commit_seconds += time.monotonic() - t0
        faults.maybe_kill("chunk-committed")
        self._studies.end_chunk()
        self._studies_touched |= set(touched)
        self.studies = len(self._studies_touched)
        self.chunk += 1
        self._images, self._others = [], []
        self._chunk_start, self._chunk_errors = self.rows, 0
        return dict(manifest, version=done.version, status="committed")
