"""Models from an MLflow registry: ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` -> a local model folder.

The registry is the one ``MLFLOW_TRACKING_URI`` names. The version's
artifacts (the model folder ``train --register`` logged) are downloaded
once into ``MURA_RAY_CACHE/registry/NAME/VERSION``; the weights' hash in
its metadata is the model_id, the same as scoring from the folder itself.
MLflow is imported only here, and only for such a URI.
"""

from __future__ import annotations

import json
import os
from typing import Any

from mura_ray.errors import UsageError

PREFIX = "models:/"
INSTALL = 'pip install "mura-ray[mlflow]"'


def is_registry_uri(uri: str) -> bool:
    return uri.startswith(PREFIX)


def tracking_uri(option: str | None) -> str | None:
    """The tracking URI to use: the option, else ``MLFLOW_TRACKING_URI``, else None (tracking off)."""
    return option or os.environ.get("MLFLOW_TRACKING_URI") or None


def client(uri: str) -> Any:
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise UsageError(f"MLflow is needed for {uri!r} and is not installed: {INSTALL}") from None
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def cache_root() -> str:
    return os.path.join(os.environ.get("MURA_RAY_CACHE", os.path.expanduser("~/.cache/mura-ray")), "registry")


def download_registered(uri: str, cache: str | None = None) -> str:
    """A ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` URI -> a local copy of that model folder."""
    tracking = tracking_uri(None)
    if tracking is None:
        raise UsageError(f"{uri!r} is a registry URI: set MLFLOW_TRACKING_URI to the registry that holds it")
    mlflow_client = client(tracking)
    import mlflow
    from mlflow.exceptions import MlflowException

    name, _, rest = uri[len(PREFIX) :].partition("/")
    name, _, alias = name.partition("@")
    try:
        if alias:
            version = mlflow_client.get_model_version_by_alias(name, alias)
        else:
            version = mlflow_client.get_model_version(name, rest)
    except MlflowException as exc:
        raise UsageError(f"{uri!r}: not in the registry at {tracking} ({exc.error_code})") from None
    target = os.path.join(cache or cache_root(), name, str(version.version))
    if not os.path.exists(os.path.join(target, "metadata.json")):
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{name}/{version.version}", dst_path=target, tracking_uri=tracking
        )
    with open(os.path.join(target, "metadata.json")) as f:
        found = json.load(f).get("model_id")
    expected = version.tags.get("model_id")
    if expected and found != expected:
        raise UsageError(f"{uri!r}: its files hold model {str(found)[:12]}, the registry names {expected[:12]}")
    return target
