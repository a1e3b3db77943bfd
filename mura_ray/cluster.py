"""Connecting to Ray (a cluster named by RAY_ADDRESS, as in a Ray Job, else a local one) and sizing the work on it.

One planner for both jobs: ``training_plan`` sizes Ray Train's workers,
``scoring_plan`` the model actors of a scoring run, from the cluster's
resources, so that Ray Data's read and decode tasks always keep a CPU.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import ray

from mura_ray.errors import UsageError

log = logging.getLogger(__name__)

_LOCAL: set[str] = set()  # the clusters this process started: no autoscaler runs there
MAX_GPU_ACTORS = 1024.0  # the pool's ceiling when the autoscaler sets no limit on GPU nodes


def largest_node_cpus(default: float) -> float:
    """CPUs of the biggest live node: an actor or a worker must fit on one node."""
    return max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=default)


def require_connected(what: str) -> None:
    """Raise unless this process is connected to Ray: a job connects once, on purpose (``connect``), before
    it builds a dataset, so that Ray is never started with defaults by a ``ray.put`` somewhere."""
    if not ray.is_initialized():
        raise RuntimeError(f"{what} needs Ray: call mura_ray.cluster.connect() first")


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
    _LOCAL.add(ray.get_runtime_context().gcs_address)
    log.info("started a local Ray cluster with %d CPUs", cpus)
    console.ray_connected()
    return True


@dataclass(frozen=True)
class GpuSupply:
    """The GPUs a job could get: those of live nodes, and those the autoscaler can still add."""

    up: float = 0.0  # GPUs of the live nodes
    launchable: float = 0.0  # GPUs of the nodes the autoscaler may still start
    per_node: float = 0.0  # the most GPUs one node has, live or launchable
    autoscaler: bool = False  # whether an autoscaler told its node types

    @property
    def reachable(self) -> float:
        return self.up + self.launchable


def autoscaler_node_types() -> list[dict[str, Any]]:
    """The node types the cluster's autoscaler may run: ``[{"name", "resources", "max_count"}]``
    (``max_count`` -1: no limit); empty where no autoscaler runs (a local cluster, fixed-size nodes).

    Ray's own record of them (the cluster config an autoscaler reports to the
    GCS, which Ray Data reads) comes first. Ray 2.60's autoscaler of
    ``ray up`` clusters does not report it, so otherwise a task on the head
    reads the config file the head's autoscaler runs with."""
    if ray.get_runtime_context().gcs_address in _LOCAL:
        return []
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception as exc:  # an older cluster, or the GCS could not answer: fall back to the head's file
        log.debug("no autoscaler cluster config in the GCS: %s", exc)
        config = None
    if config and config.node_group_configs:
        return [
            {"name": g.name, "resources": dict(g.resources), "max_count": g.max_count}
            for g in config.node_group_configs
        ]
    try:
        return ray.get(_head_autoscaler_types.remote(), timeout=60)
    except Exception as exc:  # no head to run on, or it could not answer: plan from the live nodes
        log.debug("could not read the head's autoscaling config: %s", exc)
        return []


@ray.remote(num_cpus=0, resources={"node:__internal_head__": 0.001}, max_retries=0)
def _head_autoscaler_types() -> list[dict[str, Any]]:
    """On the head: the node types of the autoscaler (monitor) of this cluster, from the file it was started
    with (``--autoscaling-config``; ``~/ray_bootstrap_config.yaml`` under ``ray up``)."""
    import psutil
    import yaml

    gcs = ray.get_runtime_context().gcs_address
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if not any(a.endswith(("autoscaler/_private/monitor.py", "autoscaler/v2/monitor.py")) for a in cmd):
            continue
        if f"--gcs-address={gcs}" not in cmd:
            continue  # another cluster's autoscaler on this machine
        path = next((a.split("=", 1)[1] for a in cmd if a.startswith("--autoscaling-config=")), None)
        if not path:
            continue
        with open(os.path.expanduser(path)) as f:
            config = yaml.safe_load(f)
        return [
            {"name": name, "resources": dict(t.get("resources") or {}), "max_count": int(t.get("max_workers", 0))}
            for name, t in config.get("available_node_types", {}).items()
        ]
    return []


def gpu_supply() -> GpuSupply:
    """What the connected cluster has up and what its autoscaler can add (``autoscaler_node_types``)."""
    live = [n["Resources"].get("GPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    types = [t for t in autoscaler_node_types() if t["resources"].get("GPU", 0) > 0 and t["max_count"] != 0]
    cap = sum(math.inf if t["max_count"] < 0 else t["resources"]["GPU"] * t["max_count"] for t in types)
    up = float(sum(live))
    return GpuSupply(
        up=up,
        launchable=max(0.0, cap - up),  # the nodes up are of these types: what is left of their maximum
        per_node=max([*live, *(t["resources"]["GPU"] for t in types)], default=0.0),
        autoscaler=bool(types),
    )


def decide_gpu(use_gpu: str | None, supply: GpuSupply, units: int, gpus_per_unit: float, what: str) -> bool:
    """Whether ``units`` of ``what`` (training workers, scoring actors) run on GPUs, ``gpus_per_unit`` each.

    ``yes`` asks for GPUs whether or not any is up now (the autoscaler brings
    them) and refuses, with one line, a request that no node up or launchable
    can ever hold. ``auto`` uses GPUs when the cluster has them up or can
    launch them, and CPUs (with a warning) when they could never hold the
    request. ``no`` never uses them."""
    if use_gpu == "no":
        return False
    fits = gpus_per_unit <= max(supply.per_node, 1.0) and units * gpus_per_unit <= supply.reachable
    if use_gpu == "yes":
        if not fits:
            raise UsageError(
                f"{units} {what} x {gpus_per_unit:g} GPU can never be placed: the cluster has {supply.up:g} GPUs up "
                f"and its autoscaler can add {supply.launchable:g} (at most {supply.per_node:g} on one node)"
                + ("" if supply.autoscaler else "; no autoscaler node types were found")
            )
        return True
    if supply.reachable == 0:
        return False
    if not fits:
        log.warning(
            "warning: %d %s x %g GPU do not fit the %g GPUs this cluster has or can add: running on CPUs "
            "(--use-gpu yes makes this an error; fewer workers or a fraction of a GPU each fit)",
            units,
            what,
            gpus_per_unit,
            supply.reachable,
        )
        return False
    return True


def training_plan(
    workers: int,
    use_gpu: str | None,
    cpus_per_worker: float | None,
    placement_strategy: str,
    gpus_per_worker: float = 1.0,
) -> tuple[ray.train.ScalingConfig, float]:
    """(ScalingConfig, CPUs per worker) for ``workers`` DDP workers on the connected cluster."""
    from ray.train import ScalingConfig

    resources = ray.cluster_resources()
    supply = gpu_supply() if use_gpu != "no" else GpuSupply()
    on_gpu = decide_gpu(use_gpu, supply, workers, gpus_per_worker, "training workers")
    if cpus_per_worker is not None:
        cpus = cpus_per_worker
    elif on_gpu:
        cpus = 1.0
    else:
        # Leave at least one CPU to Ray Data's tasks, or ingest can starve and hang.
        cpus = max(0.25, min(4.0, (resources.get("CPU", 1) - 1) / workers))
        # A worker must fit on one node and leave that node a whole CPU for Ray Data's tasks
        # (some of them ask for one CPU, and with one worker per node none could run anywhere).
        cpus = max(0.25, min(cpus, largest_node_cpus(default=cpus) - 1))
    per_worker = {"CPU": cpus, "GPU": gpus_per_worker} if on_gpu else {"CPU": cpus}
    scaling = ScalingConfig(
        num_workers=workers, use_gpu=on_gpu, resources_per_worker=per_worker, placement_strategy=placement_strategy
    )
    return scaling, cpus


@dataclass(frozen=True)
class ScoringPlan:
    """The model actors of a scoring run: a pool of ``min_actors``..``max_actors``, each with these resources."""

    min_actors: int
    max_actors: int
    cpus: float
    threads: int
    gpus: float = 0.0

    @property
    def use_gpu(self) -> bool:
        return self.gpus > 0

    def batch_size(self, asked: int | None) -> int:
        """Images per model call: what was asked, else 256 on a GPU (it is idle between small batches), else 64."""
        return asked or (256 if self.use_gpu else 64)


def scoring_plan(
    actors: int | None,
    use_gpu: str | None,
    cpus_per_actor: float | None,
    gpus_per_actor: float = 1.0,
    backend: str = "auto",
) -> ScoringPlan:
    """The model actors of a scoring run on the connected cluster.

    On GPUs the pool starts with the GPUs up now and grows to the GPUs the
    autoscaler can add (``--actors`` fixes it). OpenVINO and ONNX Runtime run
    on CPUs only, so a run that names them never holds a GPU."""
    from mura_ray.model.backends import CPU_ONLY

    if backend in CPU_ONLY:
        if use_gpu == "yes":
            raise UsageError(f"--backend {backend} runs on CPUs only: use --backend torch or auto with --use-gpu yes")
        use_gpu = "no"
    supply = gpu_supply() if use_gpu != "no" else GpuSupply()
    if decide_gpu(use_gpu, supply, actors or 1, gpus_per_actor, "scoring actors"):
        cpus = cpus_per_actor or 1.0
        reachable = min(supply.reachable, MAX_GPU_ACTORS)  # an autoscaler without a node limit
        most = actors or max(1, int(reachable // gpus_per_actor))
        least = actors or min(most, max(1, int(supply.up // gpus_per_actor)))
        return ScoringPlan(least, most, cpus, max(1, math.ceil(cpus)), gpus_per_actor)
    total = ray.cluster_resources().get("CPU", 1)
    # Decoding costs about a tenth of the forward pass on a CPU: keep that share
    # (at least half a CPU) for the read/decode tasks, give the rest to model actors.
    for_model = total - max(0.5, 0.1 * total)
    per_actor = cpus_per_actor or min(4.0, for_model, largest_node_cpus(default=total))
    count = actors or max(1, int(for_model // per_actor))
    return ScoringPlan(count, count, per_actor, max(1, math.ceil(per_actor)))


@ray.remote(num_cpus=0)
def _probe_cuda() -> dict[str, Any]:
    from mura_ray.hardware import cuda_report

    return cuda_report(ray.get_runtime_context().get_node_id())


def reserve_gpus(bundles: list[dict[str, float]], strategy: str, timeout_s: float, what: str) -> list[dict[str, Any]]:
    """Wait until ``bundles`` (each with a ``GPU`` entry) are placed, the autoscaler starting nodes for them
    if need be, and check on each that torch sees CUDA; then free them for the job to take.

    Returns what each bundle's probe found (node, GPU name, compute capability). A request not placed within
    ``timeout_s`` or placed where torch has no CUDA ends with one line (``UsageError``) instead of a hang."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    shape = ", ".join(f"{k} {v:g}" for k, v in bundles[0].items())
    log.info("waiting for %d x {%s} for the %s (up to %gs)", len(bundles), shape, what, timeout_s)
    pg = placement_group(bundles, strategy=strategy)
    try:
        if not pg.wait(timeout_seconds=timeout_s):
            raise UsageError(
                f"the {what} asked for {len(bundles)} x {{{shape}}}, which the cluster did not place within "
                f"{timeout_s:g}s (--gpu-timeout): check its GPU node types and quotas (`ray status`)"
            )
        probes = [
            _probe_cuda.options(
                num_gpus=b["GPU"],
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
            ).remote()
            for i, b in enumerate(bundles)
        ]
        found = ray.get(probes, timeout=max(60.0, timeout_s))
    finally:
        remove_placement_group(pg)
    missing = [f for f in found if not f["cuda"]]
    if missing:
        raise UsageError(missing[0]["message"])
    log.info("GPUs for the %s: %s", what, ", ".join(sorted({f["name"] for f in found})))
    return found


def place_scoring_actors(
    actors: int | None,
    use_gpu: str,
    cpus_per_actor: float | None,
    gpus_per_actor: float,
    gpu_timeout: float,
    backend: str = "auto",
) -> ScoringPlan:
    """The model actors' plan (``cluster.scoring_plan``); on GPUs, once one actor's resources are placed (the
    autoscaler starting a GPU node if need be) and torch sees CUDA there: a request that cannot be met ends
    with one line instead of a pipeline that waits for ever."""
    plan = scoring_plan(actors, use_gpu, cpus_per_actor, gpus_per_actor, backend)
    if plan.use_gpu:
        reserve_gpus([{"CPU": plan.cpus, "GPU": plan.gpus}], "PACK", gpu_timeout, "scoring actors")
    log.info(
        "scoring with %s model actors (%s) on %s",
        plan.min_actors if plan.min_actors == plan.max_actors else f"{plan.min_actors}..{plan.max_actors}",
        f"{plan.cpus:g} CPU" + (f", {plan.gpus:g} GPU each" if plan.use_gpu else " each"),
        "GPUs" if plan.use_gpu else "CPUs",
    )
    return plan
