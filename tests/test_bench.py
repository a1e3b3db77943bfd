"""The benchmarks run on a tiny N and report every field (timings are printed, never asserted)."""

import json

import pytest

from mura_ray import bench

SCORE_KEYS = {
    "model_ips", "decode_ips", "limit_ips", "naive_ips", "pipeline_ips", "ratio_limit", "ratio_naive",
    "peak_rss_n_bytes", "peak_rss_4n_bytes", "images", "cpus", "torch_threads", "date", "settings",
}


@pytest.mark.timeout(600)
def test_bench_score_reports_every_field(ray_cluster, tmp_path):
    result = bench.bench_score(6, image_size=32, batch_size=4, workdir=str(tmp_path))
    assert result.keys() >= SCORE_KEYS
    assert result["images"] == 6
    assert all(result[k] > 0 for k in SCORE_KEYS - {"date", "settings"})
    assert result["limit_ips"] <= min(result["model_ips"], result["decode_ips"])
    bench.write_json(str(tmp_path / "b.json"), result)
    assert json.loads((tmp_path / "b.json").read_text()).keys() == result.keys()
    bench.plot_score(result, str(tmp_path / "b.png"))
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    assert "e / c" in bench.score_table(result)


@pytest.mark.timeout(600)
def test_bench_train_reports_epochs_and_workers(ray_cluster, tmp_path):
    result = bench.bench_train(studies=10, image_size=32, batch_size=2, epochs=2, workdir=str(tmp_path))
    data = result["data_pipeline"]
    assert data["first_epoch_ips"] > 0 and data["later_epoch_ips"] > 0
    assert set(result["training"]) == {"workers_1", "workers_2"}
    assert all(v > 0 for w in result["training"].values() for v in w.values())
    assert "later epochs" in bench.train_table(result)
