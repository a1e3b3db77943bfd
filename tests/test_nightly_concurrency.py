"""Nightly scoring under two runs at once, a paused run, a killed run and a model that changes under
a run: real `mura-ray score` processes on the shared Ray cluster, real signals, the table read by DuckDB."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from mura_ray.archive.catalog import build_catalog
from mura_ray.archive.sample import write_sample
from mura_ray.imaging.preprocess import EvalPreset, load_square
from mura_ray.model.checkpoint import load_checkpoint
from mura_ray.model.resnet import build_model, for_inference
from mura_ray.model.steps import score_step
from tests.readers import connect, scores


def _start(ray_address, model, archive, out, *args, fault=None):
    env = dict(os.environ, RAY_ADDRESS=ray_address, PYTHONUNBUFFERED="1")
    env.pop("MURA_RAY_FAULT", None)
    if fault:
        env["MURA_RAY_FAULT"] = fault
    cmd = [sys.executable, "-m", "mura_ray.cli", "score", "--model", model, "--data", archive, "--out", out, *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _rows(out):
    """(rows, distinct images, distinct run ids) of the current image rows, read by DuckDB."""
    con = connect(out)
    total, distinct = con.execute("SELECT count(*), count(DISTINCT image_uri) FROM images").fetchone()
    runs = [r[0] for r in con.execute("SELECT DISTINCT run_id FROM images ORDER BY 1").fetchall()]
    return total, distinct, runs


def _studies_cover_their_images(out):
    """Each study's current row counts exactly the current image rows of the study."""
    con = connect(out)
    studies = con.execute("SELECT study_uri, n_images FROM studies ORDER BY 1").fetchall()
    per_study = con.execute("SELECT study_uri, count(*) FROM images GROUP BY 1 ORDER BY 1").fetchall()
    return studies == per_study and len(studies) > 0


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
def test_two_runs_started_at_the_same_instant_leave_one_current_row_per_image(
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
    # Both score; the commit that lands second is checked against the first and replaces its rows.
    assert [r[0] for r in results] == [0, 0], [r[2][-2000:] for r in results]
    total, distinct, writers = _rows(out)
    assert total == distinct == n and set(writers) <= {"night-a", "night-b"}
    assert _studies_cover_their_images(out)
    finished = scores(out, "run")
    assert sorted(finished["run_id"].to_pylist()) == ["night-a", "night-b"] and all(finished["final"].to_pylist())


@pytest.mark.timeout(600)
def test_a_run_paused_while_another_scores_and_finishes_commits_whole_and_correct_when_it_wakes(
    ray_address, untrained_models, archive, tmp_path
):
    (model, _), _ = untrained_models
    root, n = archive
    out = str(tmp_path / "scores")
    paused = _start(ray_address, model, root, out, "--run-id", "paused", fault="pause-after-plan")
    _wait_stopped(paused)  # it has listed and planned n images
    # A study gains an image the paused run never saw; the second run scores everything, the new image too.
    study = os.path.dirname(sorted(glob.glob(f"{root}/**/*.png", recursive=True))[0])
    shutil.copy(sorted(glob.glob(f"{study}/*.png"))[0], os.path.join(study, "image99.png"))
    code, stdout, stderr = _finish(_start(ray_address, model, root, out, "--run-id", "second"))
    assert code == 0, stderr[-3000:]
    assert f"scored {n + 1}, skipped 0" in stdout
    os.kill(paused.pid, signal.SIGCONT)
    code, stdout, stderr = _finish(paused)
    assert code == 0, stderr[-3000:]
    assert f"scored {n}, skipped 0" in stdout
    total, distinct, writers = _rows(out)
    assert total == distinct == n + 1 and writers == ["paused", "second"]  # the new image keeps second's row
    # The woken run's study rows were computed on the snapshot it committed onto: they count the new image.
    assert _studies_cover_their_images(out)
    grown = connect(out).execute(f"SELECT run_id, n_images FROM studies WHERE study_uri = '{study}'").fetchall()
    assert grown == [("paused", len(glob.glob(f"{study}/*.png")))]


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
    assert _studies_cover_their_images(out)


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
    run = _start(ray_address, model, root, out, "--backend", "torch", "--precision", "fp32", fault="pause-after-plan")
    _wait_stopped(run)  # the run has read its model; no model actor has started yet
    shutil.rmtree(model)
    shutil.copytree(model_b, model)
    os.kill(run.pid, signal.SIGCONT)
    code, _, stderr = _finish(run)
    assert code == 0, stderr[-3000:]
    con = connect(out)
    rows = con.execute("SELECT image_uri, prob_abnormal, model_id FROM images ORDER BY 1 LIMIT 4").fetchall()
    assert con.execute("SELECT DISTINCT model_id FROM images").fetchall() == [(id_a,)]
    state, meta = load_checkpoint(model_a)
    net = build_model()
    net.load_state_dict(state)
    net = for_inference(net, torch.device("cpu"))
    squares = np.stack([load_square(open(uri, "rb").read(), int(meta["cache_side"])) for uri, _, _ in rows])
    pixels = EvalPreset(size=int(meta["image_size"]))({"pixels": squares})["pixels"]
    expected = score_step(net, torch.from_numpy(pixels), "fp32").numpy()
    assert np.allclose([p for _, p, _ in rows], expected, atol=1e-4)
