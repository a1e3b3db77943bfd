"""The lease and the fenced commit of scoring outputs, on local disk and on the S3 protocol (moto)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mura_ray.errors import UsageError
from mura_ray.scoring.lease import Lease, LeaseLost
from mura_ray.scoring.ledger import Ledger


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    """An empty scoring output, a folder or an s3:// prefix."""
    if request.param == "local":
        return str(tmp_path / "scores")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/scores"


def _race(ledger: Ledger, names: list[str], stale: float = 600) -> tuple[list[Lease], list[str]]:
    """Acquire a lease from each name in its own thread, all released by one barrier; (winners, refusals)."""
    barrier = threading.Barrier(len(names))
    won, refused = [], []

    def take(name: str) -> None:
        fs, base = Ledger(ledger.output).fs, ledger.base  # one filesystem object per contender
        lease = Lease(fs, base, name, stale=stale)
        barrier.wait()
        try:
            lease.acquire()
            won.append(lease)
        except UsageError as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=take, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won, refused


def test_runs_that_start_at_the_same_instant_get_one_lease(output):
    ledger = Ledger(output)
    for round_ in range(5):
        won, refused = _race(ledger, [f"run-{round_}-{i}" for i in range(4)])
        assert len(won) == 1 and len(refused) == 3, refused
        assert all("another scoring run" in r and won[0].run_id in r for r in refused), refused
        won[0].release()


def test_a_paused_holder_loses_its_lease_and_cannot_commit_or_put_itself_back(output):
    ledger = Ledger(output)
    first = Lease(ledger.fs, ledger.base, "run-a", stale=1.0)
    first.acquire()
    first._stop.set()  # as if the process were paused: no more heartbeats
    first._thread.join()
    with pytest.raises(UsageError, match="run-a"):
        Lease(ledger.fs, ledger.base, "run-b", stale=1.0).acquire()  # still fresh
    time.sleep(1.5)
    second = Lease(ledger.fs, ledger.base, "run-c", stale=1.0)
    second.acquire()
    assert second.taken_from["run_id"] == "run-a"
    ledger.fence("run-a", by="run-c", lease=second)

    # The paused run wakes up with a chunk staged and tries to commit it.
    staged = "_staging/run-a/00000/images/part-00000.parquet"
    ledger.fs.makedirs(ledger.path("_staging/run-a/00000/images"), exist_ok=True)
    with ledger.fs.open(ledger.path(staged), "wb") as f:
        pq.write_table(pa.table({"image_uri": ["x"]}), f)
    manifest = {"run_id": "run-a", "chunk": 0, "model_id": "m"}
    with pytest.raises(LeaseLost, match="run-c"):
        Ledger(output).commit(manifest, [(staged, "images/run_date=D/run-a-00000-00.parquet")], first)
    assert not ledger.fs.exists(ledger.path("images"))
    first.release()  # must not write over the new holder's lease
    assert second.newest() == (second.generation, json.loads(ledger.fs.cat_file(second._path(second.generation))))
    assert second.newest()[1]["run_id"] == "run-c"
    second.check()
    # Even without the fence, the old holder's own check stops it before the first step.
    with pytest.raises(LeaseLost):
        first.check()
    second.release()


def test_the_heartbeat_keeps_a_run_without_batches_alive(output):
    ledger = Ledger(output)
    holder = Lease(ledger.fs, ledger.base, "run-slow", stale=1.0)
    holder.acquire()
    time.sleep(2.5)  # longer than the lease's staleness, with no batch and no commit
    with pytest.raises(UsageError, match="run-slow"):
        Lease(ledger.fs, ledger.base, "run-next", stale=1.0).acquire()
    holder.check()
    holder.release()
    Lease(ledger.fs, ledger.base, "run-next", stale=1.0).acquire()


def test_a_lease_left_by_a_process_that_no_longer_exists_is_taken_over(tmp_path):
    ledger = Ledger(str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lease = Lease(ledger.fs, ledger.base, "run-dead")
    lease.acquire()
    lease._stop.set()
    path = lease._path(lease.generation)
    body = json.loads(ledger.fs.cat_file(path))
    ledger.fs.pipe_file(path, json.dumps(dict(body, pid=int(dead.stdout))).encode())
    taker = Lease(ledger.fs, ledger.base, "run-live")
    taker.acquire()
    assert taker.taken_from["run_id"] == "run-dead"
    taker.release()


def test_a_run_id_is_used_once_per_output(tmp_path):
    ledger = Ledger(str(tmp_path))
    lease = Lease(ledger.fs, ledger.base, "nightly")
    lease.acquire()
    ledger.commit({"run_id": "nightly", "chunk": 0, "model_id": "m"}, [], lease)
    lease.release()
    with pytest.raises(UsageError, match="already used"):
        Ledger(str(tmp_path)).check_new_run_id("nightly")
    Ledger(str(tmp_path)).check_new_run_id("nightly-2")


def test_staged_files_and_their_folders_reach_the_disk_before_the_manifest_says_committed(tmp_path, monkeypatch):
    import os

    from mura_ray.archive import storage
    from mura_ray.archive.catalog import CATALOG_SCHEMA
    from mura_ray.scoring.writer import RunWriter

    events = []
    real_fsync, real_write = os.fsync, storage.write_atomic

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def write_atomic(fs, path, data):
        events.append(("write", path, json.loads(data).get("status") if path.endswith(".json") else None))
        real_write(fs, path, data)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(storage, "write_atomic", write_atomic)
    ledger = Ledger(str(tmp_path))
    lease = Lease(ledger.fs, ledger.base, "run-1")
    lease.acquire()
    uris = [f"/archive/XR_HAND/patient1/study1_positive/image{i}.png" for i in range(3)]
    catalog = pa.Table.from_pylist(
        [dict(image_uri=u, study_uri=u.rsplit("/", 1)[0], label=1, source_size=10, source_etag="e") for u in uris],
        schema=CATALOG_SCHEMA,
    )
    writer = RunWriter(ledger, lease, catalog, ledger.scored("m"), "run-1", "m", 0.5, "2026-11-28")
    results = {"image_uri": uris, "prob_abnormal": [0.1, 0.9, None], "error": [None, None, "bad"]}
    engine = {"backend": ["torch", "torch", None], "precision": ["fp32", "fp32", None]}
    writer.add(pa.table(dict(results, modality=["", "", ""], **engine), schema=None))
    writer.commit({})
    lease.release()
    committed = next(i for i, e in enumerate(events) if e[0] == "write" and e[2] == "committed")
    synced = {e[1] for e in events[:committed] if e[0] == "fsync"}
    manifest = json.loads((tmp_path / "_runs" / "run-1.00000.json").read_text())
    staged = {str(tmp_path / src) for src, _ in manifest["moves"]}
    assert len(staged) == 2 and staged <= synced  # the images and studies files, before the commit
    assert str(tmp_path / "images" / "run_date=2026-11-28") in synced  # the renames into images/
    assert str(tmp_path / "studies" / "run_date=2026-11-28") in synced
    assert len(pq.read_table(tmp_path / "images" / "run_date=2026-11-28" / "run-1-00000-00.parquet")) == 3
