"""Nightly scoring on the S3 server: incremental runs, the current study view, and SIGKILL at every stage."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import s3fs

from mura_ray.archive.sample import write_sample
from mura_ray.cli import main
from mura_ray.config import ScoreConfig
from mura_ray.scoring.run import run_scoring
from tests.readers import scores


def _archive_keys(fs, bucket):
    return sorted(k for k in fs.find(f"{bucket}/archive") if k.endswith(".png"))


def _no_old_format(fs, prefix):
    fs.invalidate_cache()
    return [p for p in ("_runs", "_staging", "_lease", "_index", "images", "studies") if fs.exists(f"{prefix}/{p}")]


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
    sid = first["scoring_id"]

    again = run_scoring(ScoreConfig(**cfg))
    assert (again["images"], again["skipped"], again["studies"]) == (0, n, 0)
    assert scores(out, "image", where=f"run_id = '{again['run_id']}'").num_rows == 0
    assert scores(out, "run", where=f"run_id = '{again['run_id']}'")["final"].to_pylist() == [True]

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

    # The current rows, one per image and study, with no query trick.
    images = scores(out, "image", where=f"scoring_id = '{sid}'")
    studies = scores(out, "study", where=f"scoring_id = '{sid}'")
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
    replaced = f"image_uri = 's3://{keys[2]}'"
    assert scores(out, "image", where=replaced)["run_id"].to_pylist() == [third["run_id"]]
    # The row it replaced is the table's history: the version the second night left.
    assert scores(out, "image", version=again["version"], where=replaced)["run_id"].to_pylist() == [first["run_id"]]

    # A new model scores everything; --full rescores everything, replacing the current rows.
    other = run_scoring(ScoreConfig(**dict(cfg, model=model_b)))
    assert (other["images"], other["skipped"], other["model_id"]) == (n + 2, 0, id_b)
    full = run_scoring(ScoreConfig(**cfg, full=True))
    assert (full["images"], full["skipped"]) == (n + 2, 0)
    current = scores(out, "image", where=f"scoring_id = '{sid}'")
    assert current.num_rows == n + 2 and set(current["run_id"].to_pylist()) == {full["run_id"]}
    assert scores(out, "image").num_rows == 2 * (n + 2)  # one row per image and model
    assert _no_old_format(fs, f"{s3_bucket}/scores") == []


def _score_process(ray_address, model, archive, out, fault=None, *extra):
    env = dict(os.environ, RAY_ADDRESS=ray_address, PYTHONUNBUFFERED="1")
    env.pop("MURA_RAY_FAULT", None)
    if fault:
        env["MURA_RAY_FAULT"] = fault
    return subprocess.run(
        [sys.executable, "-m", "mura_ray.cli", "score", "--model", model, "--data", archive, "--out", out, *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _whole_chunks(out):
    """(image rows, distinct images) of the latest snapshot; every committed chunk's study rows are there."""
    images = scores(out, "image")
    return images.num_rows, len(set(images["image_uri"].to_pylist()))


@pytest.mark.timeout(900)
def test_sigkill_while_scoring_or_committing_loses_and_duplicates_nothing(
    ray_address, s3_server, s3_bucket, untrained_models, tmp_path
):
    (source, model_id), _ = untrained_models
    model = str(tmp_path / "model")  # threshold 0: every study flagged, every image gets an overlay
    shutil.copytree(source, model)
    meta = json.load(open(os.path.join(model, "metadata.json")))
    json.dump(dict(meta, threshold=0.0), open(os.path.join(model, "metadata.json"), "w"))
    fs = s3fs.S3FileSystem(endpoint_url=s3_server)
    write_sample(f"s3://{s3_bucket}/archive", studies=5, seed=4)
    archive, out = f"s3://{s3_bucket}/archive", f"s3://{s3_bucket}/scores"
    n = len(_archive_keys(fs, s3_bucket))

    killed = _score_process(ray_address, model, archive, out, "score")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert _whole_chunks(out) == (0, 0)  # nothing committed: nothing visible

    # Killed right after its first chunk of 4 images committed: that chunk stays, whole.
    killed = _score_process(ray_address, model, archive, out, "chunk-committed", "--commit-every", "4")
    assert killed.returncode == -9, killed.stderr[-3000:]
    total, distinct = _whole_chunks(out)
    assert total == distinct == 4
    chunk_studies = scores(out, "study")
    assert set(chunk_studies["study_uri"].to_pylist()) == set(scores(out, "image")["study_uri"].to_pylist())

    # More images arrive; the next run is killed while drawing heatmaps, after its chunks committed.
    extra = f"{s3_bucket}/archive/MURA-v1.1/valid/XR_HAND/patient91000/study1_positive"
    keys = _archive_keys(fs, s3_bucket)
    for i in range(2):
        fs.pipe(f"{extra}/image{i + 1}.png", fs.cat(keys[i]))
    flags = ("--heatmaps", "flagged")
    killed = _score_process(ray_address, model, archive, out, "heatmap", *flags)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert scores(out, "heatmap").num_rows == 0  # drawn, not committed

    done = _score_process(ray_address, model, archive, out, None, *flags)
    assert done.returncode == 0, done.stderr[-3000:]
    # The killed runs' committed chunks are not scored again; their flagged images get their overlays now.
    assert f"scored 0, skipped {n + 2} " in done.stdout
    assert f"{n + 2} heatmaps" in done.stdout
    assert _whole_chunks(out) == (n + 2, n + 2)
    images = scores(out, "image")
    assert set(images["model_id"].to_pylist()) == {model_id}
    studies = scores(out, "study")
    assert studies.num_rows == len({k.rsplit("/", 1)[0] for k in _archive_keys(fs, s3_bucket)})
    drawn = scores(out, "heatmap")
    assert sorted(drawn["image_uri"].to_pylist()) == sorted(images["image_uri"].to_pylist())
    fs.invalidate_cache()
    assert all(fs.exists(f"{s3_bucket}/scores/{p}") for p in drawn["heatmap"].to_pylist())
    assert _no_old_format(fs, f"{s3_bucket}/scores") == []


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

    images = scores(out, "image").to_pandas()
    studies = scores(out, "study").to_pandas()
    runs = [first, recalibrated, flipped]
    assert set(images["model_id"]) == {model_id}
    for table in (images, studies):
        ids = table.groupby("run_id")["scoring_id"].unique().to_dict()
        assert [list(ids[r["run_id"]]) for r in runs] == [[r["scoring_id"]] for r in runs]
    assert len({r["scoring_id"] for r in runs}) == 3
    by_run = images.pivot_table(index="image_uri", columns="run_id", values="prob_abnormal")
    moved = (by_run[recalibrated["run_id"]] - by_run[first["run_id"]]).abs()
    assert moved.min() > 1e-4  # each row is the score its own calibration gives

    # A bad night retracted in one commit: the next night rescores exactly its images, and only those.
    assert main(["scores", "retract", "--out", out, "--run", flipped["run_id"]]) == 0
    assert scores(out, "image", where=f"run_id = '{flipped['run_id']}'").num_rows == 0
    again = run_scoring(ScoreConfig(**cfg, tta="flip"))
    assert (again["images"], again["skipped"]) == (n, 0)
    untouched = run_scoring(ScoreConfig(**cfg))
    assert (untouched["images"], untouched["skipped"]) == (0, n)
