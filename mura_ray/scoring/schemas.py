"""What scoring publishes: the scores table's columns by row kind and the output folder's layout.

One module, so that the writer, the table, the readers, ``score --help`` and
the README's "Scoring output" name the same columns and paths
(tests/test_schemas.py checks the help and the README against it). No Ray,
no torch.
"""

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
        ("scoring_id", pa.string()),
        ("run_id", pa.string()),
        ("scored_at", pa.timestamp("us", tz="UTC")),
    ]
)
# The heatmaps' index: one row per overlay (score's heatmap rows, explain's index.parquet).
INDEX_SCHEMA = pa.schema(
    [
        ("image_uri", pa.string()),
        ("study_uri", pa.string()),
        ("heatmap", pa.string()),  # path of the PNG: under explain's --out, or under score's OUT
        ("prob_abnormal", pa.float32()),
        ("peak_x", pa.float32()),  # the map's peak, as a fraction of the model input's side
        ("peak_y", pa.float32()),
        ("layer", pa.string()),
        ("model_id", pa.string()),
        ("error", pa.string()),
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

KINDS = ("image", "study", "heatmap", "not_scored", "run")
KEY_OF = {
    "image": "image_uri",
    "study": "study_uri",
    "heatmap": "image_uri",
    "not_scored": "image_uri",
    "run": "run_id",
}
HEATMAP_EXTRA = ("source_size", "source_etag")  # the image row an overlay shows: redrawn when the file changes
STAMPED = ("scoring_id", "run_id")  # on every row; a heatmap row gets them from its chunk


def _view_columns() -> dict[str, list[str]]:
    heatmap = INDEX_SCHEMA.names + [c for c in STAMPED + HEATMAP_EXTRA if c not in INDEX_SCHEMA.names]
    not_scored = NOT_SCORED_SCHEMA.names + [c for c in STAMPED if c not in NOT_SCORED_SCHEMA.names]
    return {
        "image": IMAGES_SCHEMA.names,
        "study": STUDIES_SCHEMA.names,
        "heatmap": heatmap,
        "not_scored": not_scored,
        "run": RUNS_SCHEMA.names,
    }


def _table_schema() -> pa.Schema:
    """``kind`` and ``key``, then every column of every kind once (a name has one type in all)."""
    fields: dict[str, pa.Field] = {"kind": pa.field("kind", pa.string()), "key": pa.field("key", pa.string())}
    for schema in (IMAGES_SCHEMA, STUDIES_SCHEMA, INDEX_SCHEMA, NOT_SCORED_SCHEMA, RUNS_SCHEMA):
        for f in schema:
            if f.name in fields and fields[f.name].type != f.type:
                raise TypeError(f"column {f.name} is {fields[f.name].type} in one kind and {f.type} in another")
            fields.setdefault(f.name, f)
    return pa.schema(list(fields.values()))


# The columns a kind's rows have (the others are null on them), and the table's schema.
VIEW_COLUMNS = _view_columns()
SCORES_SCHEMA = _table_schema()

# score's OUT, as the README's "Scoring output" shows it (``layout_text``) and ``score --help`` names it.
TABLE = "scores"
HEATMAPS = "heatmaps"
OUTPUT_LAYOUT = (
    (f"{TABLE}/", "one Delta Lake table (written with deltalake, delta-rs)"),
    (f"{TABLE}/_delta_log/", "its commits: one JSON per commit, a checkpoint every 100"),
    (f"{TABLE}/kind={'|'.join(KINDS)}/", "its Parquet files, by row kind"),
    (f"{HEATMAPS}/run_date=YYYY-MM-DD/run_id=<run_id>/", "with --heatmaps flagged: <path under ROOT>.heatmap.png"),
)


def layout_text(prefix: str = "OUT/") -> str:
    """The output layout, one line a folder, as the README prints it."""
    width = max(len(prefix + path) for path, _ in OUTPUT_LAYOUT) + 2
    return "\n".join(f"{prefix + path:<{width}}{what}".rstrip() for path, what in OUTPUT_LAYOUT)
