"""The scores' Delta table (``scoring.delta``) on local disk and on moto S3: real deltalake, real processes, no Ray.

Each test reads back with a reader other than the store where it can:
DuckDB over the Arrow dataset of a snapshot, or deltalake's own
``DeltaTable``.
"""

from __future__ import annotations

import datetime as dt
import http.client
import http.server
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable

from mura_ray.errors import UsageError
from mura_ray.scoring import delta
from mura_ray.scoring.delta import CommitConflict, ScoreStore
from mura_ray.scoring.schemas import INDEX_SCHEMA, PRIOR_COLUMNS, STUDIES_SCHEMA
from mura_ray.scoring.writer import IMAGES_SCHEMA

SID = "scoring-1"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def images(uris: list[str], run_id: str, prob: float, *, study: str = "study-1", at: dt.datetime | None = None):
    n = len(uris)
    at = at or dt.datetime.now(dt.timezone.utc)
    return pa.table(
        {
            "image_uri": uris,
            "study_uri": [study] * n,
            "patient_id": ["patient00001"] * n,
            "body_part": ["XR_WRIST"] * n,
            "label": pa.array([1] * n, pa.int8()),
            "prob_abnormal": pa.array([prob] * n, pa.float32()),
            "predicted_abnormal": [prob >= 0.5] * n,
            "threshold": pa.array([0.5] * n, pa.float32()),
            "model_id": ["model-1"] * n,
            "scoring_id": [SID] * n,
            "run_id": [run_id] * n,
            "scored_at": pa.array([at] * n, pa.timestamp("us", tz="UTC")),
            "source_size": pa.array([100] * n, pa.int64()),
            "source_etag": ["etag"] * n,
            "error": pa.nulls(n, pa.string()),
            "backend": ["openvino"] * n,
            "precision": ["fp32"] * n,
        },
        schema=IMAGES_SCHEMA,
    )


def studies(names: list[str], run_id: str, prob: float, n_images: int = 2):
    n = len(names)
    return pa.table(
        {
            "study_uri": names,
            "patient_id": ["patient00001"] * n,
            "body_part": ["XR_WRIST"] * n,
            "n_images": pa.array([n_images] * n, pa.int32()),
            "n_errors": pa.array([0] * n, pa.int32()),
            "prob_abnormal": pa.array([prob] * n, pa.float32()),
            "predicted_abnormal": [prob >= 0.5] * n,
            "label": pa.array([1] * n, pa.int8()),
            "model_id": ["model-1"] * n,
            "scoring_id": [SID] * n,
            "run_id": [run_id] * n,
            "scored_at": pa.array([dt.datetime.now(dt.timezone.utc)] * n, pa.timestamp("us", tz="UTC")),
        },
        schema=STUDIES_SCHEMA,
    )


def heatmaps(uris: list[str], study: str):
    n = len(uris)
    return (
        pa.table(
            {
                "image_uri": uris,
                "study_uri": [study] * n,
                "heatmap": [f"heatmaps/{u}.heatmap.png" for u in uris],
                "prob_abnormal": pa.array([0.9] * n, pa.float32()),
                "peak_x": pa.array([0.5] * n, pa.float32()),
                "peak_y": pa.array([0.5] * n, pa.float32()),
                "layer": ["layer4"] * n,
                "model_id": ["model-1"] * n,
                "error": pa.nulls(n, pa.string()),
            },
            schema=INDEX_SCHEMA,
        )
        .append_column("source_size", pa.array([100] * n, pa.int64()))
        .append_column("source_etag", pa.array(["etag"] * n))
    )


@pytest.fixture
def bucket(s3_server):
    import boto3

    name = f"delta-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    return f"s3://{request.getfixturevalue('bucket')}/out"


def _duckdb_rows(store: ScoreStore, kind: str, version: int | None = None) -> list[tuple]:
    """(key, run_id, prob_abnormal) of one kind, read by DuckDB over the Arrow dataset of one snapshot."""
    table = DeltaTable(store.uri, storage_options=store.storage_options or None, version=version)
    scores = table.to_pyarrow_dataset(filesystem=store.arrow_filesystem())  # noqa: F841 (read by DuckDB)
    return duckdb.sql(
        f"SELECT key, run_id, round(prob_abnormal::DOUBLE, 3) FROM scores WHERE kind = '{kind}' ORDER BY key"
    ).fetchall()


def test_a_retried_commit_is_one_set_of_rows(output):
    store = ScoreStore(output)
    rows = {"images": images(["a", "b"], "r1", 0.2), "studies": studies(["study-1"], "r1", 0.2)}
    first = store.commit_chunk(run_id="r1", scoring_id=SID, chunk=0, **rows)
    again = store.commit_chunk(run_id="r1", scoring_id=SID, chunk=0, **rows)
    later = ScoreStore(output).commit_chunk(run_id="r1", scoring_id=SID, chunk=1, images=images(["c"], "r1", 0.3))
    stale = ScoreStore(output).commit_chunk(run_id="r1", scoring_id=SID, chunk=0, images=images(["z"], "r1", 0.3))

    assert (first.applied, again.applied, later.applied, stale.applied) == (True, False, True, False)
    assert again.version == first.version and stale.version == later.version
    assert _duckdb_rows(store, "image") == [("a", "r1", 0.2), ("b", "r1", 0.2), ("c", "r1", 0.3)]
    assert _duckdb_rows(store, "study") == [("study-1", "r1", 0.2)]
    assert store.last_chunk("r1") == 1 and store.last_chunk("r2") is None
    if not store.remote:  # deltalake 1.6's history() holds the GIL while it lists, and this moto runs in-process
        merges = [h for h in store.history() if h["operation"] == "MERGE"]
        assert [(h["mura_ray.run_id"], h["mura_ray.chunk"]) for h in merges] == [("r1", 1), ("r1", 0)]


def test_a_rescore_replaces_the_current_row_whatever_its_clock_and_time_travel_keeps_the_old(output):
    store = ScoreStore(output)
    rows = {"images": images(["a", "b"], "r1", 0.2), "studies": studies(["study-1"], "r1", 0.2)}
    v1 = store.commit_chunk(run_id="r1", scoring_id=SID, chunk=0, **rows).version
    slow_clock = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=3)  # the rescoring driver's clock is 3 h slow
    store.commit_chunk(
        run_id="r2",
        scoring_id=SID,
        chunk=0,
        images=images(["b"], "r2", 0.9, at=slow_clock),
        studies=studies(["study-1"], "r2", 0.55),
        heatmaps=heatmaps(["b"], "study-1"),
    )

    assert _duckdb_rows(store, "image") == [("a", "r1", 0.2), ("b", "r2", 0.9)]
    assert _duckdb_rows(store, "study") == [("study-1", "r2", 0.55)]
    assert _duckdb_rows(store, "image", version=v1) == [("a", "r1", 0.2), ("b", "r1", 0.2)]
    scored = store.scored(SID).sort_by("image_uri")
    assert scored.column_names == PRIOR_COLUMNS  # what Ledger.scored returns, for plan_run
    assert scored["prob_abnormal"].to_pylist() == pytest.approx([0.2, 0.9])
    assert store.scored("another-scoring-id").num_rows == 0
    # Each kind reads back with the columns and types of the Parquet files of before.
    snapshot = store.snapshot()
    assert snapshot["image"].schema == IMAGES_SCHEMA and snapshot["study"].schema == STUDIES_SCHEMA
    assert snapshot["heatmap"].select(INDEX_SCHEMA.names).schema == INDEX_SCHEMA
    assert snapshot["heatmap"]["run_id"].to_pylist() == ["r2"]


def test_retract_removes_a_runs_rows_in_one_commit_so_they_are_scored_again(output):
    store = ScoreStore(output)
    store.commit_chunk(run_id="r1", scoring_id=SID, chunk=0, images=images(["a", "b"], "r1", 0.2))
    store.commit_chunk(
        run_id="r2",
        scoring_id=SID,
        chunk=0,
        images=images(["b", "c"], "r2", 0.9),
        studies=studies(["study-1"], "r2", 0.9),
        heatmaps=heatmaps(["c"], "study-1"),
    )
    before = store.table().version()

    assert store.retract("r2") == 4
    assert store.table().version() == before + 1
    assert store.scored(SID)["image_uri"].to_pylist() == ["a"]  # b's row of r1 was replaced, so b is scored again
    assert all(store.view(kind).num_rows == 0 for kind in ("study", "heatmap"))
    assert sorted(store.view("image", version=before)["image_uri"].to_pylist()) == ["a", "b", "c"]


def test_two_writers_at_the_same_instant_leave_one_current_row_per_image(output):
    uris = [f"img-{i}" for i in range(50)]
    ScoreStore(output).commit_chunk(run_id="r0", scoring_id=SID, chunk=0, images=images(["seed"], "r0", 0.1))
    for round_ in range(3):
        barrier = threading.Barrier(2)
        results: dict[str, object] = {}

        def write(run_id: str, prob: float, barrier: threading.Barrier, results: dict) -> None:
            store = ScoreStore(output)
            store._writable()  # opened before the barrier, so both read the same snapshot
            barrier.wait()
            try:
                results[run_id] = store.commit_chunk(
                    run_id=run_id,
                    scoring_id=SID,
                    chunk=0,
                    images=images(uris, run_id, prob),
                    studies=studies(["study-1"], run_id, prob, 50),
                )
            except Exception as exc:
                results[run_id] = exc

        runs = [(f"a{round_}", 0.25), (f"b{round_}", 0.75)]
        threads = [threading.Thread(target=write, args=(*run, barrier, results)) for run in runs]
        [t.start() for t in threads]
        [t.join() for t in threads]

        commits = sorted(results.values(), key=lambda c: c.version)
        assert all(c.applied for c in commits), results
        assert sorted(c.attempts for c in commits)[-1] >= 2  # one lost the race and committed again on top
        rows = ScoreStore(output).snapshot()
        assert rows["image"].num_rows == len(uris) + 1
        assert pc.count_distinct(rows["image"]["image_uri"]).as_py() == len(uris) + 1
        later = commits[-1].run_id
        assert set(rows["image"].filter(pc.field("image_uri") != "seed")["run_id"].to_pylist()) == {later}
        assert rows["study"]["run_id"].to_pylist() == [later]


def test_a_writer_that_keeps_losing_stops_with_one_line(output, monkeypatch):
    store = ScoreStore(output)
    store.commit_chunk(run_id="r0", scoring_id=SID, chunk=0, images=images(["a"], "r0", 0.1))
    rival = ScoreStore(output)
    monkeypatch.setattr(delta, "ATTEMPTS", 2)
    real = store._writable

    def rival_commits_first():  # between this writer's read and its commit, the rival commits each time
        table = real()
        run_id = f"rival-{uuid.uuid4().hex[:6]}"
        rival.commit_chunk(run_id=run_id, scoring_id=SID, chunk=0, images=images(["a"], run_id, 0.5))
        return table

    monkeypatch.setattr(store, "_writable", rival_commits_first)
    with pytest.raises(CommitConflict) as caught:
        store.commit_chunk(run_id="r1", scoring_id=SID, chunk=0, images=images(["a"], "r1", 0.9))
    assert "\n" not in str(caught.value) and "chunk 0 of run r1 was not committed" in str(caught.value)
    assert "r1" not in rival.view("image")["run_id"].to_pylist()


def test_a_reader_polling_during_commits_sees_whole_chunks_only(tmp_path):
    store = ScoreStore(str(tmp_path / "out"))
    per_chunk, chunks = 40, 12
    store.commit_chunk(run_id="r0", scoring_id=SID, chunk=0, images=images(["seed"], "r0", 0.1))
    done = threading.Event()
    seen: list[tuple[int, dict]] = []

    def read() -> None:
        while not done.is_set():
            table = DeltaTable(store.uri)
            scores = table.to_pyarrow_dataset(filesystem=store.arrow_filesystem())  # noqa: F841 (read by DuckDB)
            counts = duckdb.sql(
                "SELECT kind, study_uri, count(*) FROM scores WHERE run_id = 'r1' GROUP BY ALL"
            ).fetchall()
            seen.append((table.version(), {(kind, study): n for kind, study, n in counts}))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for c in range(chunks):
            uris = [f"chunk{c:02d}/img{i:03d}" for i in range(per_chunk)]
            store.commit_chunk(
                run_id="r1",
                scoring_id=SID,
                chunk=c,
                images=images(uris, "r1", 0.6, study=f"study-{c:02d}"),
                studies=studies([f"study-{c:02d}"], "r1", 0.6, per_chunk),
                heatmaps=heatmaps(uris[:3], f"study-{c:02d}"),
            )
    finally:
        done.set()
        reader.join()

    versions = {v for v, _ in seen}
    assert len(versions) >= 4, f"the reader saw only versions {sorted(versions)}"
    for version, counts in seen:
        chunks_seen = {study for kind, study in counts if kind == "image"}
        assert {study for kind, study in counts if kind == "study"} == chunks_seen, (version, counts)
        assert {study for kind, study in counts if kind == "heatmap"} == chunks_seen, (version, counts)
        for study in chunks_seen:
            assert (counts[("image", study)], counts[("study", study)], counts[("heatmap", study)]) == (per_chunk, 1, 3)
    print(f"reader: {len(seen)} snapshots of {len(versions)} versions, every one whole chunks")


KILLED_WRITER = """
import sys, time
sys.path.insert(0, {repo!r})
sys.path.insert(0, {tests!r})
from test_delta import images, studies, SID
from mura_ray.scoring.delta import ScoreStore
store = ScoreStore({out!r})
for c in range(1000):
    uris = [f"chunk{{c:03d}}/img{{i:05d}}" for i in range(20000)]
    rows = images(uris, "r1", 0.5, study=f"s{{c}}"), studies([f"s{{c}}"], "r1", 0.5, 20000)
    print("begin", c, flush=True)
    t0 = time.monotonic()
    store.commit_chunk(run_id="r1", scoring_id=SID, chunk=c, images=rows[0], studies=rows[1])
    print("committed", c, time.monotonic() - t0, flush=True)
"""


@pytest.mark.parametrize("fraction", [0.5, 0.95, 1.1])
def test_a_writer_killed_in_a_commit_leaves_the_table_at_its_last_commit(tmp_path, fraction):
    """The writer is killed in its fourth commit, ``fraction`` of its third's duration into it."""
    out = str(tmp_path / "out")
    code = KILLED_WRITER.format(repo=REPO, tests=os.path.join(REPO, "tests"), out=out)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        seconds = 0.0
        for line in child.stdout:
            if line.startswith("committed 2 "):
                seconds = float(line.split()[2])
            if line.split() == ["begin", "3"]:
                break
        time.sleep(fraction * seconds)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL

    store = ScoreStore(out)
    last = store.last_chunk("r1")
    assert last in (2, 3)
    snapshot = store.snapshot()
    per_study = pc.value_counts(snapshot["image"]["study_uri"]).to_pylist()
    assert sorted((c["values"], c["counts"]) for c in per_study) == [(f"s{c}", 20000) for c in range(last + 1)]
    assert sorted(snapshot["study"]["study_uri"].to_pylist()) == [f"s{c}" for c in range(last + 1)]
    after = store.commit_chunk(run_id="r1", scoring_id=SID, chunk=last + 1, images=images(["next"], "r1", 0.5))
    assert after.applied and store.last_chunk("r1") == last + 1
    # The killed commit's data files, if it wrote any, are named by no commit: a full vacuum's to delete.
    table = store.table()
    named = {os.path.basename(p) for p in table.file_uris()}
    on_disk = {f for root, _, files in os.walk(store.uri) if "_delta_log" not in root for f in files}
    orphans = {f for f in on_disk if f.endswith(".parquet") and f not in named}
    listed = table.vacuum(retention_hours=0, dry_run=True, enforce_retention_duration=False, full=True)
    assert orphans <= {os.path.basename(p) for p in listed}
    assert store.vacuum(dry_run=True) == []  # within the retention, nothing goes: it could be a live writer's
    print(f"killed {fraction * seconds:.2f}s into chunk 3: table at chunk {last}, {len(orphans)} orphan data file(s)")


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_a_damaged_checkpoint_is_set_aside_and_the_table_read_from_its_commits(tmp_path, damage, caplog):
    store = ScoreStore(str(tmp_path / "out"))
    for c in range(4):
        store.commit_chunk(run_id="r1", scoring_id=SID, chunk=c, images=images([f"img{c}"], "r1", 0.5))
    store.table().create_checkpoint()
    store.commit_chunk(run_id="r1", scoring_id=SID, chunk=4, images=images(["img4"], "r1", 0.5))
    log_dir = os.path.join(store.uri, "_delta_log")
    (checkpoint,) = [f for f in os.listdir(log_dir) if ".checkpoint." in f]
    path = os.path.join(log_dir, checkpoint)
    if damage == "truncated":
        data = open(path, "rb").read()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
    else:
        os.remove(path)

    with pytest.raises(Exception, match="[Cc]heckpoint|Parquet"):  # delta-rs 1.6 does not fall back by itself
        DeltaTable(store.uri)
    with caplog.at_level(logging.WARNING, logger="mura_ray.scoring.delta"):
        first_read = ScoreStore(store.output).scored(SID)  # the first read meets the damage and repairs it

    assert sorted(first_read["image_uri"].to_pylist()) == [f"img{c}" for c in range(5)]
    set_aside = os.listdir(os.path.join(store.output, "scores", "_damaged"))
    assert "_last_checkpoint" in set_aside and (damage == "deleted" or checkpoint in set_aside)
    (line,) = [r.getMessage() for r in caplog.records if "set aside" in r.getMessage()]
    assert "_last_checkpoint" in line and "wrote a fresh checkpoint" in line
    table = DeltaTable(store.uri)
    assert table.transaction_version(delta.app_id("r1")) == 4
    assert sorted(store.scored(SID)["image_uri"].to_pylist()) == [f"img{c}" for c in range(5)]
    resumed = ScoreStore(store.output).commit_chunk(
        run_id="r1", scoring_id=SID, chunk=5, images=images(["img5"], "r1", 0.5)
    )
    assert resumed.applied


class _DropConditions(http.server.BaseHTTPRequestHandler):
    """Forwards every request to the S3 server behind it, less If-None-Match and If-Match: an endpoint
    that ignores conditional writes."""

    target: tuple[str, int] = ("127.0.0.1", 0)
    protocol_version = "HTTP/1.1"  # so that a PUT's "Expect: 100-continue" is answered

    dropped = ("if-none-match", "if-match")

    def _forward(self) -> None:
        self._relay(self.dropped)

    def _send(self) -> http.client.HTTPResponse:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in (*self.dropped, "expect")}
        conn = http.client.HTTPConnection(*self.target, timeout=30)
        conn.request(self.command, self.path, body=body, headers=headers)
        return conn.getresponse()

    def _relay(self, dropped: tuple[str, ...]) -> None:
        reply = self._send()
        data = reply.read()
        self.send_response(reply.status)
        for k, v in reply.getheaders():
            if k.lower() not in ("transfer-encoding", "connection") and (k.lower() != "content-length" or not data):
                self.send_header(k, v)
        if data:
            self.send_header("Content-Length", str(len(data)))
        elif reply.getheader("Content-Length") is None:
            self.send_header("Content-Length", "0")
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    def log_message(self, *args) -> None:
        pass


def test_an_endpoint_without_conditional_writes_is_refused(s3_server, bucket, monkeypatch):
    host, port = s3_server.rsplit("/", 1)[-1].split(":")
    handler = type("Handler", (_DropConditions,), {"target": (host, int(port))})
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.server_address[1]}")
        with pytest.raises(UsageError) as caught:
            ScoreStore(f"s3://{bucket}/ignoring").commit_chunk(
                run_id="r1", scoring_id=SID, chunk=0, images=images(["a"], "r1", 0.5)
            )
        message = str(caught.value)
        assert "\n" not in message and "does not honour conditional writes" in message
        assert ScoreStore(f"s3://{bucket}/ignoring").table() is None  # refused before anything was written
    finally:
        proxy.shutdown()
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    delta.check_conditional_writes(f"s3://{bucket}/honouring")  # moto itself answers 412: accepted


class _LoseCommitReply(_DropConditions):
    """Forwards everything, conditions included; the reply to the first PUT of a Delta commit file after
    ``armed`` is set is lost (the connection closes once the server stored it), so the client sends it again."""

    dropped = ()
    lost: list[str] = []
    armed = threading.Event()

    def _forward(self) -> None:
        is_commit = self.command == "PUT" and self.path.split("?")[0].endswith(".json") and "/_delta_log/" in self.path
        if not (is_commit and self.armed.is_set()):
            return self._relay(())
        self.armed.clear()
        self.lost.append(f"{self.path.split('?')[0].rsplit('/', 1)[-1]} stored with {self._send().status}")
        self.close_connection = True  # no reply at all

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward


def test_a_commit_whose_reply_was_lost_is_committed_once(s3_server, bucket, monkeypatch):
    host, port = s3_server.rsplit("/", 1)[-1].split(":")
    handler = type("Handler", (_LoseCommitReply,), {"target": (host, int(port)), "lost": []})
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.server_address[1]}")
        store = ScoreStore(f"s3://{bucket}/out")
        store.commit_chunk(run_id="r1", scoring_id=SID, chunk=0, images=images(["a"], "r1", 0.5))
        handler.armed.set()
        commit = store.commit_chunk(run_id="r1", scoring_id=SID, chunk=1, images=images(["b", "c"], "r1", 0.5))
        assert handler.lost and not handler.armed.is_set(), "no commit reply was lost"
        version, last, scored = store.table().version(), store.last_chunk("r1"), store.scored(SID)
    finally:
        proxy.shutdown()  # the store's endpoint is the proxy: nothing of it is used after this
    print(f"reply lost: {handler.lost}; {commit}")
    assert commit.applied and commit.attempts == 2 and last == 1
    assert version == 2  # the table's versions: create, chunk 0, chunk 1, and no second copy of chunk 1
    assert sorted(scored["image_uri"].to_pylist()) == ["a", "b", "c"]


RIVAL_WRITER = """
import os, sys, time
sys.path.insert(0, {repo!r})
sys.path.insert(0, {tests!r})
from test_delta import images, studies, SID
from mura_ray.scoring.delta import ScoreStore
store = ScoreStore({out!r})
store._writable()
uris = [f"img-{{i}}" for i in range(200)]
rows = images(uris, {run!r}, {prob}), studies(["study-1"], {run!r}, {prob}, 200)
print("ready", flush=True)
while not os.path.exists({go!r}):
    pass
commit = store.commit_chunk(run_id={run!r}, scoring_id=SID, chunk=0, images=rows[0], studies=rows[1])
print("committed", commit.version, commit.attempts, flush=True)
"""


def test_two_processes_at_the_same_instant_leave_one_current_row_per_image(tmp_path):
    out, go = str(tmp_path / "out"), str(tmp_path / "go")
    ScoreStore(out).commit_chunk(run_id="r0", scoring_id=SID, chunk=0, images=images(["seed"], "r0", 0.1))
    tests = os.path.join(REPO, "tests")
    children = [
        subprocess.Popen(
            [sys.executable, "-c", RIVAL_WRITER.format(repo=REPO, tests=tests, out=out, run=run, prob=p, go=go)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for run, p in (("a", 0.25), ("b", 0.75))
    ]
    assert [c.stdout.readline().strip() for c in children] == ["ready", "ready"]
    open(go, "w").close()  # both spin on this file, so they commit at the same instant
    lines = [c.communicate(timeout=60)[0].split() for c in children]
    assert [c.returncode for c in children] == [0, 0]

    versions = sorted((int(line[1]), int(line[2]), run) for line, run in zip(lines, "ab"))
    assert [v for v, _, _ in versions] == [2, 3]  # both committed, one on top of the other
    rows = ScoreStore(out).snapshot()
    assert rows["image"].num_rows == 201 and pc.count_distinct(rows["image"]["image_uri"]).as_py() == 201
    later = versions[1][2]
    assert set(rows["image"].filter(pc.field("image_uri") != "seed")["run_id"].to_pylist()) == {later}
    assert rows["study"]["run_id"].to_pylist() == [later]
    print(f"processes: (version, attempts, run) = {versions}")
