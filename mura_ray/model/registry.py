"""Models from an MLflow registry: ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` -> a local model folder.

The registry is the one ``MLFLOW_TRACKING_URI`` names. The version's
artifacts (the model folder ``train --register`` logged) are downloaded
once into ``MURA_RAY_CACHE/registry/NAME/VERSION``; the weights' hash in
its metadata is the model_id, the same as scoring from the folder itself.
A download goes to a temporary folder beside that place and is renamed in
only when whole, and a cache folder that is not whole (weights missing or
cut short, another model's files) is downloaded again.
MLflow is imported only here, and only for such a URI.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any

from mura_ray.archive import storage
from mura_ray.errors import UsageError
from mura_ray.model.checkpoint import METADATA_FILE, WEIGHTS_FILE, model_id_of

log = logging.getLogger(__name__)

PREFIX = "models:/"
INSTALL = 'pip install "mura-ray[mlflow]"'


def resolve_model_dir(model: str) -> str:
    """Accept a model folder, a training run folder holding ``model/``, or a registry URI
    (``models:/NAME/VERSION``, ``models:/NAME@ALIAS``: downloaded once, ``download_registered``)."""
    if model.startswith(PREFIX):
        return download_registered(model)
    fs, path = storage.filesystem(model)
    if fs.exists(storage.join(path, "model", METADATA_FILE)):
        return storage.join(model, "model")
    return model


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
    expected = version.tags.get("model_id")
    found = whole_model_id(target)
    if found is None or (expected and found != expected):
        if os.path.lexists(target):
            log.warning("%s: the cached copy %s is not whole; downloading it again", uri, target)
        found = _download(f"models:/{name}/{version.version}", target, tracking)
    if expected and found != expected:
        raise UsageError(f"{uri!r}: its files hold model {str(found)[:12]}, the registry names {expected[:12]}")
    return target


def whole_model_id(folder: str) -> str | None:
    """The model_id of ``folder`` if it is a whole checkpoint (weights, and metadata that names their hash
    or none), else None."""
    try:
        with open(os.path.join(folder, METADATA_FILE)) as f:
            recorded = json.load(f).get("model_id")
        with open(os.path.join(folder, WEIGHTS_FILE), "rb") as f:
            actual = model_id_of(f.read())
    except (OSError, ValueError, AttributeError):
        return None
    return actual if recorded in (None, actual) else None


def _download(artifact_uri: str, target: str, tracking: str) -> str:
    """Download ``artifact_uri`` into a temporary folder beside ``target`` and rename it into place when whole;
    whatever was at ``target`` is discarded. Returns the model_id of the copy at ``target``."""
    import mlflow

    parent, base = os.path.split(target)
    tmp = storage.private_temp_dir(parent, f".{base}.")
    try:
        mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=tmp, tracking_uri=tracking)
        found = whole_model_id(tmp)
        if found is None:
            raise UsageError(
                f"{artifact_uri!r} is not a mura-ray checkpoint: expected {WEIGHTS_FILE} and {METADATA_FILE} "
                "that agree in it"
            )
        try:
            if os.path.lexists(target):
                os.rename(target, f"{tmp}.old")  # a folder cannot replace a folder in one rename
            os.rename(tmp, target)
        except OSError:  # another process renamed its own download in meanwhile
            if whole_model_id(target) != found:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(f"{tmp}.old", ignore_errors=True)
    return found
