"""Study rows of a scoring run: per study, the mean of its current image scores.

A study row is written with each chunk that scores one of the study's
images; it covers the study's current rows at that commit: this run's rows
so far and, for its other images, the current rows of the snapshot the
chunk commits onto (other runs' rows, a rival's included). So the latest
row of a study is its current one, and after the run's last chunk it
covers every image of the study. This run's totals are kept per study as
rows arrive, so a commit costs the chunk's studies and one filtered pass
over the snapshot's rows of those studies, however many chunks came before.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from mura_ray.scoring.schemas import STUDIES_SCHEMA


def at_or_above(prob: pa.ChunkedArray | pa.Array, threshold: float) -> pa.ChunkedArray:
    """``prob >= threshold`` in float64, as the threshold was chosen (null where there is no score)."""
    return pc.greater_equal(pc.cast(prob, pa.float64()), pa.scalar(threshold, pa.float64()))


def _count(totals: list, prob: float | None) -> None:
    """Add one image row to a study's [images, sum of scores, scores]."""
    totals[0] += 1
    if prob is not None:
        totals[1] += prob
        totals[2] += 1


@dataclass
class StudyTotals:
    catalog: pa.Table  # the images this run scores, with every catalog column
    model_id: str
    run_id: str
    threshold: float
    scoring_id: str = ""
    _own: dict[str, list] = field(default_factory=dict)  # study -> [images, sum of scores, scores] of this run
    _own_uris: set[str] = field(default_factory=set)
    _touched: set[str] = field(default_factory=set)  # studies with a row in the chunk being written
    _known: pa.Table | None = None  # patient, body part and label per study of the catalog

    def add(self, table: pa.Table) -> None:
        """Count a batch of this run's image rows (``image_uri``, ``study_uri``, ``prob_abnormal``)."""
        columns = (table[c].to_pylist() for c in ("image_uri", "study_uri", "prob_abnormal"))
        for uri, study, prob in zip(*columns):
            self._own_uris.add(uri)
            self._touched.add(study)
            _count(self._own.setdefault(study, [0, 0.0, 0]), prob)

    def touched(self) -> list[str]:
        """The studies of the chunk being written."""
        return sorted(self._touched)

    def end_chunk(self) -> None:
        """The chunk is committed: the next one starts with no study touched."""
        self._touched = set()

    def _current(self, studies: list[str], snapshot: pa.Table) -> dict[str, list]:
        """[images, sum of scores, scores] of each study over its current rows: this run's, else those of
        ``snapshot`` (``image_uri``, ``study_uri``, ``prob_abnormal``)."""
        totals = {study: list(self._own[study]) for study in studies}
        snapshot = snapshot.filter(pc.is_in(snapshot["study_uri"], pa.array(studies, pa.string())))
        columns = (snapshot[c].to_pylist() for c in ("image_uri", "study_uri", "prob_abnormal"))
        for uri, study, prob in zip(*columns):
            if uri not in self._own_uris:
                _count(totals[study], prob)
        return totals

    def chunk_table(self, snapshot: pa.Table) -> pa.Table:
        """One row per study the current chunk touched, over its current rows (this run's, else those of
        ``snapshot``: the current image rows of the snapshot the chunk commits onto)."""
        touched = sorted(self._touched)
        totals = self._current(touched, snapshot)
        if self._known is None:
            self._known = self.catalog.group_by("study_uri", use_threads=False).aggregate(
                [("patient_id", "first"), ("body_part", "first"), ("label", "first")]
            )
        counted = pa.table(
            {
                "study_uri": pa.array(touched, pa.string()),
                "images": pa.array([totals[s][0] for s in touched], pa.int64()),
                "score_sum": pa.array([totals[s][1] for s in touched], pa.float64()),
                "scores": pa.array([totals[s][2] for s in touched], pa.int64()),
            }
        )
        totals = counted.join(self._known, "study_uri", join_type="inner").sort_by("study_uri")
        n_images, scored = totals["images"], totals["scores"]
        mean = pc.divide(
            totals["score_sum"],
            pc.if_else(pc.equal(scored, 0), pa.scalar(None, pa.float64()), pc.cast(scored, pa.float64())),
        )
        n = totals.num_rows
        return pa.table(
            {
                "study_uri": totals["study_uri"],
                "patient_id": totals["patient_id_first"],
                "body_part": totals["body_part_first"],
                "n_images": pc.cast(n_images, pa.int32()),
                "n_errors": pc.cast(pc.subtract(n_images, scored), pa.int32()),
                "prob_abnormal": pc.cast(mean, pa.float32()),
                "predicted_abnormal": at_or_above(mean, self.threshold),
                "label": totals["label_first"],
                "model_id": pa.array([self.model_id] * n, pa.string()),
                "scoring_id": pa.array([self.scoring_id or self.model_id] * n, pa.string()),
                "run_id": pa.array([self.run_id] * n, pa.string()),
                "scored_at": pa.array([dt.datetime.now(dt.timezone.utc)] * n, pa.timestamp("us", tz="UTC")),
            },
            schema=STUDIES_SCHEMA,
        )
