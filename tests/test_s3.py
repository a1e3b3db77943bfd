"""Archive, run directory and outputs on a real S3 protocol server (moto) on 127.0.0.1."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import s3fs

from mura_ray.archive.catalog import build_catalog
from mura_ray.archive.sample import write_sample
from mura_ray.config import ScoreConfig
from mura_ray.scoring.run import run_scoring
from mura_ray.training.rundir import recorded_epoch
from tests.readers import scores


def _scores(out):
    table = scores(out, "image")
    return {
        uri.split("MURA-v1.1/", 1)[1]: (prob, err)
        for uri, prob, err in zip(
            table["image_uri"].to_pylist(), table["prob_abnormal"].to_pylist(), table["error"].to_pylist()
        )
    }


@pytest.mark.timeout(600)
def test_s3_archive_and_outputs_match_local(ray_cluster, s3_server, s3_bucket, trained_run, tmp_path):
    _, trained = trained_run
    local = str(tmp_path / "archive")
    write_sample(local, studies=12, seed=5)
    write_sample(f"s3://{s3_bucket}/archive", studies=12, seed=5)

    local_cat = build_catalog(local).to_pylist()
    s3_cat = build_catalog(f"s3://{s3_bucket}/archive").to_pylist()
    assert len(s3_cat) == len(local_cat)
    assert all(r["image_uri"].startswith(f"s3://{s3_bucket}/archive/MURA-v1.1/") for r in s3_cat)
    assert [(r["split"], r["label"], r["source_size"]) for r in s3_cat] == [
        (r["split"], r["label"], r["source_size"]) for r in local_cat
    ]
    assert all(r["source_etag"] and not r["source_etag"].startswith("mtime:") for r in s3_cat)

    # The model itself is read from S3 too.
    fs = s3fs.S3FileSystem(endpoint_url=s3_server)
    fs.put(trained["model_dir"], f"{s3_bucket}/model", recursive=True)
    local_out = str(tmp_path / "scores")
    run_scoring(ScoreConfig(model=trained["model_dir"], data=local, out=local_out))
    m = run_scoring(
        ScoreConfig(model=f"s3://{s3_bucket}/model", data=f"s3://{s3_bucket}/archive", out=f"s3://{s3_bucket}/scores")
    )
    assert m["images"] == len(local_cat) and m["errors"] == 0

    local_scores = _scores(local_out)
    s3_scores = _scores(f"s3://{s3_bucket}/scores")
    assert local_scores.keys() == s3_scores.keys()
    for key, (prob, err) in local_scores.items():
        assert err is None and s3_scores[key][1] is None
        assert s3_scores[key][0] == pytest.approx(prob, abs=1e-6)
    # The run's row, final, in the table's one commit log on S3; nothing beside the table under the prefix
    # (no staging, and the conditional-write probe is gone).
    runs = scores(f"s3://{s3_bucket}/scores", "run").to_pylist()
    assert [(r["run_id"], r["final"], r["chunks"]) for r in runs] == [(m["run_id"], True, 1)]
    fs.invalidate_cache()
    assert fs.ls(f"{s3_bucket}/scores", detail=False) == [f"{s3_bucket}/scores/scores"]
    assert fs.exists(f"{s3_bucket}/scores/scores/_delta_log/{m['version']:020d}.json")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_training_on_s3_resumes_after_the_driver_is_killed(ray_address, s3_server, s3_bucket, start_weights, tmp_path):
    data = f"s3://{s3_bucket}/archive"
    write_sample(data, studies=12, seed=6)
    out = f"s3://{s3_bucket}/runs/r1"
    base = f"{s3_bucket}/runs/r1"
    fs = s3fs.S3FileSystem(endpoint_url=s3_server)
    cmd = [
        sys.executable,
        "-m",
        "mura_ray.cli",
        "train",
        "--data",
        data,
        "--out",
        out,
        "--workers",
        "2",
        "--epochs",
        "3",
        "--image-size",
        "32",
        "--batch-size",
        "8",
        "--weights",
        start_weights,
        "--patience",
        "4",
    ]
    env = dict(os.environ, RAY_ADDRESS=ray_address)
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 400
    events = []
    while time.monotonic() < deadline and first.poll() is None:
        fs.invalidate_cache()
        if fs.exists(f"{base}/events.jsonl"):
            events = [json.loads(x) for x in fs.cat(f"{base}/events.jsonl").decode().splitlines()]
            # Epoch 1 done, and Ray Train has recorded its checkpoint (what a rerun resumes from).
            if any(e["event"] == "epoch_done" for e in events) and recorded_epoch(out) >= 1:
                break
        time.sleep(0.5)
    assert first.poll() is None, open(tmp_path / "first.log").read()[-3000:]
    first.send_signal(signal.SIGKILL)  # the driver dies after epoch 1
    first.wait()
    done_before = [e["epoch"] for e in events if e["event"] == "epoch_done"]
    assert done_before and done_before[-1] < 3

    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    fs.invalidate_cache()
    events = [json.loads(x) for x in fs.cat(f"{base}/events.jsonl").decode().splitlines()]
    resumed = [e["after_epoch"] for e in events if e["event"] == "resumed"]
    assert resumed and resumed[0] >= 1  # continued from a completed epoch, not from epoch 0
    done = [e["epoch"] for e in events if e["event"] == "epoch_done"]
    assert sorted(done) == [1, 2, 3] and len(set(done)) == len(done)
    meta = json.loads(fs.cat(f"{base}/model/metadata.json"))
    assert fs.exists(f"{base}/model/model.safetensors") and fs.exists(f"{base}/model/model_card.md")
    assert [h["epoch"] for h in json.loads(fs.cat(f"{base}/metrics.json"))] == [1, 2, 3]
    assert meta["metrics"]["epoch"] in (1, 2, 3) and "threshold" in meta


@pytest.mark.timeout(600)
def test_a_key_with_dot_dot_keeps_its_heatmap_inside_the_output(
    ray_cluster, s3_server, s3_bucket, untrained_models, tmp_path
):
    (source, _), _ = untrained_models
    model = str(tmp_path / "model")
    shutil.copytree(source, model)
    meta_path = os.path.join(model, "metadata.json")
    json.dump(dict(json.load(open(meta_path)), threshold=0.0), open(meta_path, "w"))  # every study flagged
    fs = s3fs.S3FileSystem(endpoint_url=s3_server)
    archive = f"s3://{s3_bucket}/archive"
    write_sample(archive, studies=4, seed=7)
    first = sorted(k for k in fs.find(f"{s3_bucket}/archive") if k.endswith(".png"))[0]
    study = f"{s3_bucket}/archive/MURA-v1.1/valid/XR_WRIST/patient1/study1_positive"
    hostile = f"{study}/{'../' * 13}escaped/image1.png"
    fs.pipe(hostile, fs.cat(first))
    assert hostile in fs.find(f"{s3_bucket}/archive")  # the key is kept as written
    out = tmp_path / "deep" / "a" / "b" / "c" / "scores"

    result = run_scoring(ScoreConfig(model=model, data=archive, out=str(out), heatmaps="flagged"))

    assert result["heatmaps"] == result["images"] and result["errors"] == 0
    written = [os.path.join(d, f) for d, _, files in os.walk(tmp_path) for f in files]
    outside = [p for p in written if not p.startswith((str(out) + os.sep, model + os.sep))]
    assert outside == []
    index = scores(str(out), "heatmap")
    row = next(r for r in index.to_pylist() if r["image_uri"] == f"s3://{hostile}")
    assert row["error"] is None and os.path.isfile(os.path.join(out, row["heatmap"]))


def _png(value: int, size: int = 24) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((size, size), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_s3_keys_with_version_ids_and_query_characters_are_read_whole(s3_server, s3_bucket):
    import boto3

    from mura_ray.archive import storage
    from mura_ray.archive.catalog import scan_archive
    from mura_ray.imaging import preprocess

    s3 = boto3.client("s3", endpoint_url=s3_server)
    keys = {
        "archive/a/img.png": 10,
        "archive/a/img.png?versionId=3.png": 120,  # a key of its own, not a version of the one above
        "archive/b/study?versionId=1/image1.png": 170,
        "archive/c/x?y#z.png": 240,
    }
    for key, value in keys.items():
        s3.put_object(Bucket=s3_bucket, Key=key, Body=_png(value))
    catalog = scan_archive(f"s3://{s3_bucket}/archive").table
    assert catalog["image_uri"].to_pylist() == sorted(f"s3://{s3_bucket}/{k}" for k in keys)
    fs, _ = storage.filesystem(f"s3://{s3_bucket}/archive")
    batch = {c: catalog[c].to_numpy(zero_copy_only=False) for c in ("image_uri", "source_size", "source_etag")}
    out = preprocess.read_and_decode(batch, side=16, fs=fs)
    assert list(out["error"]) == [""] * 4
    values = dict(zip(catalog["image_uri"].to_pylist(), out["pixels"][:, 8, 8].tolist()))
    assert values == {f"s3://{s3_bucket}/{k}": v for k, v in keys.items()}
    assert storage.read_bytes(fs, f"{s3_bucket}/archive/a/img.png?versionId=3.png") == _png(120)


def test_an_s3_object_rewritten_after_listing_is_a_read_error(s3_server, s3_bucket):
    import boto3

    from mura_ray.archive import storage
    from mura_ray.archive.catalog import scan_archive
    from mura_ray.imaging import preprocess
    from mura_ray.imaging.decode import READ_ERROR

    s3 = boto3.client("s3", endpoint_url=s3_server)
    for key in ("kept.png", "rewritten.png"):
        s3.put_object(Bucket=s3_bucket, Key=f"archive/{key}", Body=_png(10))
    catalog = scan_archive(f"s3://{s3_bucket}/archive").table
    s3.put_object(Bucket=s3_bucket, Key="archive/rewritten.png", Body=_png(200))  # same size, another ETag
    fs, _ = storage.filesystem(f"s3://{s3_bucket}/archive")
    batch = {c: catalog[c].to_numpy(zero_copy_only=False) for c in ("image_uri", "source_size", "source_etag")}
    out = preprocess.read_and_decode(batch, side=16, fs=fs)
    assert out["error"][0] == ""
    assert out["error"][1].startswith(f"{READ_ERROR}: ") and "changed" in out["error"][1], out["error"][1]
