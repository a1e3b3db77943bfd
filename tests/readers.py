"""How tests read the scores table back: deltalake's snapshot, queried by DuckDB (not the store's own reads)."""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable

from mura_ray.scoring.delta import ScoreStore
from mura_ray.scoring.schemas import VIEW_COLUMNS


def scores(out: str, kind: str, version: int | None = None, where: str = "") -> pa.Table:
    """One kind's rows (its documented columns) of the table under ``out``, at its latest version or
    ``version``; empty when no table was ever committed there."""
    store = ScoreStore(out)
    try:
        table = DeltaTable(store.uri, storage_options=store.storage_options or None, version=version)
    except Exception:
        from mura_ray.scoring.delta import _empty

        return _empty(kind)
    con = duckdb.connect()
    # The kind's rows as an Arrow table, then SQL (a string filter pushed into the dataset fails on the
    # string_view files delta-rs 1.6 writes, ``ScoreStore.dataset``).
    ds = table.to_pyarrow_dataset(filesystem=store.arrow_filesystem())
    con.register("scores", ds.to_table(filter=pc.field("kind") == kind))
    columns = ", ".join(f'"{c}"' for c in VIEW_COLUMNS[kind])
    extra = f" AND ({where})" if where else ""
    return con.sql(f"SELECT {columns} FROM scores WHERE kind = '{kind}'{extra}").to_arrow_table()


VIEWS = {"images": "image", "studies": "study", "heatmaps": "heatmap", "not_scored": "not_scored", "runs": "run"}


def connect(out: str, version: int | None = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the table's kinds as views ``images``, ``studies``, ``heatmaps``,
    ``not_scored`` and ``runs`` (each the current rows of one snapshot, read through ``scores``)."""
    con = duckdb.connect()
    for view, kind in VIEWS.items():
        con.register(view, scores(out, kind, version))
    return con
