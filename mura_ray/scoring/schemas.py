"""The columns of the scores table's row kinds that have no module of their own. No Ray, no torch."""

from __future__ import annotations

import pyarrow as pa

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
# What a run reads of the image rows to decide what to skip (``run.plan_run``).
PRIOR_COLUMNS = ["image_uri", "study_uri", "prob_abnormal", "error", "source_size", "source_etag", "scored_at"]
# The DICOM files a chunk found not to be radiographs, with the fingerprint that sets them aside.
NOT_SCORED_SCHEMA = pa.schema(
    [
        ("image_uri", pa.string()),
        ("source_size", pa.int64()),
        ("source_etag", pa.string()),
        ("modality", pa.string()),
        ("run_id", pa.string()),
        ("scored_at", pa.timestamp("us", tz="UTC")),
    ]
)
NOT_SCORED_COLUMNS = ["image_uri", "source_size", "source_etag", "modality"]
# One row per scoring run, rewritten with each of its chunks: what it read, what it did so far (``totals``, JSON).
RUNS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("model_id", pa.string()),
        ("scoring_id", pa.string()),
        ("scored_at", pa.timestamp("us", tz="UTC")),
        ("chunks", pa.int32()),
        ("final", pa.bool_()),
        ("totals", pa.string()),
    ]
)
