"""The benchmarks run on a tiny N and report every field (timings are printed, never asserted)."""

import json

import pytest

from mura_ray import cli
from mura_ray.bench import training

SCORE_KEYS = {
    "model_ips",
    "decode_ips",
    "limit_ips",
    "naive_ips",
    "pipeline_ips",
    "ratio_limit",
    "ratio_naive",
    "peak_rss_n_bytes",
    "peak_rss_4n_bytes",
    "images",
    "cpus",
    "cpu",
    "torch_threads",
    "date",
    "settings",
}


@pytest.mark.timeout(600)
def test_bench_score_reports_every_field(ray_cluster, tmp_path, monkeypatch, capsys):
    # Through the command, with relative paths from a directory that is not the checkout.
    monkeypatch.chdir(tmp_path)
    args = ["bench", "score", "--images", "6", "--image-size", "32", "--batch-size", "4"]
    assert cli.main([*args, "--json", "out/b.json", "--plot", "b.png"]) == 0
    result = json.loads((tmp_path / "out" / "b.json").read_text())
    assert result.keys() >= SCORE_KEYS
    assert result["images"] == 6
    assert all(result[k] > 0 for k in SCORE_KEYS - {"date", "settings", "cpu"})
    assert result["limit_ips"] <= min(result["model_ips"], result["decode_ips"])
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "e / c" in printed and f"CPU: {result['cpu']['model']}" in printed


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bench_train_reports_epochs_and_workers(ray_cluster, tmp_path):
    result = training.bench_train(studies=10, image_size=32, batch_size=2, epochs=2, workdir=str(tmp_path))
    data = result["data_pipeline"]
    assert data["first_epoch_ips"] > 0 and data["later_epoch_ips"] > 0
    assert set(result["training"]) == {"workers_1", "workers_2"}
    assert all(v > 0 for w in result["training"].values() for v in w.values())
    table = training.train_table(result)
    assert "later epochs" in table and "CPU: " in table
