"""Connecting to Ray: a cluster named by RAY_ADDRESS (as in a Ray Job), else a local one."""

from __future__ import annotations

import logging
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
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        console.ray_connected()
        return False
    env_cpus = os.environ.get("MURA_RAY_NUM_CPUS")
    cpus = int(env_cpus) if env_cpus else (num_cpus or os.cpu_count() or 1)
    # Fewer than 2 logical CPUs cannot hold a worker and Ray Data's read tasks at once.
    cpus = max(cpus, 2)
    # The dashboard (on 127.0.0.1 only) serves Ray's State API, which Ray Train's controller polls;
    # without it that poll fails and warns every few seconds.
    ctx = ray.init(num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1",
                   log_to_driver=True)
    log.info("started a local Ray cluster with %d CPUs; dashboard at http://%s", cpus, ctx.dashboard_url)
    console.ray_connected()
    return True
