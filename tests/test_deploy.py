"""The deployment files: cluster.yaml against Ray's own schema, KubeRay manifests, the job runtime env."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re

import jsonschema
import ray
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRIVATE_PORTS = {6379, 8265, 10001}
# KubeRay's RayJob CRD (ray-operator/config/crd/bases/ray.io_rayjobs.yaml at tag v1.7.0): the
# openAPIV3Schema of version v1, as the operator installs it (see tests/kuberay/README.md).
RAYJOB_SCHEMA = os.path.join(ROOT, "tests", "kuberay", "rayjob-v1-openapi-kuberay-v1.7.0.json")
PROJECT_IMAGE = re.compile(r"^REGISTRY/mura-ray(:VERSION|@sha256:\S+)$")


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

    # Every node starts from mura-ray's image, the same on the head and the workers, and installs
    # nothing when it boots.
    docker = config["docker"]
    assert PROJECT_IMAGE.match(docker["image"]), docker["image"]
    images = {docker.get("head_image", docker["image"]), docker.get("worker_image", docker["image"])}
    images |= {v["docker"]["worker_image"] for v in nodes.values() if "worker_image" in v.get("docker", {})}
    assert images == {docker["image"]}
    command_lists = [v for k, v in config.items() if k.endswith("_commands")]
    command_lists += [v[k] for v in nodes.values() for k in v if k.endswith("_commands")]
    commands = [c for cs in command_lists for c in cs]
    assert config["setup_commands"] == ["chmod 600 /home/ray/.ray/auth_token"]
    assert not [c for c in commands if re.search(r"\b(pip|uv|conda|apt-get|apt)\b.*\binstall\b", c)]
    assert list(config["file_mounts"]) == ["/home/ray/.ray/auth_token"]  # the code is in the image


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
    if not cluster.get("enableInTreeAutoscaling"):  # fixed sizes: the bounds say the same
        assert all(g["replicas"] == g["minReplicas"] == g["maxReplicas"] for g in groups), groups
    assert "--use-gpu yes" in spec["entrypoint"]  # the workers have GPUs: ask for them, never fall back to CPUs
    images = {c["image"] for g in [cluster["headGroupSpec"], *groups] for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1 and PROJECT_IMAGE.match(images.pop())
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
    (prefix,) = re.findall(r"object\.spec\.entrypoint\.startsWith\('([^']+)'\)", checks)
    assert rayjob["spec"]["entrypoint"].startswith(prefix)  # the policy admits tonight's RayJob
    assert (
        docs["ValidatingAdmissionPolicyBinding"]["spec"]["policyName"]
        == docs["ValidatingAdmissionPolicy"]["metadata"]["name"]
    )


def _kubernetes_json_schema(node):
    """One node of a CRD's structural OpenAPI schema -> the JSON Schema `jsonschema` checks a manifest with.

    `x-kubernetes-int-or-string` nodes take an integer or a string (Kubernetes quantities: cpu 8 or
    "8", memory 32Gi); an object with `properties` refuses fields it does not declare, as
    `kubectl create` does (strict field validation, its default since 1.27). Defaults are not
    filled in (the API server would): a manifest must write out every field the schema requires.
    """
    out = dict(node)
    if node.get("x-kubernetes-int-or-string"):
        out.pop("anyOf", None)
        out["type"] = ["integer", "string"]
    if "properties" in node:
        out["properties"] = {name: _kubernetes_json_schema(sub) for name, sub in node["properties"].items()}
        out.setdefault("additionalProperties", bool(node.get("x-kubernetes-preserve-unknown-fields")))
    for key in ("items", "additionalProperties", "not"):
        if isinstance(node.get(key), dict):
            out[key] = _kubernetes_json_schema(node[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [_kubernetes_json_schema(sub) for sub in out[key]]
    return out


def _rayjob_schema_errors(job):
    """What KubeRay v1.7.0's RayJob schema says of `job`: one 'path: message' line per error, sorted."""
    with open(RAYJOB_SCHEMA) as f:
        validator = jsonschema.Draft4Validator(_kubernetes_json_schema(json.load(f)))
    return sorted(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(job))


def _rayjobs_in_k8s():
    """Every RayJob under k8s/, by where it is: a file's own documents and those a ConfigMap holds."""
    jobs = {}
    for name in sorted(os.listdir(os.path.join(ROOT, "k8s"))):
        for doc in _docs(f"k8s/{name}"):
            if doc["kind"] == "RayJob":
                jobs[f"k8s/{name}: {doc['metadata']['name']}"] = doc
            if doc["kind"] != "ConfigMap":
                continue
            for key, value in doc.get("data", {}).items():
                embedded = yaml.safe_load(value)
                if isinstance(embedded, dict) and embedded.get("kind") == "RayJob":
                    jobs[f"k8s/{name}: ConfigMap {doc['metadata']['name']}/{key}"] = embedded
    return jobs


def test_every_rayjob_in_k8s_is_valid_under_kuberays_crd_schema():
    jobs = _rayjobs_in_k8s()
    assert len(jobs) == 2, sorted(jobs)  # the training job and the one the nightly CronJob creates
    errors = {where: _rayjob_schema_errors(job) for where, job in jobs.items()}
    assert not any(errors.values()), errors


def test_the_rayjob_schema_check_finds_missing_bounds_unknown_fields_and_bad_quantities():
    (job,) = _docs("k8s/rayjob-train.yaml")
    group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    resources = group["template"]["spec"]["containers"][0]["resources"]
    resources["limits"]["cpu"] = 8  # a quantity as an integer is as valid as "8"
    assert _rayjob_schema_errors(job) == []

    del group["maxReplicas"]
    group["replica"] = 4
    resources["requests"]["memory"] = "32 GB"
    where = "spec/rayClusterSpec/workerGroupSpecs/0"
    errors = _rayjob_schema_errors(job)
    assert len(errors) == 3, errors
    assert f"{where}: 'maxReplicas' is a required property" in errors
    assert f"{where}: Additional properties are not allowed ('replica' was unexpected)" in errors
    assert any(e.startswith(f"{where}/template/spec/containers/0/resources/requests/memory: '32 GB'") for e in errors)


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


def _constraints():
    """constraints.txt: {canonical name: [the versions pinned with ==]}, comments and blank lines skipped."""
    pins = {}
    for line in _load("constraints.txt").splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version and "@" not in line, f"constraints.txt: not a name==version pin: {line!r}"
            pins.setdefault(canonicalize_name(name), []).append(version.strip())
    return pins


def test_every_dependency_is_pinned_in_constraints_and_installed_at_its_pin():
    project = tomllib.loads(_load("pyproject.toml"))["project"]
    declared = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    requirements = [Requirement(r) for r in declared if canonicalize_name(Requirement(r).name) != "mura-ray"]
    assert {"onnxruntime", "mlflow-skinny", "pytest"} <= {canonicalize_name(r.name) for r in requirements}
    pins = _constraints()
    assert "mura-ray" not in pins
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        assert len(pins.get(name, [])) == 1, f"constraints.txt: {name} pinned {pins.get(name, [])}, not once"
        (pin,) = pins[name]
        assert requirement.specifier.contains(pin, prereleases=True), f"{name}=={pin} is outside {requirement}"
        installed = importlib.metadata.version(requirement.name)
        assert SpecifierSet(f"=={pin}").contains(installed, prereleases=True), f"{name}: {installed} installed"

    # One Ray everywhere: the package, the pins, the image's base, the clusters.
    assert pins["ray"] == [ray.__version__]
    assert f"ray[train,data,default]=={ray.__version__}" in project["dependencies"]
    dockerfile = _load("Dockerfile")
    assert f"FROM rayproject/ray:{ray.__version__}-" in dockerfile
    assert re.search(r"^RUN pip install --no-cache-dir -c /app/constraints\.txt /app$", dockerfile, re.M)
    makefile = _load("Makefile")
    assert makefile.count("$(PIP) -c constraints.txt -e ") == 2
    assert len(re.findall(r"^\$\(VENV\)/\.installed(-test)?: pyproject\.toml constraints\.txt ", makefile, re.M)) == 2
