"""``mura-ray doctor``: what mura-ray runs on, and whether it is usable.

Versions, the CPU and its speed-relevant features, the GPUs torch sees, the
Ray cluster a command would use, and whether given paths or ``s3://``
prefixes can be listed. No secret is ever printed: for S3 it names where the
credentials come from, not what they are.
"""

from __future__ import annotations

import os
import platform

from mura_ray.hardware import SPEED_FLAGS, cpu_info
from mura_ray.versions import PACKAGES, version_of

PINNED_RAY = "2.60.0"


def _gpus() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    from mura_ray.hardware import gpu_bf16_native

    shown = []
    for i in range(torch.cuda.device_count()):
        cc = torch.cuda.get_device_capability(i)
        bf16 = "bf16 native" if gpu_bf16_native(cc) else "no native bf16: fp16 for scoring"
        shown.append(f"{i}: {torch.cuda.get_device_name(i)} (sm{cc[0]}{cc[1]}, {bf16})")
    return shown


def _ray_cluster() -> tuple[str, str | None]:
    """(description, problem or None) of the cluster a command would use."""
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        cpus = os.environ.get("MURA_RAY_NUM_CPUS") or os.cpu_count()
        return f"local: a command starts its own Ray on 127.0.0.1 with {cpus} CPUs (RAY_ADDRESS is not set)", None
    import ray

    try:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        res = ray.cluster_resources()
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        shown = ", ".join(
            f"{k} {v:g}" for k, v in sorted(res.items()) if k in ("CPU", "GPU") or k.startswith("accelerator")
        )
        from mura_ray.cluster import gpu_supply

        supply = gpu_supply()
        gpus = (
            f"; its autoscaler can add {supply.launchable:g} GPUs"
            if supply.autoscaler
            else "; no autoscaler node types"
        )
        auto = "GPUs" if supply.reachable else "CPUs"
        return f"RAY_ADDRESS={address}: {nodes} live nodes; {shown}{gpus}; --use-gpu auto runs on {auto}", None
    except Exception as exc:  # what a user needs is the reason, on one line
        return (
            f"RAY_ADDRESS={address}",
            f"cannot connect to the Ray cluster at {address}: {_first_line(exc)}",
        )
    finally:
        if ray.is_initialized():
            ray.shutdown()


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _credential_source() -> str:
    try:
        import botocore.session

        creds = botocore.session.get_session().get_credentials()
        return f"credentials from {creds.method}" if creds is not None else "no credentials found"
    except Exception as exc:
        return f"credentials unknown ({type(exc).__name__})"


def check_access(uri: str) -> tuple[str, str | None]:
    """(description, problem or None): can ``uri`` be listed?"""
    from mura_ray.archive import storage
    from mura_ray.errors import UsageError

    try:
        uri = storage.resolve(uri)
        fs, path = storage.filesystem(uri)
        if not fs.exists(path):
            return uri, f"{uri} does not exist or is not visible with the current credentials"
        listed = fs.ls(path, detail=False) if fs.isdir(path) else [path]
    except UsageError as exc:
        return uri, str(exc)
    except Exception as exc:
        return uri, f"cannot list {uri}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    where = ""
    if uri.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        where = f" ({_credential_source()}{', endpoint ' + endpoint if endpoint else ''})"
    return f"{uri}: listable, {len(listed)} entries at the top{where}", None


def run_doctor(checks: list[str]) -> int:
    """Print the report; returns 0 when all is usable, 1 otherwise (the reasons are printed)."""
    problems: list[str] = []
    rows: list[tuple[str, str]] = []
    versions = {name: version_of(name) for name in PACKAGES}
    rows.append(("python", platform.python_version()))
    for name, v in versions.items():
        rows.append((name, v or "not installed"))
        if v is None and name in ("ray", "torch", "torchvision", "pydicom"):
            problems.append(f"{name} is not installed")
    if versions["ray"] and versions["ray"] != PINNED_RAY:
        problems.append(f"ray {versions['ray']} is installed; mura-ray, cluster.yaml and k8s/ use ray {PINNED_RAY}")
    info = cpu_info()
    rows.append(("cpu", f"{info['model']} ({info['cpus']} logical CPUs)"))
    rows.append(("cpu features", ", ".join(f"{f} {'yes' if f in info['flags'] else 'no'}" for f in SPEED_FLAGS)))
    try:
        gpus = _gpus()
        rows.append(("gpus", "; ".join(gpus) if gpus else "none that torch can use"))
    except Exception as exc:
        problems.append(f"torch cannot be imported: {exc}")
    described, problem = _ray_cluster()
    rows.append(("ray cluster", described))
    if problem:
        problems.append(problem)
    for uri in checks:
        described, problem = check_access(uri)
        rows.append(("access", described))
        if problem:
            problems.append(problem)
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    if problems:
        for p in problems:
            print(f"problem: {p}")
        return 1
    print("all usable")
    return 0
