"""Nightly scoring under two runs at once, a paused run, a killed run and a model that changes under
a run: real `mura-ray score` processes on the shared Ray cluster, real signals, Parquet read by DuckDB."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import duckdb
import numpy as np
import pytest
import torch

from mura_ray.archive.catalog import build_catalog
from mura_ray.archive.sample import write_sample
from mura_ray.imaging.preprocess import EvalPreset, load_square
from mura_ray.model.checkpoint import load_checkpoint
from mura_ray.model.resnet import build_model, for_inference
from mura_ray.model.steps import score_step


def _start(ray_address, model, archive, out, *args, fault=None, lease_seconds=None):
    env = dict(os.environ, RAY_ADDRESS=ray_address, PYTHONUNBUFFERED="1")
    env.pop("MURA_RAY_FAULT", None)
    if fault:
        env["MURA_RAY_FAULT"] = fault
    if lease_seconds:
        env["MURA_RAY_LEASE_SECONDS"] = str(lease_seconds)
    cmd = [sys.executable, "-m", "mura_ray.cli", "score", "--model", model, "--data", archive, "--out", out, *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _rows(out):
    """(rows, distinct images, distinct run ids) of the committed image rows, read by DuckDB."""
    if not glob.glob(f"{out}/images/**/*.parquet", recursive=True):
        return 0, 0, []
    con = duckdb.connect()
    query = f"FROM read_parquet('{out}/images/**/*.parquet')"
    total, distinct = con.execute(f"SELECT count(*), count(DISTINCT image_uri) {query}").fetchone()
    runs = [r[0] for r in con.execute(f"SELECT DISTINCT run_id {query} ORDER BY 1").fetchall()]
    return total, distinct, runs


def _wait_stopped(proc, timeout=120):
    """Wait for the durable fact that the process stopped itself (state T in /proc)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{proc.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    raise AssertionError("the run never paused")


@pytest.fixture
def archive(tmp_path):
    root = str(tmp_path / "archive")
    write_sample(root, studies=6, seed=5)
    return root, build_catalog(root).num_rows


@pytest.mark.timeout(600)
@pytest.mark.parametrize("backend", ["local", "s3"])
def test_two_runs_started_at_the_same_instant_one_scores_and_the_other_exits_2(
    backend, ray_address, untrained_models, archive, tmp_path, request
):
    (model, _), _ = untrained_models
    root, n = archive
    if backend == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        out = f"s3://{bucket}/scores"
    else:
        out = str(tmp_path / "scores")
    runs = [_start(ray_address, model, root, out, "--run-id", name) for name in ("night-a", "night-b")]
    results = [_finish(p) for p in runs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], [r[2][-2000:] for r in results]
    winner = "night-a" if results[0][0] == 0 else "night-b"
    loser = results[1] if winner == "night-a" else results[0]
    assert f"another scoring run ({winner}" in loser[2] and "Traceback" not in loser[2]
    if backend == "s3":
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"])
        fs.get(f"{out}/", str(tmp_path / "copy") + "/", recursive=True)
        out = str(tmp_path / "copy")
    assert _rows(out) == (n, n, [winner])


@pytest.mark.timeout(600)
def test_a_run_paused_past_its_lease_makes_nothing_visible_when_it_wakes(
    ray_address, untrained_models, archive, tmp_path
):
    (model, _), _ = untrained_models
    root, n = archive
    out = str(tmp_path / "scores")
    paused = _start(ray_address, model, root, out, "--run-id", "paused", fault="pause-after-lease", lease_seconds=2)
    _wait_stopped(paused)
    time.sleep(3)  # longer than the lease: its heartbeat is stale now
    code, stdout, stderr = _finish(_start(ray_address, model, root, out, "--run-id", "second", lease_seconds=2))
    assert code == 0, stderr[-3000:]
    assert f"scored {n}, skipped 0" in stdout
    os.kill(paused.pid, signal.SIGCONT)
    code, _, stderr = _finish(paused)
    assert code == 2, stderr[-3000:]
    assert "lost its lease" in stderr and "second" in stderr and "Traceback" not in stderr
    assert _rows(out) == (n, n, ["second"])
    manifests = [json.load(open(p)) for p in glob.glob(f"{out}/_runs/*.json")]
    assert {(m["run_id"], m["status"]) for m in manifests} == {("paused", "fenced"), ("second", "committed")}
    assert not os.path.exists(f"{out}/_staging")


@pytest.mark.timeout(600)
def test_a_run_killed_after_its_second_chunk_keeps_them_and_the_next_run_scores_the_rest(
    ray_address, untrained_models, archive, tmp_path
):
    (model, _), _ = untrained_models
    root, n = archive
    out = str(tmp_path / "scores")
    killed = _finish(_start(ray_address, model, root, out, "--commit-every", "4", fault="chunk-committed@2"))
    assert killed[0] == -signal.SIGKILL, killed[2][-3000:]
    assert _rows(out)[:2] == (8, 8)
    code, stdout, stderr = _finish(_start(ray_address, model, root, out, "--commit-every", "4"))
    assert code == 0, stderr[-3000:]
    assert f"scored {n - 8}, skipped 8 " in stdout
    total, distinct, runs = _rows(out)
    assert total == distinct == n and len(runs) == 2
    con = duckdb.connect()
    studies = con.execute(
        f"""SELECT study_uri, n_images FROM read_parquet('{out}/studies/**/*.parquet')
        QUALIFY row_number() OVER (PARTITION BY study_uri ORDER BY scored_at DESC) = 1"""
    ).fetchall()
    per_study = con.execute(
        f"SELECT study_uri, count(*) FROM read_parquet('{out}/images/**/*.parquet') GROUP BY 1"
    ).fetchall()
    assert sorted(studies) == sorted(per_study)  # each study's current row covers all its images


@pytest.mark.timeout(600)
def test_a_model_folder_overwritten_mid_run_does_not_change_the_weights_that_score(
    ray_address, untrained_models, archive, tmp_path
):
    (model_a, id_a), (model_b, id_b) = untrained_models
    root, n = archive
    model = str(tmp_path / "model")
    shutil.copytree(model_a, model)
    out = str(tmp_path / "scores")
    # torch fp32, so that the rows can be recomputed exactly below.
    run = _start(ray_address, model, root, out, "--backend", "torch", "--precision", "fp32", fault="pause-after-lease")
    _wait_stopped(run)  # the run has read its model; no model actor has started yet
    shutil.rmtree(model)
    shutil.copytree(model_b, model)
    os.kill(run.pid, signal.SIGCONT)
    code, _, stderr = _finish(run)
    assert code == 0, stderr[-3000:]
    con = duckdb.connect()
    rows = con.execute(
        f"SELECT image_uri, prob_abnormal, model_id FROM read_parquet('{out}/images/**/*.parquet') ORDER BY 1 LIMIT 4"
    ).fetchall()
    assert con.execute(f"SELECT DISTINCT model_id FROM read_parquet('{out}/images/**/*.parquet')").fetchall() == [
        (id_a,)
    ]
    state, meta = load_checkpoint(model_a)
    net = build_model()
    net.load_state_dict(state)
    net = for_inference(net, torch.device("cpu"))
    squares = np.stack([load_square(open(uri, "rb").read(), int(meta["cache_side"])) for uri, _, _ in rows])
    pixels = EvalPreset(size=int(meta["image_size"]))({"pixels": squares})["pixels"]
    expected = score_step(net, torch.from_numpy(pixels), "fp32").numpy()
    assert np.allclose([p for _, p, _ in rows], expected, atol=1e-4)
