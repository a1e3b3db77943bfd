"""The deployment files: cluster.yaml against Ray's own schema, KubeRay manifests, the job runtime env."""

from __future__ import annotations

import json
import os
import re

import jsonschema
import ray
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRIVATE_PORTS = {6379, 8265, 10001}


def _load(path):
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def test_cluster_yaml_is_valid_for_ray_and_secure_by_default():
    text = _load("cluster.yaml")
    config = yaml.safe_load(text)
    schema_path = os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")
    with open(schema_path) as f:
        jsonschema.validate(config, json.load(f))

    assert config["provider"]["type"] == "aws"
    assert config["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")
    assert "ray-ml" not in text
    nodes = config["available_node_types"]
    assert config["head_node_type"] in nodes
    workers = {k: v for k, v in nodes.items() if k != config["head_node_type"]}
    assert len(workers) >= 2 and all("min_workers" in v and "max_workers" in v for v in workers.values())
    gpu_types = {v["node_config"]["InstanceType"] for v in workers.values()}
    assert {"g5.2xlarge", "g5.12xlarge"} <= gpu_types  # one GPU each, and four in one node for DDP
    assert config["idle_timeout_minutes"] > 0 and config["max_workers"] >= sum(
        v["max_workers"] for v in workers.values()
    )

    # S3 through an instance profile on every node; no keys anywhere.
    assert all("IamInstanceProfile" in v["node_config"] for v in nodes.values())
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID", text)

    # Token authentication on every node, the token file mounted.
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert any("auth_token" in dst for dst in config["file_mounts"])

    # Every node is in a security group made beforehand (SSH from ADMIN_CIDR only, README): given
    # none, Ray's AWS provider creates one itself and opens port 22 to 0.0.0.0/0.
    assert "security_group" not in config["provider"]
    assert all(v["node_config"].get("SecurityGroupIds") and v["node_config"].get("SubnetIds") for v in nodes.values())
    readme = _load("README.md")
    assert "authorize-security-group-ingress" in readme and "--cidr ADMIN_CIDR/32" in readme
    assert "0.0.0.0/0" not in readme
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    assert any("pip install" in c and "mura-ray" in c for c in config["setup_commands"])


def _docs(path):
    return [d for d in yaml.safe_load_all(_load(path)) if d]


def _check_rayjob(job, entry_script):
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert entry_script in spec["entrypoint"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["authOptions"]["mode"] == "token"
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert head and head[0]["image"]
    groups = cluster["workerGroupSpecs"]
    assert groups and all(
        g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu") for g in groups
    )
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] <= 600  # the GPUs go within minutes of the job's end
    if not cluster.get("enableInTreeAutoscaling"):
        assert not any("maxReplicas" in g or "minReplicas" in g for g in groups)  # bounds would do nothing
    assert not re.search(r"AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID", json.dumps(job))


def test_kuberay_training_job_and_nightly_scoring():
    (train,) = _docs("k8s/rayjob-train.yaml")
    _check_rayjob(train, "jobs/train.py")

    docs = {d["kind"]: d for d in _docs("k8s/cronjob-score.yaml")}
    assert {"CronJob", "ConfigMap", "ServiceAccount", "Role", "RoleBinding"} <= set(docs)
    cron = docs["CronJob"]
    assert cron["apiVersion"] == "batch/v1" and cron["spec"]["schedule"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    command = " ".join(pod["containers"][0]["command"] + pod["containers"][0]["args"])
    assert "kubectl create" in command and "date -u +%Y-%m-%d" in command  # one RayJob per night, by name
    rayjob = yaml.safe_load(docs["ConfigMap"]["data"]["rayjob.yaml"])
    _check_rayjob(rayjob, "jobs/score.py")
    assert "NIGHT" in rayjob["metadata"]["name"]
    (rule,) = docs["Role"]["rules"]
    assert rule["resources"] == ["rayjobs"] and set(rule["verbs"]) == {"create", "get", "list", "delete"}
    assert "kubectl delete" in command and "head -n -7" in command  # old RayJobs are cleaned up
    assert re.search(r"@sha256:\S+$", pod["containers"][0]["image"])  # the scheduler's image by digest
    # What a RayJob created by the scheduler may hold: the mura-ray image and service account only.
    policy = docs["ValidatingAdmissionPolicy"]["spec"]
    assert "mura-ray-scheduler" in policy["matchConditions"][0]["expression"]
    checks = " ".join(v["expression"] for v in policy["validations"])
    image = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert f"c.image == '{image}'" in checks and "serviceAccountName == 'mura-ray'" in checks
    assert (
        docs["ValidatingAdmissionPolicyBinding"]["spec"]["policyName"]
        == docs["ValidatingAdmissionPolicy"]["metadata"]["name"]
    )


def test_every_service_account_the_manifests_use_is_defined_in_them():
    docs = [d for name in sorted(os.listdir(os.path.join(ROOT, "k8s"))) for d in _docs(f"k8s/{name}")]
    defined = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    text = "\n".join(_load(f"k8s/{name}") for name in os.listdir(os.path.join(ROOT, "k8s")))
    used = set(re.findall(r"serviceAccountName: (\S+)", text))
    assert used and used <= defined, used - defined


def test_job_runtime_env_ships_the_code_and_not_the_environment():
    env = yaml.safe_load(_load("jobs/runtime_env.yaml"))
    assert env["working_dir"] == "."
    assert {".git", ".venv"} <= set(env["excludes"])
    for script in ("jobs/train.py", "jobs/score.py"):
        assert "from mura_ray.cli import main" in _load(script)
