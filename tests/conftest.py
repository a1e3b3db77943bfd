"""Shared fixtures: synthetic archives, one S3 server and one Ray cluster per test session.

The S3 server (moto) and Ray are both bound to 127.0.0.1. The S3 settings
are put in the environment before Ray starts, so Ray's workers inherit them;
the server starts only when a test asks for it.
"""

from __future__ import annotations

import os
import socket
import tempfile

# Ray replaces 127.0.0.1 with the machine's network address unless this is off; it is read
# when ray is first imported, so it is set before anything imports ray.
LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
os.environ[LOOPBACK_ONLY] = "0"
# Exported inference engines are cached per model; the tests' cache is their own.
os.environ.setdefault("MURA_RAY_CACHE", tempfile.mkdtemp(prefix="mura-ray-cache-"))

import pytest
import torch
from safetensors.torch import save_file
from torchvision.models import resnet18

from mura_ray.archive.sample import write_sample
from mura_ray.config import TrainConfig

SMALL_STUDIES = 40
LEARN_STUDIES = 300


RAY_FIXTURES = {"ray_cluster", "ray_address", "two_nodes", "trained_run", "demo_model", "fake_gpu_cluster"}


def pytest_collection_modifyitems(items):
    """Tests that need Ray are marked ``ray``, so that ``pytest -m "not ray"`` runs the rest in seconds."""
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def small_archive(tmp_path_factory):
    """(root, plan) of a small archive: fast to decode, for plumbing tests."""
    root = str(tmp_path_factory.mktemp("small"))
    plan = write_sample(root, studies=SMALL_STUDIES, seed=1)
    return root, plan


@pytest.fixture(scope="session")
def learn_archive(tmp_path_factory):
    """(root, plan) of an archive large enough to learn from and to measure label leakage on."""
    root = str(tmp_path_factory.mktemp("learn"))
    plan = write_sample(root, studies=LEARN_STUDIES, seed=0)
    return root, plan


def _free_port_below_ephemeral() -> int:
    """A free port outside Ray's worker range (10002-19999) and the kernel's ephemeral range, so that
    nothing Ray starts before the S3 server takes it."""
    import random

    for port in random.Random(os.getpid()).sample(range(20000, 32000), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port between 20000 and 32000")


@pytest.fixture(scope="session")
def s3_env():
    """The S3 settings of the session's moto server, in the environment before Ray starts (its workers
    inherit them); the server itself starts only for the tests that use it (``s3_server``)."""
    endpoint = f"http://127.0.0.1:{_free_port_below_ephemeral()}"
    keys = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    yield endpoint
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def s3_server(s3_env):
    """A moto S3 server on 127.0.0.1 at the endpoint ``s3_env`` put in the environment; yields the endpoint."""
    from urllib.parse import urlparse

    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=urlparse(s3_env).port)
    server.start()
    yield s3_env
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster(s3_env):
    """A local Ray cluster on 127.0.0.1, started once, sized as mura-ray sizes its own."""
    import ray

    from mura_ray import cluster

    os.environ.pop("RAY_ADDRESS", None)
    started = cluster.connect()
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket on the moto server; yields its name."""
    import boto3

    name = "mura-" + request.node.name.lower().replace("_", "-")[:40]
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def start_weights(tmp_path_factory):
    """A 1000-class ResNet18 state dict as safetensors, standing in for downloaded ImageNet weights."""
    path = str(tmp_path_factory.mktemp("weights") / "resnet18.safetensors")
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in resnet18(num_classes=1000).state_dict().items()}, path)
    return path


@pytest.fixture(scope="session")
def trained_run(ray_cluster, learn_archive, start_weights, tmp_path_factory):
    """Two epochs, two workers, small images, starting from a state dict file.

    One worker is killed (SIGKILL) in the middle of epoch 2, once: the run has
    to restart the worker group from epoch 1's checkpoint and finish. Its
    paths are given relative to a working directory that is neither the
    checkout nor Ray's, as a user in another folder would type them.
    """
    root, _ = learn_archive
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    before = os.getcwd()
    os.chdir(elsewhere)
    try:
        cfg = TrainConfig(
            data=os.path.relpath(root),
            out="runs/r1",
            workers=2,
            epochs=2,
            image_size=48,
            batch_size=16,
            weights=start_weights,
            patience=5,
            max_failures=1,
        )
    finally:
        os.chdir(before)
    return cfg, _run_training(cfg, fault="train-epoch@2")


@pytest.fixture(scope="session")
def demo_model(ray_cluster, tmp_path_factory):
    """(archive root, model folder) of the demo: its archive and its training, as `mura-ray demo` runs them."""
    from mura_ray.config import DemoConfig
    from mura_ray.demo import demo_train_config
    from mura_ray.training.driver import run_training

    base = tmp_path_factory.mktemp("demo")
    cfg = DemoConfig(out=str(base))
    root = str(base / "archive")
    write_sample(root, studies=cfg.studies, seed=0)
    return root, run_training(demo_train_config(cfg, root, str(base / "run")))["model_dir"]


def _run_training(cfg, fault=None):
    """``run_training``, with ``MURA_RAY_FAULT`` set to ``fault`` while it runs (the driver hands it to the workers)."""
    from mura_ray.training.driver import run_training

    saved = os.environ.pop("MURA_RAY_FAULT", None)
    if fault:
        os.environ["MURA_RAY_FAULT"] = fault
    try:
        return run_training(cfg)
    finally:
        os.environ.pop("MURA_RAY_FAULT", None)
        if saved is not None:
            os.environ["MURA_RAY_FAULT"] = saved


def write_untrained_model(directory: str, seed: int, image_size: int = 48) -> str:
    """A checkpoint with seeded random weights: scoring plumbing needs a model, not a good one."""
    from mura_ray.model.checkpoint import model_metadata, save_checkpoint
    from mura_ray.model.resnet import build_model

    torch.manual_seed(seed)
    return save_checkpoint(directory, build_model().eval(), dict(model_metadata(image_size), threshold=0.5))


@pytest.fixture(scope="session")
def untrained_models(tmp_path_factory):
    """Two checkpoints (different weights, so different model ids): [(dir, model_id), ...]."""
    base = tmp_path_factory.mktemp("models")
    return [(str(base / f"m{i}"), write_untrained_model(str(base / f"m{i}"), seed=i)) for i in range(2)]


@pytest.fixture(scope="session")
def ray_address(ray_cluster):
    """The address a separate driver process uses to join the test cluster."""
    return ray_cluster.get_runtime_context().gcs_address
