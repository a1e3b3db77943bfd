"""The output store of scoring runs: what is committed, what a new run may skip, how a run commits.

Under ``OUTPUT/`` (a folder or an s3:// prefix)::

    images/run_date=D/<run_id>-<chunk>-NN.parquet   image rows of committed chunks
    studies/run_date=D/<run_id>-<chunk>.parquet     study rows of committed chunks
    not_scored/run_date=D/<run_id>-<chunk>.parquet  DICOM files that are not radiographs
    _runs/<run_id>.<chunk>.json                     one manifest per chunk
    _staging/<run_id>/<chunk>/                      a chunk's files before it commits
    _lease/<generation>.json                        who may write here (``scoring.lease``)
    _index/<scoring_id>.parquet                     what was already scored so (``scoring.index``)

A run commits its work in chunks. A chunk's files are written under
``_staging/<run_id>/<chunk>/``; to commit, the run *creates* the chunk's
manifest with ``"status": "committing"`` and the list of moves (a create
that fails if the name exists, so a chunk is committed once), moves each
staged file to its place (one rename or one object copy per file, so no
reader ever sees a partial file), makes the moves durable, then rewrites the
manifest as ``"committed"``. Before each step it checks that it still holds
the lease. A chunk whose run died before its manifest leaves only staging,
which the next run deletes; one that died during its moves is rolled forward
by the next run from the manifest. A run that takes over a stale lease
first creates the old run's next chunk manifest as ``"fenced"``, so the old
run, if it was only paused, cannot commit again.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads

from mura_ray import faults
from mura_ray.archive import storage
from mura_ray.errors import UsageError
from mura_ray.scoring import index
from mura_ray.scoring.lease import Lease

log = logging.getLogger(__name__)

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


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def manifest_name(run_id: str, chunk: int) -> str:
    return f"{run_id}.{chunk:05d}.json"


@dataclass
class Ledger:
    output: str
    fs: Any = None
    base: str = ""
    _manifests: list[dict[str, Any]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.fs, self.base = storage.filesystem(self.output)

    def path(self, *parts: str) -> str:
        """A path under the output; one that would leave it (a ``..`` from a manifest or a key) is refused."""
        return storage.inside(self.base, *parts)

    def staging(self, run_id: str, chunk: int | None = None) -> str:
        return self.path("_staging", run_id) if chunk is None else self.path("_staging", run_id, f"{chunk:05d}")

    def manifests(self) -> list[dict[str, Any]]:
        """Every manifest under ``_runs/`` (all chunks, all statuses), oldest first."""
        if self._manifests is None:
            runs = self.path("_runs")
            self.fs.invalidate_cache(runs)
            paths = [p for p in (self.fs.ls(runs, detail=False) if self.fs.exists(runs) else []) if p.endswith(".json")]
            blobs = self.fs.cat(paths) if paths else {}
            self._manifests = sorted(
                (json.loads(blobs[p]) for p in paths),
                key=lambda m: (m.get("started_at", ""), m["run_id"], m.get("chunk", 0)),
            )
        return self._manifests

    def check_new_run_id(self, run_id: str) -> None:
        """Refuse a run id that a manifest, a staged chunk or the lease of this output already uses."""
        used = any(m["run_id"] == run_id for m in self.manifests()) or self.fs.exists(self.staging(run_id))
        if used:
            raise UsageError(
                f"run id {run_id!r} is already used in {self.output}: choose another, or leave --run-id out"
            )

    def _manifest_path(self, manifest: dict[str, Any]) -> str:
        if "chunk" not in manifest:  # written before runs committed in chunks
            return self.path("_runs", f"{manifest['run_id']}.json")
        return self.path("_runs", manifest_name(manifest["run_id"], manifest["chunk"]))

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        storage.write_atomic(self.fs, self._manifest_path(manifest), json.dumps(manifest, indent=2).encode())
        self._manifests = None

    def fence(self, run_id: str, by: str, lease: Lease) -> None:
        """Make sure the run ``run_id``, whose lease ``lease`` took over, can commit no further chunk.

        Creates its next chunk's manifest as ``fenced``. Should the old run
        have created that manifest first, that chunk stands (recovery rolls
        it forward) and the next one is fenced."""
        chunk = 1 + max((m.get("chunk", 0) for m in self.manifests() if m["run_id"] == run_id), default=-1)
        while True:
            lease.check()
            body = {"run_id": run_id, "chunk": chunk, "status": "fenced", "fenced_by": by, "at": _now().isoformat()}
            try:
                storage.create_exclusive(
                    self.fs, self.path("_runs", manifest_name(run_id, chunk)), json.dumps(body).encode()
                )
                break
            except FileExistsError:
                chunk += 1
        self._manifests = None
        log.warning("run %s can commit nothing more: its chunk %d is fenced", run_id, chunk)

    def recover(self, active_run_id: str, lease: Lease) -> dict[str, list[str]]:
        """Roll forward chunks whose run died while committing; delete what dead runs staged. Needs the lease."""
        rolled: list[str] = []
        for manifest in self.manifests():
            if manifest.get("status") == "committing":
                self._finish(manifest, lease)
                rolled.append(manifest["run_id"])
        discarded: list[str] = []
        staging_root = self.path("_staging")
        if self.fs.exists(staging_root):
            for entry in self.fs.ls(staging_root, detail=False):
                run_id = entry.rstrip("/").rsplit("/", 1)[-1]
                if run_id != active_run_id:
                    lease.check()
                    self.fs.rm(entry, recursive=True)
                    discarded.append(run_id)
        for run_id in sorted(set(rolled)):
            log.warning("finished the commit of run %s, which died while committing", run_id)
        for run_id in discarded:
            log.warning("deleted the staged files of run %s, which died before committing", run_id)
        return {"rolled_forward": sorted(set(rolled)), "discarded": discarded}

    def _finish(self, manifest: dict[str, Any], lease: Lease) -> None:
        folders = set()
        for i, (src, dst) in enumerate(manifest["moves"]):
            src_path, dst_path = self.path(src), self.path(dst)
            lease.check()
            if self.fs.exists(src_path):
                self.fs.makedirs(dst_path.rsplit("/", 1)[0], exist_ok=True)
                self.fs.mv(src_path, dst_path)
                folders.add(dst_path.rsplit("/", 1)[0])
            elif not self.fs.exists(dst_path):
                raise RuntimeError(
                    f"run {manifest['run_id']}: neither {src} nor {dst} exists; the output was changed by hand"
                )
            if i == 0:
                faults.maybe_kill("commit-move")
        if storage.is_local(self.fs):
            for folder in folders:  # the renames reach the disk before the manifest says so
                storage.fsync_dir(folder)
        lease.check()
        self._write_manifest(dict(manifest, status="committed", committed_at=_now().isoformat()))
        staging = self.staging(manifest["run_id"], manifest.get("chunk"))
        if self.fs.exists(staging):
            self.fs.rm(staging, recursive=True)

    def commit(self, manifest: dict[str, Any], moves: list[tuple[str, str]], lease: Lease) -> dict[str, Any]:
        """Commit one chunk: manifest created as ``committing``, the moves, manifest as ``committed``.

        ``moves`` are (staged, final) paths relative to the output root.
        Raises ``LeaseLost`` when another run holds the lease or fenced this chunk."""
        manifest = dict(manifest, status="committing", moves=[list(m) for m in moves])
        lease.check()
        try:
            storage.create_exclusive(self.fs, self._manifest_path(manifest), json.dumps(manifest, indent=2).encode())
        except FileExistsError:
            lease.lost = lease.lost or {"run_id": "another run (it fenced this chunk)"}
            lease.check()
        self._manifests = None
        faults.maybe_kill("commit-manifest")
        self._finish(manifest, lease)
        return dict(manifest, status="committed")

    def drop_staging(self, run_id: str) -> None:
        """Remove a finished run's (empty) staging folders."""
        for path in (self.staging(run_id), self.path("_staging")):
            if self.fs.exists(path) and not self.fs.find(path):
                self.fs.rm(path, recursive=True)

    def _committed_files(self, folder: str) -> list[str]:
        return [
            self.path(dst)
            for m in self.manifests()
            if m.get("status") == "committed"
            for _, dst in m.get("moves", [])
            if dst.startswith(folder + "/")
        ]

    def not_scored(self) -> pa.Table:
        """DICOM files committed runs found not to be radiographs: ``image_uri``, fingerprint, ``modality``."""
        files = self._committed_files("not_scored")
        if not files:
            return NOT_SCORED_SCHEMA.empty_table().select(NOT_SCORED_COLUMNS)
        table = pads.dataset(files, filesystem=self.fs, format="parquet").to_table(columns=NOT_SCORED_COLUMNS)
        return table

    def scored(self, scoring_id: str) -> pa.Table:
        """The current row (latest ``scored_at``) of each image scored with ``scoring_id`` (the model and
        every setting that changes its scores, ``checkpoint.scoring_id_of``) in committed runs: the
        index (``scoring.index``) and the committed chunks it does not cover."""
        table, _ = self._scored(scoring_id)
        return table

    def update_index(self, scoring_id: str, lease: Lease) -> None:
        """Rewrite the index of ``scoring_id`` to cover every committed chunk of it, if any is not covered yet."""
        self._manifests = None
        table, fresh = self._scored(scoring_id)
        if fresh:
            covers = {index.chunk_key(m) for m in self._committed(scoring_id)}
            lease.check()
            index.write_index(self.fs, self._index_path(scoring_id), table, covers)

    def _scored(self, scoring_id: str) -> tuple[pa.Table, int]:
        """(current rows, number of committed image files the index did not cover)."""
        prior, covered = index.read_index(self.fs, self._index_path(scoring_id))
        files = [
            self.path(dst)
            for m in self._committed(scoring_id)
            if index.chunk_key(m) not in covered
            for _, dst in m.get("moves", [])
            if dst.startswith("images/")
        ]
        parts = [prior.select(PRIOR_COLUMNS)] if prior is not None else []
        if files:
            parts.append(pads.dataset(files, filesystem=self.fs, format="parquet").to_table(columns=PRIOR_COLUMNS))
        if not parts:
            return pa.table({c: pa.array([], t) for c, t in _PRIOR_TYPES.items()}), 0
        table = parts[0] if len(parts) == 1 else pa.concat_tables(parts, promote_options="permissive")
        return (table if not files else index.latest_rows(table)), len(files)

    def _committed(self, scoring_id: str) -> list[dict[str, Any]]:
        """Committed chunks scored with ``scoring_id`` (a chunk written before scoring ids were recorded
        names only its model_id, so its images are scored once more)."""
        return [
            m
            for m in self.manifests()
            if m.get("status") == "committed" and m.get("scoring_id", m.get("model_id")) == scoring_id
        ]

    def _index_path(self, scoring_id: str) -> str:
        return self.path("_index", f"{scoring_id}.parquet")


_PRIOR_TYPES = {
    "image_uri": pa.string(),
    "study_uri": pa.string(),
    "prob_abnormal": pa.float32(),
    "error": pa.string(),
    "source_size": pa.int64(),
    "source_etag": pa.string(),
    "scored_at": pa.timestamp("us", tz="UTC"),
}
