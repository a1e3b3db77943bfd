"""Which scoring run may write to an output: an exclusive lease with a fencing generation.

The lease is a series of files ``OUTPUT/_lease/<generation>.json``. A run
takes the lease by *creating* the next generation's file, an operation that
only one creator can win: a conditional PUT (``If-None-Match: *``) in object
storage, a hard link onto a name that must not exist on local disk. Two runs
that start at the same instant both try to create generation N+1; one gets
it, the other stops naming the winner.

The holder's heartbeat thread rewrites its own generation's file every
``refresh`` seconds, whether or not batches arrive. A lease whose heartbeat
is older than ``stale`` seconds (or whose process is gone, on this host) may
be taken over: the taker creates generation N+1, and from then on the old
holder's generation is not the newest. The generation is the fencing token:
the holder checks it before every commit step (``check``), and the taker
fences the old run's next commit in the ledger (``Ledger.fence``), so a run
that lost its lease, however long it was paused, makes no row visible.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

from mura_ray.archive import storage
from mura_ray.errors import UsageError

log = logging.getLogger(__name__)

LEASE_STALE_SECONDS = float(os.environ.get("MURA_RAY_LEASE_SECONDS", 600))
KEEP_GENERATIONS = 8


class LeaseLost(UsageError):
    """Another run took this run's lease over: this run must not commit anything more."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(held: dict[str, Any], stale_seconds: float) -> bool:
    """Whether a lease body no longer stands for a live run."""
    if held.get("released"):
        return True
    if held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int):
        if not _pid_alive(held["pid"]):
            return True
    try:
        age = (_now() - dt.datetime.fromisoformat(held["heartbeat"])).total_seconds()
    except Exception:
        return True
    return age > stale_seconds


@dataclass
class Lease:
    """The lease of one run on ``OUTPUT`` (``fs``, ``base``)."""

    fs: Any
    base: str
    run_id: str
    stale: float = LEASE_STALE_SECONDS
    generation: int = 0
    taken_from: dict[str, Any] | None = None  # the body of the stale lease this run took over
    lost: dict[str, Any] | None = None  # set by the heartbeat when a newer generation appears
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def folder(self) -> str:
        return storage.join(self.base, "_lease")

    def _path(self, generation: int) -> str:
        return storage.join(self.folder, f"{generation:012d}.json")

    def _body(self, **extra: Any) -> bytes:
        body = {
            "run_id": self.run_id,
            "generation": self.generation,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "heartbeat": _now().isoformat(),
            **extra,
        }
        return json.dumps(body).encode()

    def newest(self) -> tuple[int, dict[str, Any] | None]:
        """The newest generation and its body (0, None when no run ever held the lease)."""
        self.fs.invalidate_cache(self.folder)
        names = self.fs.ls(self.folder, detail=False) if self.fs.exists(self.folder) else []
        gens = sorted(int(n.rsplit("/", 1)[-1][:-5]) for n in names if n.endswith(".json") and n[-17:-5].isdigit())
        if not gens:
            return 0, None
        try:
            return gens[-1], json.loads(storage.read_bytes(self.fs, self._path(gens[-1])))
        except (FileNotFoundError, ValueError):
            return gens[-1], {}  # unreadable: counts as stale, never as free of a holder

    def acquire(self) -> None:
        """Take the lease or raise ``UsageError`` naming the run that holds it."""
        gen, held = self.newest()
        if held is not None and not is_stale(held, self.stale):
            raise UsageError(
                f"another scoring run ({held.get('run_id')}, pid {held.get('pid')} on {held.get('host')}) "
                f"is writing to this output (lease {storage.to_uri(self.fs, self._path(gen))}, "
                f"heartbeat {held.get('heartbeat')}); wait for it to finish"
            )
        self.generation = gen + 1
        try:
            storage.create_exclusive(self.fs, self._path(self.generation), self._body())
        except FileExistsError:
            try:
                winner = json.loads(storage.read_bytes(self.fs, self._path(self.generation))).get("run_id")
            except Exception:
                winner = "unknown"
            raise UsageError(
                f"another scoring run ({winner}) took the lease on this output at the same instant; "
                "it is writing there now"
            ) from None
        if held is not None and not held.get("released"):
            self.taken_from = held if held.get("run_id") else None
            log.warning("took over the lease of run %s, whose heartbeat stopped", held.get("run_id"))
        self._prune()
        self._thread = threading.Thread(target=self._beat, name="mura-ray-lease", daemon=True)
        self._thread.start()

    def _prune(self) -> None:
        for gen in range(max(1, self.generation - 64), self.generation - KEEP_GENERATIONS):
            try:
                self.fs.rm(self._path(gen))
            except FileNotFoundError:
                pass

    def _beat(self) -> None:
        interval = max(0.2, self.stale / 10)
        while not self._stop.wait(interval):
            try:
                gen, held = self.newest()
                if gen != self.generation:
                    self.lost = held or {"run_id": "unknown"}
                    return
                storage.write_atomic(self.fs, self._path(self.generation), self._body())
            except Exception as exc:  # storage hiccup: the next beat tries again
                log.warning("lease heartbeat failed: %s", exc)

    def check(self) -> None:
        """Raise ``LeaseLost`` unless this run's generation is still the newest (the fencing check)."""
        if self.lost is None:
            gen, held = self.newest()
            if gen != self.generation:
                self.lost = held or {"run_id": "unknown"}
        if self.lost is not None:
            raise LeaseLost(
                f"run {self.run_id} lost its lease on this output to run {self.lost.get('run_id')} "
                f"(its heartbeat was older than {self.stale:g}s); it stopped before making more rows visible"
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.generation and self.lost is None:
            try:
                if self.newest()[0] == self.generation:
                    storage.write_atomic(self.fs, self._path(self.generation), self._body(released=True))
            except Exception as exc:
                log.warning("could not release the lease: %s", exc)
