"""Nightly scoring on the S3 server: incremental runs, the current study view, and SIGKILL at every stage."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import duckdb
import pyarrow.parquet as pq
import pytest
import s3fs

from mura_ray.archive.sample import write_sample
from mura_ray.config import ScoreConfig
from mura_ray.scoring.run import run_scoring

CURRENT_IMAGES = """
SELECT * FROM read_parquet('{out}/images/**/*.parquet')
WHERE model_id = '{model}'
QUALIFY row_number() OVER (PARTITION BY image_uri ORDER BY scored_at DESC) = 1
"""
CURRENT_STUDIES = """
SELECT * FROM read_parquet('{out}/studies/**/*.parquet')
WHERE model_id = '{model}'
QUALIFY row_number() OVER (PARTITION BY study_uri ORDER BY scored_at DESC) = 1
"""


def _download(fs, prefix, local):
    """A local copy of an S3 output, for DuckDB (whose S3 reader is an extension it would download)."""
    if fs.exists(f"{prefix}/images") or fs.exists(f"{prefix}/studies"):
        fs.get(f"{prefix}/", str(local) + "/", recursive=True)
    return str(local)


def _archive_keys(fs, bucket):
    return sorted(k for k in fs.find(f"{bucket}/archive") if k.endswith(".png"))


@pytest.mark.timeout(600)
def test_nightly_runs_score_only_new_and_changed_images(ray_cluster, s3_server, s3_bucket, untrained_models, tmp_path):
    (model_a, id_a), (model_b, id_b) = untrained_models
    fs = s3fs.S3FileSystem(endpoint_url=s3_server)
    write_sample(f"s3://{s3_bucket}/archive", studies=6, seed=3)
    keys = _archive_keys(fs, s3_bucket)
    n = len(keys)
    out = f"s3://{s3_bucket}/scores"
    cfg = dict(model=model_a, data=f"s3://{s3_bucket}/archive", out=out)

    first = run_scoring(ScoreConfig(**cfg))
    assert (first["images"], first["skipped"], first["errors"]) == (n, 0, 0)

    again = run_scoring(ScoreConfig(**cfg))
    assert (again["images"], again["skipped"], again["studies"]) == (0, n, 0)
    assert not any(m.endswith(".parquet") for m in fs.find(f"{s3_bucket}/scores/images") if again["run_id"] in m)

    # Overnight: a study gains an image, an image is replaced, a new study arrives, a stray file appears.
    grown = keys[0].rsplit("/", 1)[0]
    fs.pipe(f"{grown}/image9.png", fs.cat(keys[1]))
    fs.pipe(keys[2], fs.cat(keys[3]))
    new_study = f"{s3_bucket}/archive/MURA-v1.1/valid/XR_WRIST/patient90000/study1_negative"
    fs.pipe(f"{new_study}/image1.png", fs.cat(keys[4]))
    fs.pipe(f"{s3_bucket}/archive/MURA-v1.1/README.txt", b"not an image")
    third = run_scoring(ScoreConfig(**cfg))
    assert (third["images"], third["skipped"], third["ignored_files"]) == (3, n - 1, 1)
    studies_touched = {grown, keys[2].rsplit("/", 1)[0], new_study}
    assert third["studies"] == len(studies_touched)

    local = _download(fs, f"{s3_bucket}/scores", tmp_path / "copy1")
    con = duckdb.connect()
    images = con.sql(CURRENT_IMAGES.format(out=local, model=id_a)).to_arrow_table()
    studies = con.sql(CURRENT_STUDIES.format(out=local, model=id_a)).to_arrow_table()
    assert images.num_rows == n + 2 and len(set(images["image_uri"].to_pylist())) == n + 2
    all_studies = {k.rsplit("/", 1)[0] for k in _archive_keys(fs, s3_bucket)}
    assert sorted(studies["study_uri"].to_pylist()) == sorted(f"s3://{s}" for s in all_studies)
    by_study = {}
    for uri, prob in zip(images["study_uri"].to_pylist(), images["prob_abnormal"].to_pylist()):
        by_study.setdefault(uri, []).append(prob)
    for row in studies.to_pylist():
        probs = by_study[row["study_uri"]]
        assert row["n_images"] == len(probs)
        assert row["prob_abnormal"] == pytest.approx(sum(probs) / len(probs), abs=1e-5)
    grown_row = next(r for r in studies.to_pylist() if r["study_uri"] == f"s3://{grown}")
    assert grown_row["run_id"] == third["run_id"] and grown_row["n_images"] == len(fs.ls(grown))
    changed = con.execute(
        f"SELECT count(*) FROM read_parquet('{local}/images/**/*.parquet') WHERE image_uri = 's3://{keys[2]}'"
    ).fetchone()[0]
    assert changed == 2  # the original and the replacement; the current view keeps the newer

    # A new model scores everything; --full rescores everything.
    other = run_scoring(ScoreConfig(**dict(cfg, model=model_b)))
    assert (other["images"], other["skipped"], other["model_id"]) == (n + 2, 0, id_b)
    full = run_scoring(ScoreConfig(**cfg, full=True))
    assert (full["images"], full["skipped"]) == (n + 2, 0)
    assert not fs.exists(f"{s3_bucket}/scores/_staging")
    fs.invalidate_cache()  # this client listed _lease/ while downloading, before the last runs' leases
    leases = sorted(fs.find(f"{s3_bucket}/scores/_lease"))
    assert leases and json.loads(fs.cat(leases[-1]))["released"] is True


def _score_process(ray_address, model, archive, out, fault=None):
    env = dict(os.environ, RAY_ADDRESS=ray_address, PYTHONUNBUFFERED="1")
    env.pop("MURA_RAY_FAULT", None)
    if fault:
        env["MURA_RAY_FAULT"] = fault
    return subprocess.run(
        [sys.executable, "-m", "mura_ray.cli", "score", "--model", model, "--data", archive, "--out", out],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _visible(fs, bucket, tmp_path, name):
    local = _download(fs, f"{bucket}/scores", tmp_path / name)
    con = duckdb.connect()
    if not os.path.isdir(os.path.join(local, "images")):
        return con, local, 0, 0
    total, distinct = con.execute(
        f"SELECT count(*), count(DISTINCT image_uri) FROM read_parquet('{local}/images/**/*.parquet')"
    ).fetchone()
    return con, local, total, distinct


@pytest.mark.timeout(900)
def test_sigkill_while_scoring_or_committing_loses_and_duplicates_nothing(
    ray_address, s3_server, s3_bucket, untrained_models, tmp_path
):
    (model, model_id), _ = untrained_models
    fs = s3fs.S3FileSystem(endpoint_url=s3_server)
    write_sample(f"s3://{s3_bucket}/archive", studies=5, seed=4)
    archive, out = f"s3://{s3_bucket}/archive", f"s3://{s3_bucket}/scores"
    n = len(_archive_keys(fs, s3_bucket))

    killed = _score_process(ray_address, model, archive, out, fault="score")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert _visible(fs, s3_bucket, tmp_path, "a")[2] == 0  # staged only: nothing visible
    lease = json.loads(fs.cat(sorted(fs.find(f"{s3_bucket}/scores/_lease"))[-1]))
    assert not lease.get("released")  # the dead run's lease, taken over below

    killed = _score_process(ray_address, model, archive, out, fault="commit-move")
    assert killed.returncode == -9, killed.stderr[-3000:]
    _, _, total, distinct = _visible(fs, s3_bucket, tmp_path, "b")
    assert total == distinct  # part of the run may show, never twice

    # More images arrive; the next run dies after writing its manifest, before moving a file.
    extra = f"{s3_bucket}/archive/MURA-v1.1/valid/XR_HAND/patient91000/study1_positive"
    keys = _archive_keys(fs, s3_bucket)
    for i in range(2):
        fs.pipe(f"{extra}/image{i + 1}.png", fs.cat(keys[i]))
    killed = _score_process(ray_address, model, archive, out, fault="commit-manifest")
    assert killed.returncode == -9, killed.stderr[-3000:]

    done = _score_process(ray_address, model, archive, out)
    assert done.returncode == 0, done.stderr[-3000:]
    # The killed runs' work, rolled forward, is not scored again.
    assert f"scored 0, skipped {n + 2} " in done.stdout

    fs.invalidate_cache()
    con, local, total, distinct = _visible(fs, s3_bucket, tmp_path, "final")
    assert total == distinct == n + 2
    assert con.execute(
        f"SELECT count(DISTINCT model_id), min(model_id) FROM read_parquet('{local}/images/**/*.parquet')"
    ).fetchone() == (1, model_id)
    studies = con.execute(CURRENT_STUDIES.format(out=local, model=model_id)).fetchall()
    assert len(studies) == len({k.rsplit("/", 1)[0] for k in _archive_keys(fs, s3_bucket)})
    assert fs.find(f"{s3_bucket}/scores/_staging") == []

    statuses = [json.loads(fs.cat(p))["status"] for p in fs.find(f"{s3_bucket}/scores/_runs")]
    assert statuses and set(statuses) <= {"committed", "fenced"}


@pytest.mark.timeout(600)
def test_edited_calibration_or_tta_rescores_and_an_edited_threshold_does_not(ray_cluster, untrained_models, tmp_path):
    (source, model_id), _ = untrained_models
    model = str(tmp_path / "model")
    shutil.copytree(source, model)
    archive, out = str(tmp_path / "archive"), str(tmp_path / "scores")
    write_sample(archive, studies=4, seed=5)
    cfg = dict(model=model, data=archive, out=out)

    def edit(**values):
        path = os.path.join(model, "metadata.json")
        meta = json.load(open(path))
        json.dump(dict(meta, **values), open(path, "w"))

    first = run_scoring(ScoreConfig(**cfg))
    n = first["images"]
    assert n > 0 and first["skipped"] == 0
    edit(temperature=2.5, logit_offset=-0.4, calibration_method="platt")
    recalibrated = run_scoring(ScoreConfig(**cfg))
    assert (recalibrated["images"], recalibrated["skipped"]) == (n, 0)
    edit(threshold=0.9)
    same = run_scoring(ScoreConfig(**cfg))
    assert (same["images"], same["skipped"]) == (0, n)
    flipped = run_scoring(ScoreConfig(**cfg, tta="flip"))
    assert (flipped["images"], flipped["skipped"]) == (n, 0)

    images = pq.read_table(os.path.join(out, "images")).to_pandas()
    studies = pq.read_table(os.path.join(out, "studies")).to_pandas()
    runs = [first, recalibrated, flipped]
    assert set(images["model_id"]) == {model_id}
    for table in (images, studies):
        ids = table.groupby("run_id")["scoring_id"].unique().to_dict()
        assert [list(ids[r["run_id"]]) for r in runs] == [[r["scoring_id"]] for r in runs]
    assert len({r["scoring_id"] for r in runs}) == 3
    by_run = images.pivot_table(index="image_uri", columns="run_id", values="prob_abnormal")
    moved = (by_run[recalibrated["run_id"]] - by_run[first["run_id"]]).abs()
    assert moved.min() > 1e-4  # each row is the score its own calibration gives
