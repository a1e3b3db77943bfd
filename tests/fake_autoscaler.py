"""A Ray cluster on 127.0.0.1 whose autoscaler is Ray's fake one: it "launches" GPU nodes as local processes.

The head has CPUs only; one worker node type advertises ``{"GPU": 1, "CPU": 2}``
with ``min_workers: 0``. A driver that asks for GPUs (a task, an actor, a
placement group) makes the autoscaler (``provider: fake_multinode``) start
such nodes on this machine: real raylets that claim a GPU they do not have.
That is how a test shows, without a GPU, that a request reaches the
autoscaler and is placed once the nodes are up.

``ray.cluster_utils.AutoscalingCluster`` is not used: in Ray 2.60's wheel it
reads an ``example.yaml`` the wheel does not ship, and it runs
``ray stop --force``, which ends every Ray process on the machine. This
cluster writes its own config, uses its own ports, token and temp dir, and
stops only the processes it started. The test process never calls
``ray.init`` on it (it is connected to the session's cluster): it reads the
cluster through the dashboard's REST API, and drivers are subprocesses run
with ``cluster.env``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import TypeVar

import pytest
from conftest import LOOPBACK_ONLY, _free_port

T = TypeVar("T")

BIN = os.path.dirname(sys.executable)
# With LOOPBACK_ONLY "0" (conftest sets it, `env` passes it on) every Ray process stays on 127.0.0.1,
# the fake nodes the monitor starts included, but `ray start` would refuse to start a cluster node:
# this launcher passes that check and keeps the address it is given (as tests/test_cluster_jobs.py's).
RAY_START = [
    sys.executable,
    "-c",
    "import sys, ray._private.services as s, ray._private.ray_constants as c; "
    "s.resolve_ip_for_localhost = lambda host: host; c.ENABLE_RAY_CLUSTER = True; "
    "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()",
    "start",
]


def node_ports() -> list[str]:
    """Free ports for every listener of one ``ray start`` node, so that clusters on one machine never collide."""
    return [
        f"--node-manager-port={_free_port()}",
        f"--object-manager-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
    ]


HEAD_TYPE = "ray.head.default"  # the fake provider's name for the head's node type
GPU_TYPE = "gpu_worker"
MiB = 1024 * 1024


def autoscaling_config(
    *, gcs_address: str, head_cpus: int, gpu_node: dict[str, float], gpu_workers_max: int, idle_timeout_minutes: float
) -> dict:
    """The cluster config the monitor reads: every key the v1 autoscaler looks up, none filled in for it.

    Ray's ``fake_multi_node/example.yaml`` (absent from the wheel) is the model. The
    monitor reads this file as is (no defaults are merged in), so the empty lists and
    maps are required. ``gcs_address`` is where the fake nodes join (else the machine's
    address on port 6379); ``use_node_id_as_ip`` matches the fake nodes, which share one
    IP, to their resource reports by node id.
    """
    return {
        "cluster_name": "fake_gpu",
        "max_workers": gpu_workers_max,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs_address,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": {
            HEAD_TYPE: {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            GPU_TYPE: {
                "resources": dict(gpu_node),
                "node_config": {},
                "min_workers": 0,
                "max_workers": gpu_workers_max,
            },
        },
        "head_node_type": HEAD_TYPE,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        "auth": {},
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


class FakeAutoscalingCluster:
    """A head with ``head_cpus`` CPUs and an autoscaler that may add ``gpu_workers_max`` GPU nodes.

    Each GPU node (type ``GPU_TYPE``) advertises ``{"GPU": 1, "CPU": gpu_node_cpus}``
    and an object store of ``object_store_mib``, as the head does. Attributes:
    ``address`` (GCS, "127.0.0.1:PORT"), ``dashboard`` (URL), ``token``, ``env`` (the
    environment of a driver subprocess that joins this cluster with ``ray.init()``),
    ``temp`` (this cluster's temp dir, logs under it), ``config`` (the autoscaling
    config as written). A GPU node stays up ``idle_timeout_minutes`` after its last
    use (then the autoscaler ends it), so a test that asserts that nodes appear first
    waits for ``not cluster.gpu_nodes()``; fake node ids count up (...00001, ...00002).
    """

    def __init__(
        self,
        *,
        gpu_workers_max: int = 2,
        head_cpus: int = 2,
        gpu_node_cpus: int = 2,
        object_store_mib: int = 128,
        idle_timeout_minutes: float = 0.5,
        start_timeout_s: float = 120,
    ) -> None:
        self.token = secrets.token_hex(24)
        self.temp = tempfile.mkdtemp(prefix="mr-fa-", dir="/tmp")  # short: Ray's socket paths live under it
        self.gcs_port, self.dash_port = _free_port(), _free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dash_port}"
        self.head_cpus = head_cpus
        self.object_store_mib = object_store_mib
        # Each fake node gets a small object store: the default (30% of RAM each) adds up on one machine.
        gpu_node = {"CPU": gpu_node_cpus, "GPU": 1, "object_store_memory": object_store_mib * MiB}
        self.config = autoscaling_config(
            gcs_address=self.address,
            head_cpus=head_cpus,
            gpu_node=gpu_node,
            gpu_workers_max=gpu_workers_max,
            idle_timeout_minutes=idle_timeout_minutes,
        )
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MURA_RAY_FAULT")}
        env.update(PATH=BIN + os.pathsep + env.get("PATH", ""), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)
        env[LOOPBACK_ONLY] = "0"
        env["RAY_ADDRESS"] = self.address
        self.env = env
        # Only the head's processes (the monitor among them) need the fake provider's switch.
        self._head_env = dict(env, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
        self.head: subprocess.Popen | None = None
        try:
            self._start_head(start_timeout_s)
        except BaseException:
            self.stop()
            raise

    # ---- starting -------------------------------------------------------------------------------

    def _start_head(self, timeout: float) -> None:
        config_path = os.path.join(self.temp, "autoscaling.json")  # JSON is YAML: the monitor reads it
        with open(config_path, "w") as f:
            json.dump(self.config, f, indent=1)
        args = [
            "--head",
            "--block",
            f"--autoscaling-config={config_path}",
            f"--port={self.gcs_port}",
            f"--num-cpus={self.head_cpus}",
            "--num-gpus=0",
            f"--object-store-memory={self.object_store_mib * MiB}",
            "--node-ip-address=127.0.0.1",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dash_port}",
            f"--ray-client-server-port={_free_port()}",
            f"--temp-dir={self.temp}/head",
            "--disable-usage-stats",
            *node_ports(),
        ]
        log = open(os.path.join(self.temp, "head.log"), "w")
        # Its own process group: the monitor and the fake nodes it starts are in it, and stop() ends it.
        self.head = subprocess.Popen(
            [*RAY_START, *args], env=self._head_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.wait_for(lambda: self._head_exited() or self._dashboard_up(), timeout, "the head's dashboard")
        if self._head_exited():
            raise RuntimeError(f"`ray start --head` exited with {self.head.returncode}:\n{self.logs()}")
        self.wait_for(lambda: any(n["is_head_node"] for n in self.nodes()), timeout, "the head node alive")

    def _head_exited(self) -> bool:
        return self.head is not None and self.head.poll() is not None

    def _dashboard_up(self) -> bool:
        try:
            self._get("/api/version")
            return True
        except (urllib.error.URLError, OSError, ValueError):
            return False

    # ---- reading the cluster --------------------------------------------------------------------

    def _get(self, path: str) -> dict:
        request = urllib.request.Request(self.dashboard + path)
        request.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)

    def nodes(self) -> list[dict]:
        """The alive nodes: [{"node_id", "is_head_node", "resources": {"CPU": 2.0, "GPU": 1.0, ...}, "labels"}].

        Read through the dashboard's State API, so the test process needs no ``ray.init``.
        An empty list while the dashboard does not answer.
        """
        try:
            nodes = self._get("/api/v0/nodes?limit=1000")["data"]["result"]["result"]
        except (urllib.error.URLError, OSError, KeyError, ValueError):
            return []
        return [
            {
                "node_id": n["node_id"],
                "is_head_node": n["is_head_node"],
                "resources": n.get("resources_total") or {},
                "labels": n.get("labels") or {},
            }
            for n in nodes
            if n["state"] == "ALIVE"
        ]

    def gpu_nodes(self) -> list[dict]:
        """The alive nodes that advertise a GPU (here: the ones the autoscaler launched)."""
        return [n for n in self.nodes() if n["resources"].get("GPU", 0) > 0]

    def autoscaler_status(self) -> str:
        """The autoscaler's last report as ``ray status`` prints it ("Active:", "Pending:", "Pending Demands:").

        Read through the dashboard; "" while it does not answer. Text, because the
        dashboard's JSON form of the report renames keys (node types and resource
        names with underscores come back camelCased).
        """
        try:
            return self._get("/api/cluster_status?format=1")["data"]["clusterStatus"] or ""
        except (urllib.error.URLError, OSError, KeyError, ValueError):
            return ""

    def wait_for(self, predicate: Callable[[], T], timeout: float, what: str, interval: float = 1.0) -> T:
        """Poll ``predicate`` until it returns something true and return that; TimeoutError naming ``what``."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout:.0f}s for {what}; nodes: {self.nodes()}\n{self.logs()}")
            time.sleep(interval)

    def logs(self, chars: int = 3000) -> str:
        """The tails of the head's `ray start` output and of the autoscaler's (monitor's) logs, for failure messages."""
        logs = os.path.join(self.temp, "head", "session_latest", "logs")
        parts = []
        for name, path in (
            ("ray start --head", os.path.join(self.temp, "head.log")),
            ("monitor.log", os.path.join(logs, "monitor.log")),
            ("monitor.err", os.path.join(logs, "monitor.err")),
            ("monitor.out", os.path.join(logs, "monitor.out")),
        ):
            try:
                with open(path, errors="replace") as f:
                    text = f.read()[-chars:]
            except OSError:
                continue
            if text.strip():
                parts.append(f"--- {name} ---\n{text}")
        return "\n".join(parts)

    # ---- stopping -------------------------------------------------------------------------------

    def _own_processes(self) -> dict[int, str]:
        """{pid: start time} of the processes this cluster started.

        Those with this cluster's token in their environment (every Ray process of the
        cluster inherits it, fake nodes and workers too, and so do drivers run with
        ``env``), in the head's process group, run from this cluster's temp dir, and the
        descendants of all these. The start time tells a process from a later one that
        reuses its pid.
        """
        if self.head is None:
            return {}
        table = _process_table()
        mark = f"RAY_AUTH_TOKEN={self.token}".encode()
        own = {
            pid
            for pid, (_, pgid, _, cmdline) in table.items()
            if pgid == self.head.pid or self.temp in cmdline or mark in _environ(pid)
        }
        if self.head.poll() is None:  # once reaped, its pid may be another process's
            own.add(self.head.pid)
        children: dict[int, list[int]] = {}
        for pid, (ppid, *_) in table.items():
            children.setdefault(ppid, []).append(pid)
        stack = list(own)
        while stack:
            for child in children.get(stack.pop(), []):
                if child not in own:
                    own.add(child)
                    stack.append(child)
        own.discard(os.getpid())
        return {pid: table[pid][2] for pid in own if pid in table}

    def stop(self, timeout: float = 30) -> None:
        """End every process of this cluster (head, monitor, fake nodes, their workers) and remove its temp dir.

        SIGTERM, as ``ray stop`` sends, in an order that lets each part stop while the GCS
        is up (else raylets and the monitor wait out their timeouts on it): the fake nodes
        (the monitor's children), then the head (``ray start`` stops its own processes),
        then whatever is left; SIGKILL for what still runs after ``timeout`` in all. Only
        processes found by ``_own_processes`` are signalled, by pid.
        """
        if self.head is not None:
            own = self._own_processes()
            table = _process_table()
            monitors = {pid for pid in own if "autoscaler/_private/monitor.py" in table[pid][3]}
            fake_nodes = {pid: started for pid, started in own.items() if table[pid][0] in monitors}
            head = {pid: started for pid, started in own.items() if pid == self.head.pid}
            deadline = time.monotonic() + timeout
            for part in (fake_nodes, head, own):
                _signal(part, signal.SIGTERM)
                while _alive(part) and time.monotonic() < deadline:
                    time.sleep(0.2)
            _signal(own, signal.SIGKILL)
            _signal(self._own_processes(), signal.SIGKILL)  # any started while the others were stopping
            self.head.wait(timeout=timeout)
        shutil.rmtree(self.temp, ignore_errors=True)


def _process_table() -> dict[int, tuple[int, int, str, str]]:
    """{pid: (ppid, process group, start time, command line)} of this machine's live processes, from /proc.

    Zombies (exited, not yet reaped) are left out: they are gone for the purpose of stopping.
    """
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp ... starttime
        if fields[0] != "Z":
            table[int(entry)] = (int(fields[1]), int(fields[2]), fields[19], cmdline)
    return table


def _environ(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read()
    except OSError:  # gone, or another user's
        return b""


def _alive(processes: dict[int, str]) -> dict[int, str]:
    """Those of ``processes`` ({pid: start time}) still running."""
    table = _process_table()
    return {pid: started for pid, started in processes.items() if pid in table and table[pid][2] == started}


def _signal(processes: dict[int, str], sig: int) -> None:
    for pid in _alive(processes):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def fake_gpu_cluster():
    """A FakeAutoscalingCluster (CPU head, up to 2 GPU nodes launched on demand), stopped after the module.

    Idle GPU nodes go after 12 s, so that each test can start from none."""
    cluster = FakeAutoscalingCluster(idle_timeout_minutes=0.2)
    try:
        yield cluster
    finally:
        cluster.stop()
