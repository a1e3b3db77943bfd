"""The compact "already scored" index: the same answer as every committed file, whatever state it is in."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from mura_ray.archive.catalog import CATALOG_SCHEMA
from mura_ray.scoring import index
from mura_ray.scoring.lease import Lease
from mura_ray.scoring.ledger import PRIOR_COLUMNS, Ledger
from mura_ray.scoring.writer import RunWriter


def _night(ledger: Ledger, run_id: str, uris: list[str], prob: float, model_id: str = "m", update: bool = True):
    """One committed run scoring ``uris`` (each with score ``prob``), through the writer's commit path."""
    catalog = pa.Table.from_pylist(
        [dict(image_uri=u, study_uri=u.rsplit("/", 1)[0], source_size=1, source_etag=run_id) for u in uris],
        schema=CATALOG_SCHEMA,
    )
    lease = Lease(ledger.fs, ledger.base, run_id)
    lease.acquire()
    writer = RunWriter(ledger, lease, catalog, ledger.scored(model_id), run_id, model_id, 0.5, "2026-11-28")
    n = len(uris)
    writer.add(
        pa.table(
            {
                "image_uri": uris,
                "prob_abnormal": pa.array([prob] * n, pa.float32()),
                "error": pa.nulls(n, pa.string()),
                "modality": [""] * n,
                "backend": ["torch"] * n,
                "precision": ["fp32"] * n,
            }
        )
    )
    writer.commit({"final": True, "started_at": f"2026-11-28T00:00:{len(ledger.manifests()):02d}+00:00"})
    if update:
        ledger.update_index(model_id, lease)
    lease.release()


def _from_every_file(out: str, model_id: str = "m") -> dict[str, tuple]:
    """The current rows computed from all committed image files, without the index."""
    table = pads.dataset(os.path.join(out, "images"), format="parquet").to_table()
    table = table.filter(pc.equal(table["model_id"], model_id))
    rows = index.latest_rows(table.select(PRIOR_COLUMNS)).to_pylist()
    return {r["image_uri"]: (r["prob_abnormal"], r["source_etag"]) for r in rows}


def _from_ledger(out: str, model_id: str = "m") -> dict[str, tuple]:
    rows = Ledger(out).scored(model_id).to_pylist()
    assert len(rows) == len({r["image_uri"] for r in rows})
    return {r["image_uri"]: (r["prob_abnormal"], r["source_etag"]) for r in rows}


def test_the_index_covers_every_committed_night_and_gives_what_the_files_give(tmp_path):
    out = str(tmp_path)
    ledger = Ledger(out)
    for night in range(5):
        _night(ledger, f"night-{night}", [f"a/s{night}/i{k}.png" for k in range(3)], 0.1 * night)
    _night(ledger, "rescore", ["a/s0/i0.png", "a/s4/i2.png"], 0.9)  # newer rows of two images
    _night(ledger, "other-model", ["a/s9/i0.png"], 0.5, model_id="other")

    table, covers = index.read_index(ledger.fs, os.path.join(out, "_index", "m.parquet"))
    assert covers == {f"night-{n}.0" for n in range(5)} | {"rescore.0"}
    assert table.num_rows == 15
    expected = _from_every_file(out)
    assert _from_ledger(out) == expected
    assert expected["a/s0/i0.png"] == (0.8999999761581421, "rescore") and expected["a/s1/i0.png"][1] == "night-1"
    assert set(_from_ledger(out, "other")) == {"a/s9/i0.png"}


def test_a_stale_or_missing_index_still_gives_the_right_rows(tmp_path):
    out = str(tmp_path)
    ledger = Ledger(out)
    _night(ledger, "night-0", ["s0/i0.png", "s0/i1.png"], 0.2)
    # A run that died after its commit and before writing the index: the index misses its chunk.
    _night(ledger, "night-1", ["s0/i1.png", "s1/i0.png"], 0.7, update=False)
    _, covers = index.read_index(ledger.fs, os.path.join(out, "_index", "m.parquet"))
    assert covers == {"night-0.0"}
    assert _from_ledger(out) == _from_every_file(out)
    assert _from_ledger(out)["s0/i1.png"][1] == "night-1"
    os.remove(os.path.join(out, "_index", "m.parquet"))
    assert _from_ledger(out) == _from_every_file(out)
    # The next run brings the index up to date.
    _night(ledger, "night-2", ["s2/i0.png"], 0.4)
    _, covers = index.read_index(ledger.fs, os.path.join(out, "_index", "m.parquet"))
    assert covers == {"night-0.0", "night-1.0", "night-2.0"}
    assert _from_ledger(out) == _from_every_file(out)


def test_study_rows_cover_current_image_rows_across_chunks_and_nights(tmp_path):
    import duckdb

    out = str(tmp_path)
    ledger = Ledger(out)
    rng = np.random.default_rng(0)

    def night(run_id: str, uris: list[str]) -> None:
        catalog = pa.Table.from_pylist(
            [dict(image_uri=u, study_uri=u.rsplit("/", 1)[0], source_size=1, source_etag=run_id) for u in uris],
            schema=CATALOG_SCHEMA,
        )
        lease = Lease(ledger.fs, ledger.base, run_id)
        lease.acquire()
        writer = RunWriter(ledger, lease, catalog, ledger.scored("m"), run_id, "m", 0.5, "2026-11-28")
        for i in range(0, len(uris), 3):  # batches of 3 rows, a chunk every 4 rows or more
            part = uris[i : i + 3]
            probs = [None if rng.random() < 0.2 else float(rng.random()) for _ in part]
            writer.add(
                pa.table(
                    {
                        "image_uri": part,
                        "prob_abnormal": pa.array(probs, pa.float32()),
                        "error": [None if p is not None else "bad" for p in probs],
                        "modality": [""] * len(part),
                        "backend": ["torch"] * len(part),
                        "precision": ["fp32"] * len(part),
                    }
                )
            )
            if writer.pending >= 4:
                writer.commit({"final": False, "started_at": f"2026-11-28T00:00:{len(ledger.manifests()):02d}Z"})
        writer.commit({"final": True, "started_at": f"2026-11-28T00:00:{len(ledger.manifests()):02d}Z"})
        ledger.update_index("m", lease)
        lease.release()

    night("a", [f"s{s}/i{k}.png" for s in range(6) for k in range(3)])
    night("b", ["s1/i0.png", "s1/i3.png", "s4/i2.png", "s7/i0.png", "s2/i1.png"])
    con = duckdb.connect()
    current = (
        "SELECT * FROM read_parquet('{}/{}/**/*.parquet', hive_partitioning=false) "
        "QUALIFY row_number() OVER (PARTITION BY {} ORDER BY scored_at DESC) = 1"
    )
    images = current.format(out, "images", "image_uri")
    studies = current.format(out, "studies", "study_uri")
    got = con.execute(f"SELECT study_uri, n_images, n_errors, prob_abnormal FROM ({studies}) ORDER BY 1").fetchall()
    want = con.execute(
        f"SELECT study_uri, count(*), count(*) - count(prob_abnormal), avg(prob_abnormal) FROM ({images}) "
        "GROUP BY 1 ORDER BY 1"
    ).fetchall()
    assert [g[:3] for g in got] == [w[:3] for w in want] and len(got) == 7
    for g, w in zip(got, want):
        assert (g[3] is None and w[3] is None) or abs(g[3] - w[3]) < 1e-6
