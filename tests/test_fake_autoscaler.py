"""The fake autoscaler harness as mura-ray uses it: a separate driver asks for GPUs, and GPU nodes appear.

The cluster (``fake_autoscaler.FakeAutoscalingCluster``) has a head of CPUs and
no GPU; its autoscaler may start up to two nodes of ``{"GPU": 1, "CPU": 2}``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
from fake_autoscaler import GPU_TYPE, FakeAutoscalingCluster, fake_gpu_cluster  # noqa: F401  (the fixture)

from tests.readers import scores

# A driver of its own, as a mura-ray job is: two GPU bundles on two nodes, none of them up yet.
DRIVER = """
import os, sys
import ray
from ray.util.placement_group import placement_group

ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
print(f"GPUs before: {ray.cluster_resources().get('GPU', 0):g}", flush=True)
pg = placement_group([{"GPU": 1, "CPU": 1}] * 2, strategy="SPREAD")
ready = pg.wait(timeout_seconds=float(sys.argv[1]))
print("placement group ready" if ready else "placement group not placed", flush=True)
print(f"GPUs after: {ray.cluster_resources().get('GPU', 0):g}", flush=True)
sys.exit(0 if ready else 1)
"""


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_stop_ends_every_process_of_the_cluster_fake_nodes_included():
    """Read back with ``ps``, not with the harness's own bookkeeping.

    First in the file, so that it runs before the module's cluster starts: one cluster at a time on 2 cores.
    """
    cluster = FakeAutoscalingCluster(gpu_workers_max=1)
    try:
        one_gpu_task = (
            "import ray; ray.init(log_to_driver=False); print(ray.get(ray.remote(num_gpus=1)(lambda: 'ran').remote()))"
        )
        done = subprocess.run(
            [sys.executable, "-c", one_gpu_task], env=cluster.env, capture_output=True, text=True, timeout=120
        )
        assert "ran" in done.stdout.splitlines(), done.stdout[-2000:] + done.stderr[-2000:] + cluster.logs()
        assert len(cluster.gpu_nodes()) == 1
    finally:
        cluster.stop()
    # Every live process (zombies are dead, waiting for init to reap them), with its environment:
    # the cluster's token marks every process it started.
    ps = subprocess.run(["ps", "axeww", "-o", "pid=,pgid=,stat=,args="], capture_output=True, text=True, check=True)
    left = [
        line[:300]
        for line in ps.stdout.splitlines()
        if not line.split()[2].startswith("Z")
        and (cluster.token in line or cluster.temp in line or line.split()[1] == str(cluster.head.pid))
    ]
    assert not left, "\n".join(left)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_gpu_bundles_from_a_driver_make_the_autoscaler_start_gpu_nodes(fake_gpu_cluster, tmp_path):  # noqa: F811
    cluster = fake_gpu_cluster
    assert not cluster.gpu_nodes(), "a GPU node was up before any request"
    log = tmp_path / "driver.log"
    with open(log, "w") as out:
        driver = subprocess.Popen(
            [sys.executable, "-c", DRIVER, "150"], env=cluster.env, stdout=out, stderr=subprocess.STDOUT
        )

    def two_gpu_nodes():
        nodes = cluster.gpu_nodes()
        return nodes if len(nodes) >= 2 else None

    try:
        gpu_nodes = cluster.wait_for(two_gpu_nodes, timeout=180, what="2 GPU nodes launched by the fake autoscaler")
        driver.wait(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    output = log.read_text()
    assert driver.returncode == 0, output[-3000:]
    assert "GPUs before: 0" in output and "placement group ready" in output and "GPUs after: 2" in output, output
    assert [n["resources"]["GPU"] for n in gpu_nodes] == [1, 1] and not any(n["is_head_node"] for n in gpu_nodes)
    # Nodes of the autoscaler's GPU type, not any node that happens to claim a GPU.
    # Its report lags the nodes by an update or two.
    cluster.wait_for(
        lambda: re.search(rf"^\s*2 {GPU_TYPE}$", cluster.autoscaler_status(), re.MULTILINE),
        timeout=30,
        what=f"the autoscaler to report 2 active {GPU_TYPE} nodes",
    )


# mura-ray itself on the same cluster: its GPU requests make the autoscaler start GPU nodes, and since the
# fake nodes have no CUDA, the run then stops with one line (exit 2) instead of training on nothing.
MURA_RAY = os.path.join(os.path.dirname(sys.executable), "mura-ray")


def _no_gpu_node_up(cluster: FakeAutoscalingCluster) -> None:
    cluster.wait_for(lambda: not cluster.gpu_nodes(), timeout=120, what="the idle GPU nodes to be ended")


def _run_watching_nodes(cluster: FakeAutoscalingCluster, args: list[str], cwd: str, timeout: float = 240):
    """Run ``mura-ray ARGS`` as a driver of ``cluster``; returns (exit status, stderr, ids of GPU nodes seen)."""
    seen: set[str] = set()
    with open(os.path.join(cwd, "stderr.txt"), "w") as err:
        proc = subprocess.Popen([MURA_RAY, *args], env=cluster.env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                seen |= {n["node_id"] for n in cluster.gpu_nodes()}
                time.sleep(0.5)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    seen |= {n["node_id"] for n in cluster.gpu_nodes()}
    with open(os.path.join(cwd, "stderr.txt")) as f:
        return proc.returncode, f.read(), seen


def _last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_train_use_gpu_yes_makes_the_autoscaler_start_a_gpu_node_per_worker(
    fake_gpu_cluster,  # noqa: F811
    small_archive,
    tmp_path,
):
    cluster = fake_gpu_cluster
    _no_gpu_node_up(cluster)
    root, _ = small_archive
    args = ["train", "--data", root, "--out", str(tmp_path / "run"), "--workers", "2", "--use-gpu", "yes"]
    args += ["--epochs", "1", "--image-size", "32", "--batch-size", "8", "--weights", "none"]
    status, stderr, seen = _run_watching_nodes(cluster, args, str(tmp_path))
    assert len(seen) == 2, (seen, stderr[-3000:], cluster.logs())
    assert status == 2, stderr[-3000:]
    last = _last_line(stderr)
    assert last.startswith("mura-ray: error: node ") and "sees no CUDA device there" in last, stderr[-3000:]
    assert "Traceback" not in stderr
    assert not os.path.exists(tmp_path / "run" / "model")


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_score_use_gpu_yes_makes_the_autoscaler_start_a_gpu_node(
    fake_gpu_cluster,  # noqa: F811
    small_archive,
    untrained_models,
    tmp_path,
):
    cluster = fake_gpu_cluster
    _no_gpu_node_up(cluster)
    root, _ = small_archive
    (model, _), _ = untrained_models
    args = ["score", "--model", model, "--data", root, "--out", str(tmp_path / "scores"), "--use-gpu", "yes"]
    status, stderr, seen = _run_watching_nodes(cluster, args, str(tmp_path))
    assert len(seen) == 1, (seen, stderr[-3000:], cluster.logs())
    assert status == 2, stderr[-3000:]
    assert "sees no CUDA device there" in _last_line(stderr) and "Traceback" not in stderr
    # Nothing was scored on a CPU instead: no image row, and no chunk committed at all.
    assert scores(str(tmp_path / "scores"), "image").num_rows == 0
    assert not os.path.exists(tmp_path / "scores" / "scores" / "_delta_log")


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_gpu_requests_that_cannot_be_met_end_with_one_line(
    fake_gpu_cluster,  # noqa: F811
    small_archive,
    untrained_models,
    tmp_path,
):
    cluster = fake_gpu_cluster
    _no_gpu_node_up(cluster)
    root, _ = small_archive
    (model, _), _ = untrained_models
    # More workers than the autoscaler's node types can ever hold: refused before any node is asked for.
    args = ["train", "--data", root, "--out", str(tmp_path / "run"), "--workers", "3", "--use-gpu", "yes"]
    status, stderr, _ = _run_watching_nodes(cluster, [*args, "--weights", "none", "--batch-size", "8"], str(tmp_path))
    assert status == 2, stderr[-3000:]
    assert _last_line(stderr) == (
        "mura-ray: error: 3 training workers x 1 GPU can never be placed: the cluster has 0 GPUs up and its "
        "autoscaler can add 2 (at most 1 on one node)"
    ), stderr[-3000:]
    # A request the node types can hold, not placed within --gpu-timeout (a fake node takes seconds to start).
    _no_gpu_node_up(cluster)
    args = ["score", "--model", model, "--data", root, "--out", str(tmp_path / "scores"), "--use-gpu", "yes"]
    status, stderr, _ = _run_watching_nodes(cluster, [*args, "--gpu-timeout", "0.5"], str(tmp_path))
    assert status == 2, stderr[-3000:]
    assert _last_line(stderr) == (
        "mura-ray: error: the scoring actors asked for 1 x {CPU 1, GPU 1}, which the cluster did not place within "
        "0.5s (--gpu-timeout): check its GPU node types and quotas (`ray status`)"
    ), stderr[-3000:]
