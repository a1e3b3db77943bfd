"""The output store of scoring runs: what is committed, what a new run may skip, how a run commits.

Under ``OUTPUT/`` (a folder or an s3:// prefix)::

    images/run_date=D/<run_id>-NNNNN.parquet   image rows of committed runs
    studies/run_date=D/<run_id>.parquet        study rows of committed runs
    _runs/<run_id>.json                        one manifest per run
    _staging/<run_id>/                         a run's files before it commits
    _lock.json                                 the lease of the run in progress

A run writes everything under ``_staging/<run_id>/``. To commit, it writes
its manifest with ``"status": "committing"`` and the list of moves, moves
each staged file to its place (one rename or one object copy per file, so
no reader ever sees a partial file), then rewrites the manifest as
``"committed"``. A run that dies before its manifest leaves only staging,
which the next run deletes; one that dies during its moves is rolled
forward by the next run from the manifest. So the files under ``images/``
and ``studies/`` are those of committed runs, complete, each once; only
between the first move and the last (or, after a crash there, until the
next run) can a reader see part of one run's files.

One run at a time holds ``_lock.json``; a lease whose holder died (same host,
no such process) or that has not been refreshed for ``LEASE_STALE_SECONDS``
is taken over.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from mura_ray import faults
from mura_ray.archive import storage
from mura_ray.errors import UsageError

log = logging.getLogger(__name__)

LEASE_STALE_SECONDS = 600
LEASE_REFRESH_SECONDS = 60
PRIOR_COLUMNS = ["image_uri", "study_uri", "prob_abnormal", "error", "source_size", "source_etag", "scored_at"]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _is_local(fs) -> bool:
    return storage.protocol(fs) in ("file", "local")


def write_atomic(fs, path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one step: a rename on local disk, one PUT in object storage."""
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    if not _is_local(fs):
        with fs.open(path, "wb") as f:
            f.write(data)
        return
    tmp = f"{path}.tmp-{secrets.token_hex(4)}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Lease:
    """``OUTPUT/_lock.json``: which run is writing to this output now."""

    fs: Any
    base: str
    run_id: str
    _last: float = 0.0

    @property
    def path(self) -> str:
        return storage.join(self.base, "_lock.json")

    def _body(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "heartbeat": _now().isoformat(),
        }

    def acquire(self) -> None:
        if self.fs.exists(self.path):
            try:
                held = json.loads(storage.read_bytes(self.fs, self.path))
            except Exception:
                held = {}
            if held and not self._stale(held):
                raise UsageError(
                    f"another scoring run ({held.get('run_id')}, pid {held.get('pid')} on {held.get('host')}) "
                    "is writing "
                    f"to this output (lease {storage.to_uri(self.fs, self.path)}, refreshed {held.get('heartbeat')}); "
                    f"wait for it, or remove that file if it is gone"
                )
            if held:
                log.warning("taking over the lease of run %s, which is no longer running", held.get("run_id"))
        write_atomic(self.fs, self.path, json.dumps(self._body()).encode())
        self._last = time.monotonic()
        held = json.loads(storage.read_bytes(self.fs, self.path))
        if held.get("run_id") != self.run_id:
            raise UsageError(
                f"another scoring run ({held.get('run_id')}) took the lease on this output at the same time"
            )

    @staticmethod
    def _stale(held: dict[str, Any]) -> bool:
        if held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int):
            if not _pid_alive(held["pid"]):
                return True
        try:
            age = (_now() - dt.datetime.fromisoformat(held["heartbeat"])).total_seconds()
        except Exception:
            return True
        return age > LEASE_STALE_SECONDS

    def refresh(self) -> None:
        if time.monotonic() - self._last >= LEASE_REFRESH_SECONDS:
            write_atomic(self.fs, self.path, json.dumps(self._body()).encode())
            self._last = time.monotonic()

    def release(self) -> None:
        try:
            held = json.loads(storage.read_bytes(self.fs, self.path))
            if held.get("run_id") == self.run_id:
                self.fs.rm(self.path)
        except FileNotFoundError:
            pass


@dataclass
class Ledger:
    output: str
    fs: Any = None
    base: str = ""
    _manifests: list[dict[str, Any]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.fs, self.base = storage.filesystem(self.output)

    def path(self, *parts: str) -> str:
        return storage.join(self.base, *parts)

    def staging(self, run_id: str) -> str:
        return self.path("_staging", run_id)

    def manifests(self) -> list[dict[str, Any]]:
        """Every run manifest under ``_runs/``, oldest first."""
        if self._manifests is None:
            runs = self.path("_runs")
            paths = [p for p in (self.fs.ls(runs, detail=False) if self.fs.exists(runs) else []) if p.endswith(".json")]
            blobs = self.fs.cat(paths) if paths else {}
            self._manifests = sorted(
                (json.loads(blobs[p]) for p in paths), key=lambda m: (m.get("started_at", ""), m["run_id"])
            )
        return self._manifests

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        write_atomic(self.fs, self.path("_runs", f"{manifest['run_id']}.json"), json.dumps(manifest, indent=2).encode())
        self._manifests = None

    def recover(self, active_run_id: str) -> dict[str, list[str]]:
        """Roll forward runs that died while committing; delete what dead runs staged. Needs the lease."""
        rolled: list[str] = []
        for manifest in self.manifests():
            if manifest.get("status") == "committing":
                self._finish(manifest)
                rolled.append(manifest["run_id"])
        discarded: list[str] = []
        staging_root = self.path("_staging")
        if self.fs.exists(staging_root):
            for entry in self.fs.ls(staging_root, detail=False):
                run_id = entry.rstrip("/").rsplit("/", 1)[-1]
                if run_id != active_run_id:
                    self.fs.rm(entry, recursive=True)
                    discarded.append(run_id)
        for run_id in rolled:
            log.warning("finished the commit of run %s, which died while committing", run_id)
        for run_id in discarded:
            log.warning("deleted the staged files of run %s, which died before committing", run_id)
        return {"rolled_forward": rolled, "discarded": discarded}

    def _finish(self, manifest: dict[str, Any]) -> None:
        for i, (src, dst) in enumerate(manifest["moves"]):
            src_path, dst_path = self.path(src), self.path(dst)
            if self.fs.exists(src_path):
                self.fs.makedirs(dst_path.rsplit("/", 1)[0], exist_ok=True)
                self.fs.mv(src_path, dst_path)
            elif not self.fs.exists(dst_path):
                raise RuntimeError(
                    f"run {manifest['run_id']}: neither {src} nor {dst} exists; the output was changed by hand"
                )
            if i == 0:
                faults.maybe_kill("commit-move")
        manifest = dict(manifest, status="committed", committed_at=_now().isoformat())
        self._write_manifest(manifest)
        staging = self.staging(manifest["run_id"])
        if self.fs.exists(staging):
            self.fs.rm(staging, recursive=True)

    def commit(self, manifest: dict[str, Any], moves: list[tuple[str, str]]) -> dict[str, Any]:
        """Commit a run: manifest as ``committing``, the moves, manifest as ``committed``.

        ``moves`` are (staged, final) paths relative to the output root.
        """
        manifest = dict(manifest, status="committing", moves=[list(m) for m in moves])
        self._write_manifest(manifest)
        faults.maybe_kill("commit-manifest")
        self._finish(manifest)
        staging_root = self.path("_staging")
        if self.fs.exists(staging_root) and not self.fs.ls(staging_root):
            self.fs.rmdir(staging_root)
        return dict(manifest, status="committed")

    def scored(self, model_id: str) -> pa.Table:
        """The current row (latest ``scored_at``) of each image scored by ``model_id`` in committed runs."""
        files = [
            self.path(dst)
            for m in self.manifests()
            if m.get("status") == "committed" and m.get("model_id") == model_id
            for _, dst in m.get("moves", [])
            if dst.startswith("images/")
        ]
        if not files:
            return pa.table({c: pa.array([], t) for c, t in _PRIOR_TYPES.items()})
        table = pads.dataset(files, filesystem=self.fs, format="parquet").to_table(columns=PRIOR_COLUMNS)
        table = table.sort_by([("image_uri", "ascending"), ("scored_at", "descending")])
        uris = table["image_uri"].combine_chunks()
        first = np.ones(table.num_rows, dtype=bool)
        if table.num_rows > 1:
            first[1:] = pc.not_equal(uris.slice(1), uris.slice(0, table.num_rows - 1)).to_numpy(zero_copy_only=False)
        return table.filter(pa.array(first))


_PRIOR_TYPES = {
    "image_uri": pa.string(),
    "study_uri": pa.string(),
    "prob_abnormal": pa.float32(),
    "error": pa.string(),
    "source_size": pa.int64(),
    "source_etag": pa.string(),
    "scored_at": pa.timestamp("us", tz="UTC"),
}
