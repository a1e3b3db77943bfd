"""The benchmarks run on a tiny N and report every field (timings are printed, never asserted)."""

import json

import pytest
import torch

from mura_ray import cli
from mura_ray.bench import training
from mura_ray.model import backends

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
PER_ENGINE = {"forward_ips", "limit_by_engine_ips"}


@pytest.mark.timeout(600)
def test_bench_score_reports_every_field(ray_cluster, tmp_path, monkeypatch, capsys):
    # Through the command, with relative paths from a directory that is not the checkout.
    monkeypatch.chdir(tmp_path)
    args = ["bench", "score", "--images", "6", "--image-size", "32", "--batch-size", "4"]
    assert cli.main([*args, "--json", "out/b.json", "--plot", "b.png"]) == 0
    result = json.loads((tmp_path / "out" / "b.json").read_text())
    assert result.keys() >= SCORE_KEYS | PER_ENGINE | {"pipeline_engine", "decode_per_core_ips"}
    assert result["images"] == 6
    assert all(result[k] > 0 for k in SCORE_KEYS - {"date", "settings", "cpu"})
    engines = {f"{b} {p}" for b, p in backends.all_engines(torch.device("cpu"))}
    for key in PER_ENGINE:
        assert set(result[key]) == engines and all(v > 0 for v in result[key].values())
    assert result["pipeline_engine"] in engines
    assert set(result["decode_per_core_ips"]) == {"PNG", "JPEG", "DICOM", "mean_pixels"}
    assert result["limit_ips"] <= min(result["model_ips"], result["decode_ips"])
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "e / c" in printed and result["pipeline_engine"] in printed and f"CPU: {result['cpu']['model']}" in printed


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


@pytest.mark.timeout(600)
def test_bench_nightly_times_a_night_per_size_and_history(ray_cluster, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["bench", "nightly", "--sizes", "30,60", "--nights", "1,3", "--new", "4", "--repeats", "2"]
    assert cli.main([*args, "--json", "n.json"]) == 0
    result = json.loads((tmp_path / "n.json").read_text())
    rows = {(r["archive_files"], r["nights_behind"]): r for r in result["rows"]}
    assert set(rows) == {(30, 1), (30, 3), (60, 1), (60, 3)}
    for row in rows.values():
        assert row["scored"] == 4 and 0 < row["plan_seconds"] < row["seconds"] and row["driver_peak_bytes"] > 0
        assert 0 < row["list_seconds"] <= row["plan_seconds"] and 0 < row["commit_seconds"] < row["seconds"]
        assert len(row["tries_seconds"]) == 2 and min(row["tries_seconds"]) <= row["seconds"] + 0.01
    assert set(result["nights_ratio"]) == {"30", "60"} and set(result["size_ratio"]) == {"1", "3"}
    printed = capsys.readouterr().out
    assert "most nights / one night" in printed and f"CPU: {result['cpu']['model']}" in printed


def test_the_gpu_check_runs_the_products_code_without_ray_on_a_cpu():
    """The prepared GPU script, on a CPU (gloo) with Ray made unimportable: it needs only the compute core."""
    import subprocess
    import sys

    blocked = (
        "import sys, runpy; sys.modules['ray'] = None; runpy.run_module('mura_ray.bench.gpu_core', run_name='__main__')"
    )
    args = ["--device", "cpu", "--image-size", "48", "--train-batch", "8", "--score-batch", "16", "--steps", "1"]
    args += ["--cores", "1", "--decode-images", "16"]
    out = subprocess.run([sys.executable, "-c", blocked, *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert any(line.startswith("DDP epoch code:") and line.endswith(": ok") for line in lines), out.stdout
    assert "process group: backend 'gloo'" in out.stdout and "cudnn.benchmark: False" in out.stdout
    scored = [line for line in lines if line.startswith("scoring ")]
    assert scored and any("torch fp32" in line and "max |dP| vs IEEE fp32 0.00e+00" in line for line in scored)
    assert "CPU:" in out.stdout and "images/s" in lines[-2]
