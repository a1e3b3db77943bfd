"""The compact "already scored" index: the current row of each image a model scored, one Parquet file per model.

``OUTPUT/_index/<model_id>.parquet`` holds, for every image the model
scored in committed chunks, its latest row (the ledger's ``PRIOR_COLUMNS``),
and names in its Parquet metadata the committed chunks it covers. It is
derived data, never the only copy: a reader takes the index and adds the
image files of committed chunks it does not cover, so an index that is
missing, stale or older than another run's commit still gives the right
answer. A run rewrites it after its last commit, so a night reads one file
plus that night's own, however many nights came before.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mura_ray.archive import storage

COVERS_KEY = b"mura_ray.covers"


def chunk_key(manifest: dict[str, Any]) -> str:
    """A committed chunk's name in the index's list: ``<run_id>.<chunk>``."""
    return f"{manifest['run_id']}.{manifest.get('chunk', -1)}"


def read_index(fs: Any, path: str) -> tuple[pa.Table | None, set[str]]:
    """(the index's rows, the chunks it covers), or (None, empty) when there is none."""
    try:
        data = storage.read_bytes(fs, path)
    except FileNotFoundError:
        return None, set()
    table = pq.read_table(io.BytesIO(data))
    covers = set(json.loads((table.schema.metadata or {}).get(COVERS_KEY, b"[]")))
    return table.replace_schema_metadata(None), covers


def write_index(fs: Any, path: str, table: pa.Table, covers: set[str]) -> None:
    """Write the index whole (a reader sees the old one or the new one)."""
    table = table.replace_schema_metadata({COVERS_KEY: json.dumps(sorted(covers)).encode()})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    storage.write_atomic(fs, path, buf.getvalue())


def latest_rows(table: pa.Table) -> pa.Table:
    """One row per ``image_uri``: the one with the latest ``scored_at``."""
    table = table.sort_by([("image_uri", "ascending"), ("scored_at", "descending")])
    uris = table["image_uri"].combine_chunks()
    first = np.ones(table.num_rows, dtype=bool)
    if table.num_rows > 1:
        first[1:] = pc.not_equal(uris.slice(1), uris.slice(0, table.num_rows - 1)).to_numpy(zero_copy_only=False)
    return table.filter(pa.array(first))
