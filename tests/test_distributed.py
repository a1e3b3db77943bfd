"""The collectives under the rules of the process groups they meet on GPUs, reproduced on a CPU.

NCCL has no CPU backend: in a group whose only backend is for CUDA, a CPU
tensor raises "No backend type associated with device type cpu". A gloo
group mapped to ``cuda`` alone has exactly that rule, so it stands in for
plain ``nccl`` here. The epoch code runs in one-rank groups, which make
the same calls a multi-rank group does (no world-size-1 shortcut).
"""

from __future__ import annotations

import contextlib

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.distributed as dist

from mura_ray.model.resnet import build_model
from mura_ray.training import distributed
from mura_ray.training.distributed import GPU_BACKEND, backend_for, gather_arrays, mean_over_workers
from mura_ray.training.epoch import train_epoch, tune_predictions

CPU = torch.device("cpu")


@contextlib.contextmanager
def one_rank_group(backend: str, tmp_path):
    dist.init_process_group(backend, init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _device_map(backend: str) -> dict[str, str]:
    return dict(item.split(":") for item in backend.split(","))


def test_gpu_training_maps_cpu_tensors_to_gloo_and_cuda_tensors_to_nccl():
    assert _device_map(GPU_BACKEND) == {"cpu": "gloo", "cuda": "nccl"}
    assert backend_for(True) == GPU_BACKEND and backend_for(False) == "gloo"


def test_a_cpu_tensor_in_a_cuda_only_group_raises_as_under_nccl(tmp_path):
    """What the old mean_over_workers met on GPUs: the rule is real, and the stand-in reproduces it."""
    with one_rank_group("cuda:gloo", tmp_path):
        with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
            dist.all_reduce(torch.zeros(2, dtype=torch.float64))


def test_the_cpu_half_of_the_gpu_backend_runs_every_helper(tmp_path):
    """Under GPU_BACKEND a CPU tensor goes to gloo: the same group, less its CUDA half (no GPU here)."""
    cpu_half = ",".join(f"{d}:{b}" for d, b in _device_map(GPU_BACKEND).items() if d == "cpu")
    with one_rank_group(cpu_half, tmp_path):
        assert distributed.world() == (0, 1)
        assert mean_over_workers(0.5, 4, CPU) == (0.5, 4)
        got = gather_arrays({"uri": np.array(["a", "b"], dtype=object), "loss_sum": np.float64(2.5)})
        assert got["uri"].tolist() == ["a", "b"] and got["loss_sum"] == 2.5


class Recorder:
    """Wraps the collectives: records the device of every tensor handed to one, then runs it."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, str | None]] = []
        for name in ("all_reduce", "all_gather", "broadcast", "reduce", "all_gather_object", "broadcast_object_list"):
            real = getattr(dist, name)
            monkeypatch.setattr(dist, name, self._wrap(name, real))

    def _wrap(self, name, real):
        def call(*args, **kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            self.calls.append((name, str(tensors[0].device) if tensors else None))
            return real(*args, **kwargs)

        return call


def test_the_epoch_code_runs_its_collectives_in_a_one_rank_group_with_tensors_on_the_workers_device(
    tmp_path, monkeypatch
):
    recorder = Recorder(monkeypatch)
    torch.manual_seed(0)
    model = build_model().to(memory_format=torch.channels_last)  # as the worker has it
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss(weight=torch.tensor([0.7, 1.8]))
    rng = np.random.default_rng(0)
    batches = [
        {"pixels": torch.from_numpy(rng.integers(0, 256, (4, 32, 32), dtype=np.uint8)), "label": torch.tensor(y)}
        for y in ([0, 1, 0, 1], [1, 1, 0, 0])
    ]
    uris = [f"s3://b/p{i}.png" for i in range(6)]
    tune = [
        {
            "pixels": rng.integers(0, 256, (3, 32, 32), dtype=np.uint8),
            "label": np.array([0, 1, 1]),
            "image_uri": np.array(uris[i : i + 3], dtype=object),
        }
        for i in (0, 3)
    ]
    catalog = pa.table({"image_uri": uris, "study_uri": [u[:-5] for u in uris], "body_part": ["XR_HAND"] * 6})
    with one_rank_group("gloo", tmp_path):
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        loss, images = train_epoch(ddp, batches, loss_fn, optimizer, CPU, None, "fp32")
        predictions, tune_loss = tune_predictions(model, tune, CPU, loss_fn, catalog)
    assert images == 8 and np.isfinite(loss) and np.isfinite(tune_loss)
    assert predictions["image_uri"].to_pylist() == sorted(uris) and predictions["study_uri"].null_count == 0
    names = [name for name, _ in recorder.calls]
    assert "all_reduce" in names and "all_gather_object" in names  # no world-size-1 shortcut
    tensor_devices = {device for _, device in recorder.calls if device is not None}
    assert tensor_devices == {str(CPU)}


def test_without_a_process_group_the_helpers_return_their_input():
    assert not dist.is_initialized()
    local = {"prob": np.array([0.1, 0.9]), "loss_sum": np.float64(1.0)}
    assert gather_arrays(local) is local
    assert mean_over_workers(0.25, 3, CPU) == (0.25, 3)


@pytest.mark.timeout(120)
def test_the_trainer_built_for_gpus_uses_the_backend_that_keeps_cpu_tensors_off_nccl(ray_cluster, tmp_path):
    """The real TorchTrainer the driver builds, for 2 GPU workers (built, not run: there is no GPU here)."""
    from ray.train import ScalingConfig

    from mura_ray.config import TrainConfig
    from mura_ray.recipes import resolve
    from mura_ray.training import driver

    cfg = TrainConfig(data=str(tmp_path), out=str(tmp_path / "run"), workers=2, weights="none", use_gpu="yes")
    resolve(cfg)
    scaling = ScalingConfig(num_workers=2, use_gpu=True, resources_per_worker={"CPU": 1.0, "GPU": 1.0})
    rows = [{"image_uri": f"u{i}", "pixels": np.zeros((40, 40), np.uint8), "label": i % 2} for i in range(4)]
    cached = {"train": ray_cluster.data.from_items(rows), "tune": ray_cluster.data.from_items(rows)}
    catalog = pa.table(
        {"image_uri": ["u0"], "study_uri": ["s"], "body_part": ["XR_HAND"], "patient_id": ["p"], "split": ["tune"]}
    )
    trainer = driver._trainer(cfg, scaling, 1.0, catalog, build_model().state_dict(), [1.0, 1.0], cached, None)
    assert trainer.backend_config.backend == GPU_BACKEND
    assert _device_map(trainer.backend_config.backend)["cpu"] == "gloo"
    cpu_cfg = TrainConfig(data=str(tmp_path), out=str(tmp_path / "run2"), workers=2, weights="none")
    resolve(cpu_cfg)
    cpu = driver._trainer(cpu_cfg, ScalingConfig(num_workers=2), 1.0, catalog, {}, [1.0, 1.0], cached, None)
    assert cpu.backend_config.backend == "gloo"
