"""What a night scores and what its study rows say, without Ray: ``plan_run`` and ``StudyTotals``."""

from __future__ import annotations

import pyarrow as pa
import pytest

from mura_ray.archive.catalog import CATALOG_SCHEMA
from mura_ray.imaging.decode import READ_ERROR
from mura_ray.scoring.run import plan_run
from mura_ray.scoring.studies import StudyTotals


def catalog(*files: tuple[str, int, str | None]) -> pa.Table:
    """Catalog rows of (image_uri, size, tag); the study is the image's folder."""
    return pa.Table.from_pylist(
        [
            {
                "image_uri": uri,
                "split": "valid",
                "body_part": "WRIST",
                "patient_id": "patient1",
                "study_uri": uri.rpartition("/")[0],
                "label": 1,
                "source_size": size,
                "source_etag": tag,
            }
            for uri, size, tag in files
        ],
        schema=CATALOG_SCHEMA,
    )


def earlier(*rows: tuple[str, int, str | None, str | None]) -> pa.Table:
    """Current image rows of (image_uri, size, tag, error)."""
    return pa.table(
        {
            "image_uri": [r[0] for r in rows],
            "source_size": pa.array([r[1] for r in rows], pa.int64()),
            "source_etag": pa.array([r[2] for r in rows], pa.string()),
            "error": pa.array([r[3] for r in rows], pa.string()),
        }
    )


def uris(table: pa.Table) -> list[str]:
    return table["image_uri"].to_pylist()


def test_an_image_is_skipped_only_while_its_size_and_tag_stay_those_of_its_current_row():
    files = catalog(("s1/a", 10, "t1"), ("s1/b", 11, "t2"), ("s1/c", 12, "t3"), ("s2/d", 13, "t4"), ("s2/e", 14, None))
    rows = earlier(
        ("s1/a", 10, "t1", None),  # unchanged
        ("s1/b", 99, "t2", None),  # another size
        ("s1/c", 12, "old", None),  # another tag
        ("s2/e", 14, None, None),  # no tag on either side, found before
    )
    todo, skipped = plan_run(files, rows, full=False)
    assert uris(todo) == ["s1/b", "s1/c", "s2/d"]  # d is new
    assert uris(skipped) == ["s1/a", "s2/e"]
    assert todo.schema == files.schema and skipped.schema == files.schema


def test_a_read_error_is_tried_again_and_a_decode_error_is_not():
    files = catalog(("s1/a", 10, "t1"), ("s1/b", 11, "t2"))
    rows = earlier(("s1/a", 10, "t1", f"{READ_ERROR}: SourceChanged"), ("s1/b", 11, "t2", "cannot decode: bad PNG"))
    todo, skipped = plan_run(files, rows, full=False)
    assert (uris(todo), uris(skipped)) == (["s1/a"], ["s1/b"])


def test_full_scores_everything_and_no_earlier_rows_skip_nothing():
    files = catalog(("s1/b", 11, "t2"), ("s1/a", 10, "t1"))
    rows = earlier(("s1/a", 10, "t1", None), ("s1/b", 11, "t2", None))
    todo, skipped = plan_run(files, rows, full=True)
    assert (sorted(uris(todo)), skipped.num_rows) == (["s1/a", "s1/b"], 0)
    todo, skipped = plan_run(files, rows.slice(0, 0), full=False)
    assert (sorted(uris(todo)), skipped.num_rows) == (["s1/a", "s1/b"], 0)


def test_a_file_found_not_a_radiograph_is_set_aside_until_it_changes():
    files = catalog(("s1/ct", 10, "t1"), ("s1/mr", 11, "t2"), ("s1/x", 12, "t3"))
    not_scored = earlier(("s1/ct", 10, "t1", None), ("s1/mr", 11, "old", None)).drop_columns(["error"])
    todo, skipped = plan_run(files, earlier(("s1/x", 12, "t3", None)), full=False, not_scored=not_scored)
    assert (uris(todo), uris(skipped)) == (["s1/mr"], ["s1/x"])  # ct is in neither: not scored, not skipped
    todo, _ = plan_run(files, earlier(("s1/x", 12, "t3", None)), full=True, not_scored=not_scored)
    assert uris(todo) == ["s1/mr", "s1/x"]  # --full rescores images, not files of other modalities


def image_rows(*rows: tuple[str, float | None]) -> pa.Table:
    return pa.table(
        {
            "image_uri": pa.array([u for u, _ in rows], pa.string()),
            "study_uri": pa.array([u.rpartition("/")[0] for u, _ in rows], pa.string()),
            "prob_abnormal": pa.array([p for _, p in rows], pa.float32()),
        }
    )


def test_a_study_row_counts_this_runs_rows_and_the_snapshots_rows_of_its_other_images():
    files = catalog(("s1/a", 1, "t"), ("s1/b", 1, "t"), ("s2/c", 1, "t"))
    totals = StudyTotals(files, "model", "run-2", threshold=0.5, scoring_id="sid")
    totals.add(image_rows(("s1/a", 0.9), ("s2/c", None)))
    assert totals.touched() == ["s1", "s2"]
    # The snapshot holds an older row of s1/a (this run's replaces it) and one of s1/b (another run's).
    snapshot = image_rows(("s1/a", 0.1), ("s1/b", 0.3), ("s3/z", 0.99))
    rows = {r["study_uri"]: r for r in totals.chunk_table(snapshot).to_pylist()}
    assert set(rows) == {"s1", "s2"}
    assert rows["s1"]["n_images"] == 2 and rows["s1"]["n_errors"] == 0
    assert rows["s1"]["prob_abnormal"] == pytest.approx(0.6) and rows["s1"]["predicted_abnormal"] is True
    assert rows["s2"]["n_images"] == 1 and rows["s2"]["n_errors"] == 1 and rows["s2"]["prob_abnormal"] is None
    assert rows["s2"]["predicted_abnormal"] is None
    assert {r["run_id"] for r in rows.values()} == {"run-2"} and {r["scoring_id"] for r in rows.values()} == {"sid"}
    assert rows["s1"]["body_part"] == "WRIST" and rows["s1"]["patient_id"] == "patient1" and rows["s1"]["label"] == 1


def test_the_next_chunk_writes_only_its_own_studies_over_everything_this_run_scored():
    files = catalog(("s1/a", 1, "t"), ("s1/b", 1, "t"), ("s2/c", 1, "t"))
    totals = StudyTotals(files, "model", "run-2", threshold=0.5, scoring_id="sid")
    totals.add(image_rows(("s1/a", 0.2)))
    totals.chunk_table(image_rows())
    totals.end_chunk()
    assert totals.touched() == []
    totals.add(image_rows(("s1/b", 0.4)))
    (row,) = totals.chunk_table(image_rows(("s1/a", 0.2))).to_pylist()  # s1/a committed by the first chunk
    assert (row["study_uri"], row["n_images"], row["predicted_abnormal"]) == ("s1", 2, False)
    assert row["prob_abnormal"] == pytest.approx(0.3)
