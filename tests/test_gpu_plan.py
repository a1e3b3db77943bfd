"""Where the model runs: --use-gpu against what a cluster has and can add, GPU actor pools, GPU engines.

No GPU here: the cluster's supply is given (``GpuSupply``) and the GPU's
compute capability is patched; the fake autoscaler tests
(``test_fake_autoscaler.py``) show the same requests reaching a real Ray.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from mura_ray import cluster, hardware
from mura_ray.cluster import GpuSupply, decide_gpu
from mura_ray.errors import UsageError
from mura_ray.model import backends
from mura_ray.model.resnet import build_model, for_inference

NONE = GpuSupply()
AUTOSCALED = GpuSupply(up=0, launchable=8, per_node=4, autoscaler=True)  # gpu-1 x4 and gpu-4 x1, none up
WORKSTATION = GpuSupply(up=1, launchable=0, per_node=1)


def test_yes_asks_for_gpus_the_autoscaler_can_launch_though_none_is_up():
    assert decide_gpu("yes", AUTOSCALED, 4, 1.0, "training workers")
    assert decide_gpu("auto", AUTOSCALED, 4, 1.0, "training workers")


@pytest.mark.parametrize(
    ("supply", "units", "gpus", "needle"),
    [
        (NONE, 1, 1.0, "0 GPUs up and its autoscaler can add 0"),
        (WORKSTATION, 2, 1.0, "2 training workers x 1 GPU can never be placed"),
        (AUTOSCALED, 1, 8.0, "at most 4 on one node"),
    ],
)
def test_yes_refuses_what_no_node_up_or_launchable_can_ever_hold(supply, units, gpus, needle):
    with pytest.raises(UsageError, match=needle):
        decide_gpu("yes", supply, units, gpus, "training workers")


def test_auto_uses_cpus_without_gpus_and_says_so_when_the_gpus_are_too_few(caplog):
    assert not decide_gpu("auto", NONE, 2, 1.0, "training workers")
    assert not caplog.records  # a laptop: nothing to warn about
    with caplog.at_level(logging.WARNING):
        assert not decide_gpu("auto", WORKSTATION, 2, 1.0, "training workers")
    assert "running on CPUs" in caplog.text and "--use-gpu yes" in caplog.text
    assert decide_gpu("auto", WORKSTATION, 1, 1.0, "training workers")
    assert not decide_gpu("no", AUTOSCALED, 1, 1.0, "training workers")


def test_a_gpu_scoring_pool_starts_with_the_gpus_up_and_grows_to_what_the_autoscaler_adds(monkeypatch):
    monkeypatch.setattr(cluster, "gpu_supply", lambda: GpuSupply(up=1, launchable=7, per_node=4, autoscaler=True))
    plan = cluster.scoring_plan(None, "auto", None, 1.0)
    assert (plan.min_actors, plan.max_actors, plan.gpus, plan.use_gpu) == (1, 8, 1.0, True)
    assert plan.batch_size(None) == 256 and plan.batch_size(32) == 32
    shared = cluster.scoring_plan(None, "yes", None, 0.5)
    assert (shared.min_actors, shared.max_actors, shared.gpus) == (2, 16, 0.5)
    fixed = cluster.scoring_plan(3, "yes", None, 1.0)
    assert (fixed.min_actors, fixed.max_actors) == (3, 3)


def test_cpu_engines_never_hold_a_gpu(monkeypatch):
    monkeypatch.setattr(cluster, "gpu_supply", lambda: AUTOSCALED)
    monkeypatch.setattr(cluster.ray, "cluster_resources", lambda: {"CPU": 8.0})
    monkeypatch.setattr(cluster, "largest_node_cpus", lambda default: 8.0)
    for backend in ("openvino", "onnxruntime"):
        plan = cluster.scoring_plan(None, "auto", None, 1.0, backend)
        assert not plan.use_gpu and plan.gpus == 0 and plan.batch_size(None) == 64
        with pytest.raises(UsageError, match=f"--backend {backend} runs on CPUs only"):
            cluster.scoring_plan(None, "yes", None, 1.0, backend)


@pytest.mark.parametrize(("capability", "native"), [((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_bf16_counts_as_native_only_from_sm80_on_the_device_asked_about(capability, native, monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: asked.append(d) or capability)
    device = torch.device("cuda", 1)
    assert hardware.bf16_native(device) is native
    assert asked == [device]
    expected = ("torch", "bf16" if native else "fp16")
    assert backends.candidates("auto", "auto", device) == [expected, ("torch", "fp32")]
    assert backends.all_engines(device) == [expected, ("torch", "fp32")]
    with pytest.raises(UsageError, match="runs on CPUs only"):
        backends.candidates("openvino", "auto", device)


def test_an_engine_that_fails_in_its_first_run_falls_back_instead_of_killing_the_actor(monkeypatch):
    torch.manual_seed(0)
    model = for_inference(build_model())
    pixels = np.random.default_rng(0).integers(0, 256, (4, 32, 32), dtype=np.uint8)
    real = backends.build_torch

    def no_bf16_kernels(graph, precision, device, side, model_id):
        engine = real(graph, precision, device, side, model_id)
        if precision != "bf16":
            return engine

        def run(p):
            raise RuntimeError("CUDNN_STATUS_NOT_SUPPORTED")

        return backends.Engine("torch", "bf16", run, device.type)

    monkeypatch.setitem(backends.BUILDERS, "torch", no_bf16_kernels)
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: True)  # torch bf16 is the first candidate
    assert backends.candidates("torch", "auto", torch.device("cpu"))[0] == ("torch", "bf16")
    engine = backends.select(model, "torch", "auto", torch.device("cpu"), 32, "m", pixels)
    assert (engine.backend, engine.precision) == ("torch", "fp32")
    with pytest.raises(RuntimeError, match="CUDNN_STATUS_NOT_SUPPORTED"):
        backends.select(model, "torch", "bf16", torch.device("cpu"), 32, "m", pixels)


def test_the_training_guard_measured_on_a_cpu_refuses_nothing_on_a_gpu():
    meta = {"engine_guard": {"device": "cpu", "engines": {"torch bf16": {"passes": False}}}}
    assert backends.failed_guard(meta, "cpu") == ["torch bf16"]
    assert backends.failed_guard(meta, "cuda") == []
    older = {"engine_guard": {"engines": {"openvino bf16": {"passes": False}}}}  # before the record named it
    assert backends.failed_guard(older) == ["openvino bf16"] and backends.failed_guard(older, "cuda") == []


def test_a_node_without_cuda_says_so_in_one_line():
    report = hardware.cuda_report("0123456789abcdef")
    assert report["cuda"] is False  # no GPU on this machine
    assert "\n" not in report["message"] and "--use-gpu no" in report["message"]
    assert report["message"].startswith("node 0123456789ab gave this process a GPU")
