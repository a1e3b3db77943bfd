"""Ray Jobs on a real two-node cluster (`ray start`) on 127.0.0.1, with token authentication.

The test starts a head and a second node process with their own ports and
temp dir, submits the jobs in jobs/ with jobs/runtime_env.yaml through the
Jobs API (the `ray job` CLI), and stops only the processes it started.
"""

from __future__ import annotations

import datetime as dt
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

import pytest
from conftest import LOOPBACK_ONLY, _free_port
from fake_autoscaler import RAY_START, node_ports

from tests.readers import connect

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
RAY = os.path.join(BIN, "ray")
# `ray start` on 127.0.0.1 with the multi-node check passed (fake_autoscaler.RAY_START says why).


class TwoNodeCluster:
    def __init__(self) -> None:
        self.token = secrets.token_hex(24)
        self.temp = tempfile.mkdtemp(prefix="mr-", dir="/tmp")  # short: Ray's socket paths live under it
        self.gcs_port, self.dash_port = _free_port(), _free_port()
        self.dashboard = f"http://127.0.0.1:{self.dash_port}"
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MURA_RAY_FAULT")}
        # The jobs' `python` is the one on the PATH of the processes `ray start` launches.
        env.update(PATH=BIN + os.pathsep + env.get("PATH", ""), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)
        env[LOOPBACK_ONLY] = "0"
        # Ray processes that look for "the" cluster on this machine would find the test session's too.
        env["RAY_ADDRESS"] = f"127.0.0.1:{self.gcs_port}"
        self.env = env
        self.procs: list[subprocess.Popen] = []
        try:
            self._start_nodes()
        except BaseException:
            self.stop()
            raise

    def _start_nodes(self) -> None:
        common = ["--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
        # Each node its own temp dir, as on separate machines: they would otherwise share (and
        # clean up) each other's runtime-env files.
        os.makedirs(os.path.join(self.temp, "head"))
        os.makedirs(os.path.join(self.temp, "n2"))
        self.procs.append(
            self._start(
                [
                    "--head",
                    f"--port={self.gcs_port}",
                    "--num-cpus=2",
                    "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={self.dash_port}",
                    f"--temp-dir={self.temp}/head",
                    *common,
                    *node_ports(),
                ],
                "head",
            )
        )
        self._wait_for_dashboard()
        self.procs.append(
            self._start(
                [
                    f"--address=127.0.0.1:{self.gcs_port}",
                    "--num-cpus=2",
                    '--resources={"second_node": 1}',
                    f"--temp-dir={self.temp}/n2",
                    *common,
                    *node_ports(),
                ],
                "node2",
            )
        )
        self._wait_for_nodes(2)

    def _start(self, args: list[str], name: str) -> subprocess.Popen:
        log = open(os.path.join(self.temp, f"{name}.log"), "w")
        return subprocess.Popen(
            [*RAY_START, *args], env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def _wait_for_dashboard(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.get("/api/version", token=True)
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(1)
        raise RuntimeError("the head's dashboard did not come up:\n" + self.logs())

    def _wait_for_nodes(self, n: int, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                request = urllib.request.Request(self.dashboard + "/api/v0/nodes?limit=100")
                request.add_header("Authorization", f"Bearer {self.token}")
                with urllib.request.urlopen(request, timeout=10) as response:
                    nodes = json.load(response)["data"]["result"]["result"]
                if sum(node["state"] == "ALIVE" for node in nodes) >= n:
                    return
            except (urllib.error.URLError, OSError, KeyError, ValueError):
                pass
            time.sleep(2)
        raise RuntimeError(f"fewer than {n} nodes joined:\n" + self.logs())

    def get(self, path: str, token: bool) -> int:
        request = urllib.request.Request(self.dashboard + path)
        if token:
            request.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status

    def ray(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        """The `ray` CLI with the token in its environment, against the head's Jobs API."""
        command = [
            RAY,
            *args[:2],
            "--address",
            self.dashboard,
            *args[2:],
        ]  # e.g. ray job submit --address URL ... -- cmd
        out = subprocess.run(command, env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise RuntimeError(f"ray {' '.join(args)} failed: {out.stdout[-2000:]}\n{out.stderr[-2000:]}")
        return out

    def submit(self, submission_id: str, *entrypoint: str) -> subprocess.CompletedProcess:
        return self.ray(
            "job",
            "submit",
            "--submission-id",
            submission_id,
            "--runtime-env",
            "jobs/runtime_env.yaml",
            "--no-wait",
            "--",
            *entrypoint,
            check=False,
        )

    def wait(self, submission_id: str, timeout: float = 420) -> str:
        """The job's final status, polled through the Jobs REST API (a `ray` CLI call costs seconds of CPU)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            request = urllib.request.Request(f"{self.dashboard}/api/jobs/{submission_id}")
            request.add_header("Authorization", f"Bearer {self.token}")
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    status = json.load(response)["status"]
            except (urllib.error.URLError, OSError, KeyError, ValueError):
                status = None
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                return status
            time.sleep(2)
        raise TimeoutError(f"job {submission_id} did not finish in {timeout}s:\n{self.job_logs(submission_id)[-3000:]}")

    def job_logs(self, submission_id: str) -> str:
        return self.ray("job", "logs", submission_id, check=False).stdout

    def logs(self) -> str:
        return "\n".join(
            open(os.path.join(self.temp, f"{n}.log")).read()[-2000:]
            for n in ("head", "node2")
            if os.path.exists(os.path.join(self.temp, f"{n}.log"))
        )

    def stop(self) -> None:
        for proc in reversed(self.procs):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="module")
def two_nodes():
    cluster = TwoNodeCluster()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.timeout(600)
def test_the_dashboard_refuses_requests_without_the_token(two_nodes):
    assert two_nodes.get("/api/jobs/", token=True) == 200
    with pytest.raises(urllib.error.HTTPError) as refused:
        two_nodes.get("/api/jobs/", token=False)
    assert refused.value.code in (401, 403)


@pytest.mark.timeout(600)
def test_nightly_scoring_job_runs_once_per_night(two_nodes, small_archive, untrained_models, tmp_path):
    root, plan = small_archive
    (model, model_id), _ = untrained_models
    out = str(tmp_path / "scores")
    night = f"score-small-archive-{dt.date.today().isoformat()}"
    args = ["python", "jobs/score.py", "--model", model, "--data", root, "--out", out, "--split", "valid"]
    submitted = two_nodes.submit(night, *args)
    assert submitted.returncode == 0, submitted.stderr[-2000:]
    state = two_nodes.wait(night)
    logs = two_nodes.job_logs(night)
    assert state == "SUCCEEDED", logs[-3000:]
    n_valid = sum(i.split == "valid" for i in plan)
    assert f"scored {n_valid}, skipped 0" in logs
    con = connect(out)
    assert con.execute(
        "SELECT count(*), count(DISTINCT image_uri), min(model_id), max(model_id) FROM images"
    ).fetchone() == (n_valid, n_valid, model_id, model_id)
    # The same night again is refused by its submission id.
    again = two_nodes.submit(night, *args)
    assert again.returncode != 0 and "already exists" in (again.stdout + again.stderr).lower()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_training_job_runs_ddp_across_the_two_nodes(two_nodes, small_archive, tmp_path):
    root, _ = small_archive
    run = str(tmp_path / "run")
    job = f"train-{secrets.token_hex(3)}"
    submitted = two_nodes.submit(
        job,
        "python",
        "jobs/train.py",
        "--data",
        root,
        "--out",
        run,
        "--workers",
        "2",
        "--epochs",
        "1",
        "--image-size",
        "32",
        "--batch-size",
        "8",
        "--weights",
        "none",
        "--placement-strategy",
        "STRICT_SPREAD",
    )
    assert submitted.returncode == 0, submitted.stderr[-2000:]
    state = two_nodes.wait(job)
    assert state == "SUCCEEDED", two_nodes.job_logs(job)[-3000:]
    events = [json.loads(line) for line in open(os.path.join(run, "events.jsonl"))]
    started = [e for e in events if e["event"] == "started"]
    assert started and started[0]["workers"] == 2 and started[0]["nodes"] == 2
    assert os.path.exists(os.path.join(run, "model", "model.safetensors"))
    assert json.load(open(os.path.join(run, "model", "metadata.json")))["metrics"]["epoch"] == 1


@pytest.mark.timeout(600)
def test_a_job_with_a_bad_input_fails_and_says_why(two_nodes, untrained_models, tmp_path):
    (model, _), _ = untrained_models
    job = f"score-missing-{secrets.token_hex(3)}"
    missing = str(tmp_path / "no-such-archive")
    submitted = two_nodes.submit(
        job, "python", "jobs/score.py", "--model", model, "--data", missing, "--out", str(tmp_path / "o")
    )
    assert submitted.returncode == 0, submitted.stderr[-2000:]
    assert two_nodes.wait(job) == "FAILED"
    last = [line for line in two_nodes.job_logs(job).splitlines() if line.strip()][-1]
    assert last == f"mura-ray: error: archive root not found: {missing!r}"
