"""MLflow tracking and the registry, against a local MLflow file store, read back with MlflowClient."""

import json
import os
import subprocess
import sys

import pytest

from mura_ray.config import ScoreConfig, TrainConfig
from tests.readers import scores


def test_nothing_of_mlflow_is_imported_when_tracking_is_off(tmp_path):
    """The verbs' modules load, and training's tracker is off, without MLflow in sys.modules."""
    code = """
import os, sys
os.environ.pop("MLFLOW_TRACKING_URI", None)
import mura_ray.cli, mura_ray.training.driver, mura_ray.scoring.run, mura_ray.review.evaluate
import mura_ray.review.monitor, mura_ray.review.explain, mura_ray.model.checkpoint, mura_ray.model.registry
from mura_ray.config import TrainConfig
from mura_ray.training.driver import start_tracking
cfg = TrainConfig(data=sys.argv[1], out=sys.argv[1] + "/run", weights="none")
assert start_tracking(cfg) is None
assert mura_ray.model.registry.resolve_model_dir(sys.argv[1]) == sys.argv[1]
loaded = sorted(m for m in sys.modules if m.split(".")[0] == "mlflow")
assert not loaded, loaded
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


@pytest.mark.timeout(900)
def test_training_logs_to_mlflow_registers_and_a_resume_continues_the_run(
    ray_cluster, learn_archive, start_weights, tmp_path, monkeypatch
):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    from mura_ray.scoring.run import run_scoring
    from mura_ray.training.driver import run_training
    from mura_ray.training.tracking import RUN_FILE

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks file stores to opt in
    store = (tmp_path / "mlruns").as_uri()
    cfg = TrainConfig(
        data=learn_archive[0],
        out=str(tmp_path / "run"),
        workers=2,
        epochs=1,
        image_size=48,
        batch_size=16,
        weights=start_weights,
        guard_images=0,
        mlflow=store,
        register="mura-test",
    )
    result = run_training(cfg)
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    run_id = json.load(open(os.path.join(cfg.out, RUN_FILE)))["run_id"]
    run = client.get_run(run_id)
    history = json.load(open(os.path.join(cfg.out, "metrics.json")))
    # Parameters: the configuration and the data fingerprint.
    meta = json.load(open(os.path.join(result["model_dir"], "metadata.json")))
    assert run.data.params["image_size"] == "48" and run.data.params["workers"] == "2"
    assert run.data.params["data_fingerprint"] == meta["data_fingerprint"]
    # Every epoch's metrics, at step = epoch, once each.
    for key in ("train_loss", "tune_loss", "tune_f1", "tune_study_kappa"):
        steps = [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
        assert steps == [(h["epoch"], pytest.approx(h[key])) for h in history], key
    assert run.data.metrics["valid_study_kappa"] == pytest.approx(meta["validation"]["study"]["kappa"])
    assert run.data.tags["model_id"] == meta["model_id"] and run.info.status == "FINISHED"
    folder = f"models/{meta['model_id'][:16]}"
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {
        a.path for a in client.list_artifacts(run_id, folder)
    }
    for name in ("model.safetensors", "metadata.json", "model_card.md", "valid_predictions.parquet"):
        assert f"{folder}/{name}" in artifacts, (name, artifacts)
    assert "training_curves.png" in artifacts and "metrics.csv" in artifacts
    assert "evaluation/validation_report.json" in {a.path for a in client.list_artifacts(run_id, "evaluation")}
    # The registered version carries the model_id.
    versions = client.search_model_versions(f"name='{cfg.register}'")
    assert [(str(v.version), v.tags["model_id"], v.run_id) for v in versions] == [("1", meta["model_id"], run_id)]

    # Scoring from the registry gives rows with the model_id of the folder (the weights' hash), by version or alias.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MURA_RAY_CACHE", str(tmp_path / "cache"))
    client.set_registered_model_alias(cfg.register, "champion", "1")
    for model, out in ((f"models:/{cfg.register}/1", "reg"), (f"models:/{cfg.register}@champion", "alias")):
        run_scoring(ScoreConfig(model=model, data=cfg.data, out=str(tmp_path / out), split="valid"))
        rows = scores(str(tmp_path / out), "image")
        assert rows.num_rows > 0 and set(rows["model_id"].to_pylist()) == {meta["model_id"]} == {result["model_id"]}

    # A rerun of the same RUN_DIR with one more epoch continues the same MLflow run.
    cfg.epochs = 2
    again = run_training(cfg)
    assert json.load(open(os.path.join(cfg.out, RUN_FILE)))["run_id"] == run_id
    assert len(client.search_runs([run.info.experiment_id])) == 1
    history = json.load(open(os.path.join(cfg.out, "metrics.json")))
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train_loss")] == [
        (h["epoch"], pytest.approx(h["train_loss"])) for h in history
    ]
    assert [h["epoch"] for h in history] == [1, 2]
    versions = {str(v.version): v.tags["model_id"] for v in client.search_model_versions(f"name='{cfg.register}'")}
    assert versions == {"1": meta["model_id"], "2": again["model_id"]}
    # Version 1 still names model 1's files: each kept model is logged under its own folder.
    monkeypatch.setenv("MURA_RAY_CACHE", str(tmp_path / "cache2"))
    from mura_ray.model.checkpoint import read_checkpoint
    from mura_ray.model.registry import resolve_model_dir

    for version, model_id in versions.items():
        assert read_checkpoint(resolve_model_dir(f"models:/{cfg.register}/{version}"))[1]["model_id"] == model_id
