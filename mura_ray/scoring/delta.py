"""The scores of every scoring run as one Delta Lake table, written with ``deltalake`` (delta-rs).

Under ``OUTPUT/`` (a folder or an s3:// prefix)::

    scores/_delta_log/       the table's commit log: a JSON file per commit, a checkpoint every 100
    scores/kind=image/       one row per image file and scoring id (``IMAGES_SCHEMA``'s columns)
    scores/kind=study/       one row per study and scoring id (``STUDIES_SCHEMA``'s columns)
    scores/kind=heatmap/     one row per overlay (``INDEX_SCHEMA``'s columns, with scoring_id, run_id and
                             the image row's source_size and source_etag)
    scores/kind=not_scored/  DICOM files of other modalities (``NOT_SCORED_SCHEMA``'s columns, scoring_id)
    scores/kind=run/         one row per scoring run (``RUNS_SCHEMA``): its totals, rewritten each chunk
    heatmaps/                the overlay PNGs the heatmap rows name (outside the table's folder)

**One table, a row kind.** A chunk's image, study and heatmap rows are one
Delta commit of one table, so every reader of one snapshot (deltalake,
Spark, Trino, DuckDB, Polars) sees a chunk whole or not at all, and needs
no rule about the order in which it reads. Three tables would take three
commits, and a reader of two of them could see one commit and not the
other: a partial chunk. Delta has no commit across tables. The table is
partitioned by ``kind``, so a reader of one kind reads only that kind's
files; each kind's rows have exactly the columns, names and types of the
Parquet files of before (``view_columns``); the columns of other kinds are
null on them. ``key`` is the row's identity within its kind (``image_uri``
of an image or heatmap row, ``study_uri`` of a study row), so that a
commit is one equality join.

**Current rows.** The table holds one row per (``kind``, ``key``,
``scoring_id``): a chunk is a ``MERGE`` on those three columns that
replaces the rows it matches and inserts the others, in one commit. A
rescore replaces the old row whatever any clock says. Earlier rows are
Delta's history: ``view(kind, version=N)`` (or a timestamp, which is
only as good as the writers' clocks) until ``vacuum`` removes their files.

**Exactly once.** Each chunk's commit carries Delta's application
transaction (``txn``) with app id ``mura-ray/score/<run_id>`` and the
chunk's number as its version. Before committing, the store reads the
version recorded for the app id; a chunk whose number is not above it was
committed already and is a no-op. The app id is per run, not per model:
the version must say which run wrote it, or a rival run's chunk N would
look like this run's retry of N and be dropped. ``last_chunk(run_id)``
tells a run resumed with its ``--run-id`` where it stopped.

**Concurrency.** Every commit is a ``put-if-absent`` of the next log file
(``If-None-Match: *`` on S3, an exclusive create on local disk); a writer
that loses the race checks the winner's commit against what it read. A
MERGE reads the rows it matches, so a concurrent commit that added rows
where it looked (two runs inserting the same image), or that recorded the
same app id, is a conflict: the loser starts again from the new snapshot
(``ATTEMPTS`` tries, then one line). So two writers never leave two
current rows for one image and scoring id. A commit whose response was
lost and whose retry got 412 is found by its own app transaction and is
not committed twice. On S3 this needs an endpoint that honours
``If-None-Match``; ``check_conditional_writes`` refuses one that does not
(delta-rs itself would overwrite the other writer's commit in silence).
No DynamoDB, no ``AWS_S3_ALLOW_UNSAFE_RENAME``, no lease, no clock.

**Crashes.** Data files are written first, under random names, and a
commit is the one log file that names them. A writer killed at any point
leaves the table at its last commit; the files of its unfinished commit
are named by no commit and ``vacuum`` deletes them (after the retention,
7 days by default, so that a slow writer's files are never taken from
under it). A damaged checkpoint is set aside (``_damaged/``) and the
table read from its commits (``repair_checkpoint``, called by the first
read that meets it).

deltalake 1.6 facts this relies on, checked by ``tests/test_delta.py``:
``transaction_version`` reads the txn; ``merge``, ``delete`` and
``create_write_transaction`` take ``CommitProperties(app_transactions=)``;
``DeltaTable.history`` holds the GIL while it lists the log (an S3 server
in the same process, as moto in tests, cannot answer it).

How ``run_scoring`` uses it: ``RunWriter`` keeps a chunk's rows in memory
and commits them with ``commit_chunk``, whose ``prepare`` recomputes the
chunk's study rows from each attempt's snapshot (so a study row covers the
current image rows of the commit it lands in, even after a rival's). The
``run`` row of a run is rewritten with each chunk: its totals so far, and
``final`` after its last. Heatmaps are drawn after the run's chunks for the
images of flagged studies that have no overlay of their current row yet,
their PNGs written under ``OUTPUT/heatmaps/`` before the commit that names
them; a killed run's flagged images are drawn by the next run, and a PNG no
row names is an orphan ``vacuum`` deletes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
import secrets
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
from deltalake import CommitProperties, DeltaTable, Transaction
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError

from mura_ray.archive import storage
from mura_ray.errors import UsageError
from mura_ray.scoring.schemas import (
    KEY_OF,
    KINDS,
    NOT_SCORED_COLUMNS,
    PRIOR_COLUMNS,
    SCORES_SCHEMA,
    STAMPED,
    TABLE,
    VIEW_COLUMNS,
)

log = logging.getLogger(__name__)

ATTEMPTS = 8  # commits tried against a table that other writers keep changing, before giving up
MERGE_PREDICATE = "t.kind = s.kind AND t.key = s.key AND t.scoring_id = s.scoring_id"


def app_id(run_id: str) -> str:
    """The application id of a run's commits in the table's log."""
    return f"mura-ray/score/{run_id}"


@dataclasses.dataclass(frozen=True)
class Commit:
    """What ``commit_chunk`` did: ``applied`` is False when the chunk had been committed before the call
    (True also when an attempt of this call committed it and its reply was lost)."""

    run_id: str
    chunk: int
    version: int  # the table's version that holds the chunk
    applied: bool
    attempts: int


class CommitConflict(UsageError):
    """Other writers kept committing to the table: this chunk is not committed (nothing of it is visible)."""


def s3_storage_options() -> dict[str, str]:
    """delta-rs settings for the S3 endpoint in the environment (credentials it reads from there itself)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    options: dict[str, str] = {}
    if endpoint:
        options["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.startswith("http://"):
            options["AWS_ALLOW_HTTP"] = "true"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["AWS_REGION"] = region
    return options


def _arrow_s3() -> pafs.S3FileSystem:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    if not endpoint:
        return pafs.S3FileSystem(region=region)
    url = urllib.parse.urlsplit(endpoint)
    return pafs.S3FileSystem(region=region, endpoint_override=url.netloc, scheme=url.scheme or "https")


_checked: set[str] = set()


def check_conditional_writes(output: str) -> None:
    """Refuse (``UsageError``) an S3 endpoint that does not honour ``If-None-Match: *``; local paths pass.

    Creates a probe object under ``output`` twice with ``If-None-Match: *``:
    the second create must be refused (412). An endpoint that accepts it
    would let two writers both "create" the same Delta log file, and the
    second would erase the first one's commit. Checked once per output and
    process."""
    if not output.startswith("s3://") or output in _checked:
        return
    fs, base = storage.filesystem(output)
    probe = storage.join(base, f"_conditional_write_probe-{secrets.token_hex(8)}")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
    try:
        try:
            fs.pipe_file(probe, b"first", mode="create")
        except FileExistsError:
            pass  # a first create whose response was lost, retried and refused: conditional writes work
        except Exception as exc:
            raise UsageError(
                f"{endpoint} refused a conditional write (If-None-Match: *) under {output}: "
                f"{type(exc).__name__}: {exc}; the scores' Delta table needs them"
            ) from None
        try:
            fs.pipe_file(probe, b"second", mode="create")
        except FileExistsError:
            _checked.add(output)
            return
        except Exception as exc:
            raise UsageError(
                f"{endpoint} answered a conditional write (If-None-Match: *) under {output} with "
                f"{type(exc).__name__}: {exc}, not 412; the scores' Delta table needs conditional writes"
            ) from None
        raise UsageError(
            f"{endpoint} does not honour conditional writes: a second PUT with If-None-Match: * of "
            f"s3://{probe} succeeded, so two runs could overwrite each other's commits to {output}; "
            "use storage that honours them (AWS S3, MinIO, Cloudflare R2, Ceph RGW 18+)"
        )
    finally:
        try:
            fs.rm(probe)
        except Exception:  # the probe's absence or a failed delete changes nothing
            pass


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class ScoreStore:
    """The ``scores`` table under an output root. Reads need nothing; the first write creates the table
    and, on S3, checks the endpoint's conditional writes."""

    def __init__(self, output: str):
        self.output = output.rstrip("/")
        self.remote = self.output.startswith("s3://")
        fs, base = storage.filesystem(self.output)
        self._base = base
        self.uri = f"s3://{base}/{TABLE}" if self.remote else os.path.join(base, TABLE)
        self.storage_options = s3_storage_options() if self.remote else {}
        self._table: DeltaTable | None = None

    # -- reading -------------------------------------------------------------------------------------------

    def table(self, version: int | str | None = None) -> DeltaTable | None:
        """The table at its latest version (or ``version``: a number, or an ISO timestamp as the writers'
        clocks stamped commits), or None when nothing was ever committed here."""
        try:
            table = DeltaTable(self.uri, storage_options=self.storage_options or None)
        except TableNotFoundError:
            return None
        except DeltaError as exc:
            if not _DAMAGED_CHECKPOINT.search(str(exc)):
                raise
            # A checkpoint cut short or a hint naming one that is gone: delta-rs 1.6 refuses the table; its
            # commits still say everything, so set the checkpoint aside and read them (one warning line).
            self.repair_checkpoint(str(exc).splitlines()[0])
            table = DeltaTable(self.uri, storage_options=self.storage_options or None)
        if version is not None:
            table.load_as_version(version)
        return table

    def arrow_filesystem(self) -> pafs.FileSystem:
        """A native Arrow filesystem rooted at the table: the files ``to_pyarrow_dataset`` names are read
        by Arrow's own threads, never through Python callbacks (which can abort the process at exit)."""
        if self.remote:
            return pafs.SubTreeFileSystem(f"{self._base}/{TABLE}", _arrow_s3())
        return pafs.SubTreeFileSystem(self.uri, pafs.LocalFileSystem())

    def dataset(self, table: DeltaTable, kind: str) -> pads.Dataset:
        """The rows of one ``kind`` of one snapshot, as an Arrow dataset (what DuckDB, Polars, pandas read).

        Filter it on ``kind`` only and the rest in memory: delta-rs 1.6 writes the files of a MERGE with
        string_view columns, and Arrow's row-group pruning of a string filter against them fails
        ("no kernel matching input types (string, string_view)", delta-rs issue 4579)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
        ds = table.to_pyarrow_dataset(filesystem=self.arrow_filesystem(), file_pruning_predicate=[("kind", "=", kind)])
        return ds.filter(pc.field("kind") == kind)

    def view(self, kind: str, version: int | str | None = None) -> pa.Table:
        """One kind's rows (its documented columns) at the latest version or at ``version``."""
        return self.current(kind, table=self.table(version))

    def snapshot(self, version: int | str | None = None) -> dict[str, pa.Table]:
        """Every kind's rows read from one version of the table: whole chunks only."""
        table = self.table(version)
        return {kind: self.current(kind, table=table) if table is not None else _empty(kind) for kind in KINDS}

    def scored(self, scoring_id: str, table: DeltaTable | None = None) -> pa.Table:
        """The current row of each image scored with ``scoring_id`` (``PRIOR_COLUMNS``)."""
        return self.current("image", scoring_id, table, columns=PRIOR_COLUMNS)

    def current(
        self,
        kind: str,
        scoring_id: str | None = None,
        table: DeltaTable | None = None,
        columns: list[str] | None = None,
    ) -> pa.Table:
        """One kind's rows (of ``scoring_id``, or all; its documented columns, or ``columns``) in ``table``'s
        snapshot or the latest."""
        columns = columns or VIEW_COLUMNS[kind]
        table = table or self.table()
        if table is None:
            return _empty(kind).select(columns)
        read = columns if scoring_id is None or "scoring_id" in columns else [*columns, "scoring_id"]
        rows = typed(self.dataset(table, kind).to_table(columns=read))
        if scoring_id is not None:
            rows = rows.filter(pc.equal(rows["scoring_id"], scoring_id))
        return rows.select(columns)

    def not_scored(self, table: DeltaTable | None = None) -> pa.Table:
        """DICOM files runs found not to be radiographs: ``image_uri``, fingerprint, ``modality``; one row per
        file (the latest, where runs of several scoring ids found it)."""
        rows = self.current("not_scored", table=table).sort_by(
            [("image_uri", "ascending"), ("scored_at", "descending")]
        )
        uris = rows["image_uri"].to_pylist()
        first = [i == 0 or uris[i] != uris[i - 1] for i in range(len(uris))]
        return rows.filter(pa.array(first, pa.bool_())).select(NOT_SCORED_COLUMNS)

    def runs(self, table: DeltaTable | None = None) -> list[dict[str, Any]]:
        """Every scoring run's row, oldest first: ``run_id``, ``chunks``, ``final`` and its ``totals``."""
        rows = (
            self.current("run", table=table).sort_by([("scored_at", "ascending"), ("run_id", "ascending")]).to_pylist()
        )
        return [dict(r, totals=json.loads(r["totals"] or "{}")) for r in rows]

    def last_chunk(self, run_id: str, table: DeltaTable | None = None) -> int | None:
        """The number of the last chunk ``run_id`` committed, or None."""
        table = table or self.table()
        return None if table is None else table.transaction_version(app_id(run_id))

    def history(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The table's commits, newest first, with each chunk's ``mura_ray.*`` metadata."""
        table = self.table()
        return [] if table is None else table.history(limit)

    # -- writing -------------------------------------------------------------------------------------------

    def _writable(self) -> DeltaTable:
        if self._table is not None:
            self._table.update_incremental()
            return self._table
        check_conditional_writes(self.output)
        table = self.table()
        if table is None:
            try:
                DeltaTable.create(
                    self.uri,
                    SCORES_SCHEMA,
                    partition_by=["kind"],
                    mode="ignore",
                    name="scores",
                    description="mura-ray scores: one current row per image, study and heatmap and scoring id",
                    storage_options=self.storage_options or None,
                )
            except DeltaError:  # another writer created it first
                pass
            table = self.table()
            if table is None:
                raise UsageError(f"could not create the scores table {self.uri}")
        missing = [f.name for f in SCORES_SCHEMA if f.name not in table.schema().to_arrow().names]
        if missing:
            raise UsageError(f"{self.uri} is not a mura-ray scores table: it has no column {', '.join(missing)}")
        self._table = table
        return table

    def commit_chunk(
        self,
        *,
        run_id: str,
        scoring_id: str,
        chunk: int,
        images: pa.Table | None = None,
        studies: pa.Table | None = None,
        heatmaps: pa.Table | None = None,
        not_scored: pa.Table | None = None,
        run: pa.Table | None = None,
        metadata: dict[str, Any] | None = None,
        prepare: Callable[[DeltaTable], dict[str, pa.Table]] | None = None,
    ) -> Commit:
        """Commit chunk ``chunk`` (0, 1, ...) of ``run_id``: its rows of every kind in one commit that
        replaces the rows of the same (kind, key, scoring id). Committing a chunk number the run already
        committed changes nothing. ``prepare``, called with each attempt's snapshot, returns rows of more
        kinds that depend on it (study rows over the current image rows). Raises ``CommitConflict`` after
        ``ATTEMPTS`` lost races."""
        given = {"image": images, "study": studies, "heatmap": heatmaps, "not_scored": not_scored, "run": run}
        app = app_id(run_id)
        custom = {"mura_ray.run_id": run_id, "mura_ray.chunk": chunk, "mura_ray.scoring_id": scoring_id}
        custom.update({f"mura_ray.{k}": v for k, v in (metadata or {}).items()})
        last: Exception | None = None
        for attempt in range(1, ATTEMPTS + 1):
            table = self._writable()
            done = table.transaction_version(app)
            if done is not None and done >= chunk:
                # Recorded after a failed attempt of this call: that attempt's commit, whose reply was lost.
                mine = last is not None and done == chunk
                return Commit(run_id, chunk, table.version(), applied=mine, attempts=attempt)
            kinds = dict(given, **(prepare(table) if prepare is not None else {}))
            rows = chunk_rows(run_id, scoring_id, **kinds)
            props = CommitProperties(app_transactions=[Transaction(app, chunk)], custom_metadata=custom)
            try:
                if rows.num_rows:
                    merger = table.merge(
                        rows, MERGE_PREDICATE, source_alias="s", target_alias="t", commit_properties=props
                    )
                    merger.when_matched_update_all().when_not_matched_insert_all().execute()
                else:  # nothing to write: the commit records the chunk, so a retry of it stays a no-op
                    table.create_write_transaction([], "append", SCORES_SCHEMA, commit_properties=props)
            except CommitFailedError as exc:
                last = exc
                log.info("chunk %d of run %s lost a commit race (attempt %d): %s", chunk, run_id, attempt, exc)
                time.sleep(random.uniform(0, 0.05 * 2**attempt))
                continue
            table.update_incremental()
            return Commit(run_id, chunk, table.version(), applied=True, attempts=attempt)
        raise CommitConflict(
            f"chunk {chunk} of run {run_id} was not committed to {self.uri}: other writers committed first "
            f"{ATTEMPTS} times ({str(last).splitlines()[0] if last else ''}); nothing of it is visible, run again"
        )

    def retract(self, run_id: str) -> int:
        """Remove every row ``run_id`` wrote, in one commit; the next run scores those images again.
        Returns how many rows went."""
        for attempt in range(1, ATTEMPTS + 1):
            table = self._writable()
            props = CommitProperties(custom_metadata={"mura_ray.retracted_run": run_id})
            try:
                metrics = table.delete(f"run_id = {_quote(run_id)}", commit_properties=props)
            except CommitFailedError:
                time.sleep(random.uniform(0, 0.05 * 2**attempt))
                continue
            return int(metrics.get("num_deleted_rows", 0))
        raise CommitConflict(f"run {run_id} was not retracted from {self.uri}: other writers kept committing")

    def vacuum(self, retention_hours: int | None = None, *, dry_run: bool = False) -> list[str]:
        """Delete data files no current version needs and older than the retention (the table's, 7 days by
        default): rows replaced or retracted that long ago, and files of commits that never happened."""
        table = self.table()
        if table is None:
            return []
        # full: also files no commit ever named (a writer killed between its data files and its commit);
        # the retention, against each file's modification time, keeps those of a writer still at work.
        return table.vacuum(
            retention_hours=retention_hours, dry_run=dry_run, enforce_retention_duration=True, full=True
        )

    def repair_checkpoint(self, reason: str = "") -> list[str]:
        """Set aside damaged checkpoints (and the ``_last_checkpoint`` hint) so the table is read from its
        commits again, then write a fresh checkpoint; returns what was set aside. delta-rs 1.6 refuses a
        table whose newest checkpoint is truncated or whose hint names a checkpoint that is gone; ``table()``
        calls this when it meets one (``reason``: what delta-rs said)."""
        fs, _ = storage.filesystem(self.output)
        log_dir = storage.join(self._base, TABLE, "_delta_log")
        moved = []
        for path in sorted(fs.ls(log_dir, detail=False)):
            name = path.rsplit("/", 1)[-1]
            if ".checkpoint." in name or name == "_last_checkpoint":
                if name != "_last_checkpoint" and _readable_parquet(fs, path):
                    continue
                target = storage.join(self._base, TABLE, "_damaged", name)
                fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
                try:
                    fs.mv(path, target)
                except FileNotFoundError:  # set aside by another process meeting it at the same time
                    continue
                moved.append(name)
        try:
            table = DeltaTable(self.uri, storage_options=self.storage_options or None)
        except (TableNotFoundError, DeltaError) as exc:
            raise UsageError(
                f"{self.uri}: its checkpoint is damaged and its commits cannot be read without it "
                f"({str(exc).splitlines()[0]}); restore _delta_log from a backup"
            ) from None
        table.create_checkpoint()
        log.warning(
            "%s: set aside %s in _damaged/ and wrote a fresh checkpoint from the table's commits%s",
            self.uri,
            ", ".join(moved) or "nothing",
            f" ({reason})" if reason else "",
        )
        return moved


_DAMAGED_CHECKPOINT = re.compile(r"[Cc]heckpoint|Parquet error")


def _readable_parquet(fs: Any, path: str) -> bool:
    import pyarrow.parquet as pq

    try:
        with fs.open(path, "rb") as f:
            pq.read_metadata(f)
        return True
    except Exception:
        return False


def typed(rows: pa.Table) -> pa.Table:
    """Rows as read (delta-rs gives string_view and large types) in the documented column types."""
    return rows.cast(pa.schema([SCORES_SCHEMA.field(name) for name in rows.column_names]))


def _empty(kind: str) -> pa.Table:
    return SCORES_SCHEMA.empty_table().select(VIEW_COLUMNS[kind])


def chunk_rows(
    run_id: str,
    scoring_id: str,
    *,
    image: pa.Table | None = None,
    study: pa.Table | None = None,
    heatmap: pa.Table | None = None,
    not_scored: pa.Table | None = None,
    run: pa.Table | None = None,
) -> pa.Table:
    """A chunk's rows of every kind in the table's schema: ``kind``, ``key``, the kind's columns (cast to
    their types; missing ones are an error), the other kinds' columns null. Every row must carry
    ``run_id`` and ``scoring_id`` (heatmap rows get them), and no key may come twice in a kind."""
    parts = []
    given = {"image": image, "study": study, "heatmap": heatmap, "not_scored": not_scored, "run": run}
    for kind, rows in given.items():
        if rows is None or rows.num_rows == 0:
            continue
        n = rows.num_rows
        for column in STAMPED:
            if column not in rows.column_names:
                rows = rows.append_column(column, pa.array([run_id if column == "run_id" else scoring_id] * n))
        missing = [c for c in VIEW_COLUMNS[kind] if c not in rows.column_names]
        if missing:
            raise ValueError(f"{kind} rows of run {run_id} have no column {', '.join(missing)}")
        for column, expected in (("run_id", run_id), ("scoring_id", scoring_id)):
            values = pc.unique(rows[column]).to_pylist()
            if values != [expected]:
                raise ValueError(f"{kind} rows of run {run_id} have {column} {values}, not [{expected!r}]")
        key = rows[KEY_OF[kind]]
        if key.null_count or pc.count_distinct(key).as_py() != n:
            raise ValueError(f"{kind} rows of run {run_id}: {KEY_OF[kind]} is null or comes twice")
        columns = {"kind": pa.array([kind] * n, pa.string()), "key": key}
        for f in SCORES_SCHEMA:
            if f.name in columns:
                continue
            if f.name in VIEW_COLUMNS[kind]:
                columns[f.name] = pc.cast(rows[f.name], f.type)
            else:
                columns[f.name] = pa.nulls(n, f.type)
        parts.append(pa.table(columns, schema=SCORES_SCHEMA))
    return pa.concat_tables(parts) if parts else SCORES_SCHEMA.empty_table()
