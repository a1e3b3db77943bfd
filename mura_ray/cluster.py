"""Connecting to Ray (a cluster named by RAY_ADDRESS, as in a Ray Job, else a local one) and sizing the work on it.

One planner for both jobs: ``training_plan`` sizes Ray Train's workers,
``scoring_plan`` the model actors of a scoring run, from the cluster's
resources, so that Ray Data's read and decode tasks always keep a CPU.
"""

from __future__ import annotations

import logging
import math
import os

import ray

log = logging.getLogger(__name__)


def largest_node_cpus(default: float) -> float:
    """CPUs of the biggest live node: an actor or a worker must fit on one node."""
    return max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=default)


def connect(num_cpus: int | None = None) -> bool:
    """Make sure this process is connected to Ray; returns whether it started a local cluster.

    Inside a Ray Job or with ``RAY_ADDRESS`` set, the existing cluster is
    used. Otherwise a local cluster is started on 127.0.0.1 with the
    machine's CPUs (or ``num_cpus``; ``MURA_RAY_NUM_CPUS`` overrides), and
    it stops when this process exits.
    """
    from mura_ray import console

    if ray.is_initialized():
        console.ray_connected()
        return False
    console.before_ray_init()
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        console.ray_connected()
        return False
    env_cpus = os.environ.get("MURA_RAY_NUM_CPUS")
    cpus = int(env_cpus) if env_cpus else (num_cpus or os.cpu_count() or 1)
    # Fewer than 2 logical CPUs cannot hold a worker and Ray Data's read tasks at once.
    cpus = max(cpus, 2)
    # No dashboard: on a few cores its metrics and State API cost training time. Ray Train's
    # placement-group cleaner then warns that the State API is unavailable; that goes to Ray's log.
    ray.init(num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=True)
    log.info("started a local Ray cluster with %d CPUs", cpus)
    console.ray_connected()
    return True


def training_plan(
    workers: int, use_gpu: bool | None, cpus_per_worker: float | None, placement_strategy: str
) -> tuple[ray.train.ScalingConfig, float]:
    """(ScalingConfig, CPUs per worker) for ``workers`` DDP workers on the connected cluster."""
    from ray.train import ScalingConfig

    resources = ray.cluster_resources()
    use_gpu = use_gpu if use_gpu is not None else resources.get("GPU", 0) >= workers
    if cpus_per_worker is not None:
        cpus = cpus_per_worker
    elif use_gpu:
        cpus = 1.0
    else:
        # Leave at least one CPU to Ray Data's tasks, or ingest can starve and hang.
        cpus = max(0.25, min(4.0, (resources.get("CPU", 1) - 1) / workers))
        # A worker must fit on one node and leave that node a whole CPU for Ray Data's tasks
        # (some of them ask for one CPU, and with one worker per node none could run anywhere).
        cpus = max(0.25, min(cpus, largest_node_cpus(default=cpus) - 1))
    scaling = ScalingConfig(
        num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus}, placement_strategy=placement_strategy
    )
    return scaling, cpus


def scoring_plan(
    actors: int | None, use_gpu: bool | None, cpus_per_actor: float | None
) -> tuple[int, float, int, bool]:
    """(model actors, CPUs per actor, torch threads per actor, use GPU) for a scoring run."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    use_gpu = use_gpu if use_gpu is not None else gpus > 0
    if use_gpu:
        cpus = cpus_per_actor or 1.0
        return actors or max(1, gpus), cpus, max(1, math.ceil(cpus)), True
    total = resources.get("CPU", 1)
    # Decoding costs about a tenth of the forward pass on a CPU: keep that share
    # (at least half a CPU) for the read/decode tasks, give the rest to model actors.
    for_model = total - max(0.5, 0.1 * total)
    per_actor = cpus_per_actor or min(4.0, for_model, largest_node_cpus(default=total))
    count = actors or max(1, int(for_model // per_actor))
    return count, per_actor, max(1, math.ceil(per_actor)), False
