"""Registry downloads (``models:/NAME/VERSION``) against a local MLflow file store: only a whole copy is kept."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import write_untrained_model

from mura_ray.archive import storage
from mura_ray.model.checkpoint import read_checkpoint
from mura_ray.model.registry import resolve_model_dir

mlflow = pytest.importorskip("mlflow")

NAME = "mura-test"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A file store with one registered version of an untrained model: (tracking URI, model folder, model_id)."""
    base = tmp_path_factory.mktemp("registry")
    model_dir, other_dir = str(base / "model"), str(base / "other")
    model_id = write_untrained_model(model_dir, seed=0)
    write_untrained_model(other_dir, seed=1)
    store = (base / "mlruns").as_uri()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks file stores to opt in
        client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
        run = client.create_run(client.create_experiment("registry-test"))
        folder = f"models/{model_id[:16]}"
        client.log_artifacts(run.info.run_id, model_dir, artifact_path=folder)
        client.create_registered_model(NAME)
        client.create_model_version(
            NAME, f"{run.info.artifact_uri}/{folder}", run.info.run_id, tags={"model_id": model_id}
        )
    return store, model_dir, other_dir, model_id


@pytest.fixture
def cache(registry, tmp_path, monkeypatch):
    """The registry's cache folder for version 1, under a MURA_RAY_CACHE of this test's own."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry[0])
    monkeypatch.setenv("MURA_RAY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "registry" / NAME / "1"


def test_a_registered_version_is_downloaded_whole_and_kept(registry, cache):
    model_dir = resolve_model_dir(f"models:/{NAME}/1")
    assert model_dir == str(cache)
    assert read_checkpoint(model_dir)[1]["model_id"] == registry[3]
    first = (cache / "model.safetensors").stat().st_ino
    assert resolve_model_dir(f"models:/{NAME}/1") == model_dir
    assert (cache / "model.safetensors").stat().st_ino == first  # a whole copy is not downloaded again
    assert os.listdir(cache.parent) == ["1"]


@pytest.mark.parametrize("left", ["metadata only", "weights cut short", "another model's files"])
def test_a_cache_folder_that_is_not_whole_is_downloaded_again(left, registry, cache):
    """What a download killed midway (or an older layout of the cache) leaves at the final path."""
    _, model_dir, other_dir, model_id = registry
    cache.mkdir(parents=True)
    source = other_dir if left == "another model's files" else model_dir
    shutil.copy(os.path.join(source, "metadata.json"), cache)
    weights = open(os.path.join(source, "model.safetensors"), "rb").read()
    if left == "weights cut short":
        (cache / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    elif left == "another model's files":
        (cache / "model.safetensors").write_bytes(weights)
    assert read_checkpoint(resolve_model_dir(f"models:/{NAME}/1"))[1]["model_id"] == model_id


def test_a_download_that_dies_midway_leaves_nothing_at_the_final_path(registry, cache, monkeypatch):
    real = mlflow.artifacts.download_artifacts

    def cut(*args, dst_path, **kwargs):
        real(*args, dst_path=dst_path, **kwargs)
        os.remove(os.path.join(dst_path, "model.safetensors"))  # the weights had not arrived
        raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", cut)
    with pytest.raises(ConnectionResetError):
        resolve_model_dir(f"models:/{NAME}/1")
    assert not cache.exists() and os.listdir(cache.parent) == []
    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", real)
    assert read_checkpoint(resolve_model_dir(f"models:/{NAME}/1"))[1]["model_id"] == registry[3]


def test_a_registry_version_that_is_not_a_checkpoint_is_refused_and_not_kept(registry, cache, monkeypatch):
    real = mlflow.artifacts.download_artifacts

    def metadata_only(*args, dst_path, **kwargs):
        real(*args, dst_path=dst_path, **kwargs)
        os.remove(os.path.join(dst_path, "model.safetensors"))
        return dst_path

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", metadata_only)
    with pytest.raises(Exception, match="not a mura-ray checkpoint"):
        resolve_model_dir(f"models:/{NAME}/1")
    assert not cache.exists()
    assert json.load(open(os.path.join(registry[1], "metadata.json")))["model_id"] == registry[3]


KILLED_DOWNLOAD = """
import os, signal, sys
import mlflow
from mura_ray.model.registry import resolve_model_dir

real = mlflow.artifacts.download_artifacts

def killed(*args, dst_path, **kwargs):
    real(*args, dst_path=dst_path, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)  # the process dies with its download in the temporary folder

mlflow.artifacts.download_artifacts = killed
resolve_model_dir(sys.argv[1])
"""


def test_the_temporary_folder_of_a_killed_download_is_removed_by_a_later_one(registry, cache):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    proc = subprocess.run([sys.executable, "-c", KILLED_DOWNLOAD, f"models:/{NAME}/1"], env=env, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    (left,) = os.listdir(cache.parent)
    assert left.startswith(".1.") and os.path.isfile(cache.parent / left / "model.safetensors")
    old = time.time() - storage.STALE_SECONDS - 60
    os.utime(cache.parent / left, (old, old))
    live = cache.parent / ".1.another-process"  # a download under way in another process: kept
    live.mkdir()
    assert read_checkpoint(resolve_model_dir(f"models:/{NAME}/1"))[1]["model_id"] == registry[3]
    assert sorted(os.listdir(cache.parent)) == [live.name, "1"]
