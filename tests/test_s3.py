"""Archive, run directory and outputs on a real S3 protocol server (moto) on 127.0.0.1."""

import json
import os

import pyarrow.dataset as pads
import pytest
import s3fs

from mura_ray.catalog import build_catalog
from mura_ray.config import ScoreConfig, TrainConfig
from mura_ray.sample import write_sample
from mura_ray.score import run_scoring
from mura_ray.train import run_training


def _scores(fs, path):
    table = pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table()
    return {
        uri.split("MURA-v1.1/", 1)[1]: (prob, err)
        for uri, prob, err in zip(table["image_uri"].to_pylist(), table["prob_abnormal"].to_pylist(), table["error"].to_pylist())
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
    run_scoring(ScoreConfig(model=trained["model_dir"], input=local, output=local_out))
    m = run_scoring(ScoreConfig(model=f"s3://{s3_bucket}/model", input=f"s3://{s3_bucket}/archive", output=f"s3://{s3_bucket}/scores"))
    assert m["images"] == len(local_cat) and m["errors"] == 0

    local_scores = _scores(None, os.path.join(local_out, "images"))
    s3_scores = _scores(fs, f"{s3_bucket}/scores/images")
    assert local_scores.keys() == s3_scores.keys()
    for key, (prob, err) in local_scores.items():
        assert err is None and s3_scores[key][1] is None
        assert s3_scores[key][0] == pytest.approx(prob, abs=1e-6)
    assert fs.exists(f"{s3_bucket}/scores/_runs/{m['run_id']}.json")
    assert not fs.exists(f"{s3_bucket}/scores/_staging/{m['run_id']}")


@pytest.mark.timeout(600)
def test_training_reads_and_writes_s3(ray_cluster, s3_bucket, start_weights):
    data = f"s3://{s3_bucket}/archive"
    write_sample(data, studies=10, seed=6)
    out = f"s3://{s3_bucket}/runs/r1"
    cfg = TrainConfig(data=data, out=out, workers=2, epochs=1, image_size=32, batch_size=8, weights=start_weights)
    result = run_training(cfg)
    fs = s3fs.S3FileSystem()
    base = f"{s3_bucket}/runs/r1"
    assert fs.exists(f"{base}/model/model.safetensors")
    meta = json.loads(fs.cat(f"{base}/model/metadata.json"))
    assert meta["model_id"] == result["model_id"]
    assert len(json.loads(fs.cat(f"{base}/metrics.json"))) == 1
