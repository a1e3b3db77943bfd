"""Model checkpoints: a directory with ``model.safetensors`` and ``metadata.json``.

The weights are a plain torchvision ResNet18 state dict stored as
safetensors (never a pickle); the metadata holds what rebuilds and uses the
model: architecture, classes, image size, normalisation, class weights,
decision threshold, metrics, data fingerprint and package version. Both
live on local disk or in object storage.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from mura_ray import storage
from mura_ray.decode import cache_side
from mura_ray.errors import UsageError
from mura_ray.model import ARCHITECTURE, IMAGENET_MEAN, IMAGENET_STD, NUM_CLASSES

WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "metadata.json"


def model_metadata(image_size: int) -> dict[str, Any]:
    """The metadata every checkpoint carries to rebuild the model and prepare its input."""
    return {
        "architecture": ARCHITECTURE,
        "num_classes": NUM_CLASSES,
        "classes": ["normal", "abnormal"],
        "image_size": image_size,
        "cache_side": cache_side(image_size),
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "gray_to_rgb": True},
    }


def state_dict_bytes(model: nn.Module) -> bytes:
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    return st_save(state)


def model_id_of(weights: bytes) -> str:
    """Identity of a model: the sha256 of its safetensors bytes."""
    return hashlib.sha256(weights).hexdigest()


def save_checkpoint(directory: str, model: nn.Module, metadata: dict[str, Any]) -> str:
    """Write weights and metadata under ``directory`` (path or s3://); return the model id."""
    weights = state_dict_bytes(model)
    meta = dict(metadata, model_id=model_id_of(weights))
    fs, path = storage.filesystem(directory)
    storage.write_bytes(fs, storage.join(path, WEIGHTS_FILE), weights)
    storage.write_bytes(fs, storage.join(path, METADATA_FILE), json.dumps(meta, indent=2, sort_keys=True).encode())
    return meta["model_id"]


def read_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file, or from a checkpoint directory holding one."""
    fs, path = storage.filesystem(uri)
    if fs.isdir(path):
        path = storage.join(path, WEIGHTS_FILE)
    if not fs.exists(path):
        raise UsageError(f"weights not found: {uri!r}")
    data = storage.read_bytes(fs, path)
    try:
        return st_load(data)
    except Exception as exc:
        raise UsageError(
            f"{uri!r} is not a safetensors file ({type(exc).__name__}); pickled weights are not loaded"
        ) from None


def load_checkpoint(directory: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, metadata)`` of a checkpoint directory; the model id is checked against the bytes."""
    fs, path = storage.filesystem(directory)
    meta_path = storage.join(path, METADATA_FILE)
    weights_path = storage.join(path, WEIGHTS_FILE)
    if not fs.exists(meta_path) or not fs.exists(weights_path):
        raise UsageError(f"{directory!r} is not a mura-ray checkpoint: expected {WEIGHTS_FILE} and {METADATA_FILE} in it")
    meta = json.loads(storage.read_bytes(fs, meta_path))
    weights = storage.read_bytes(fs, weights_path)
    actual = model_id_of(weights)
    if meta.get("model_id") not in (None, actual):
        raise UsageError(f"{directory!r}: weights do not match the model_id in {METADATA_FILE}")
    meta["model_id"] = actual
    return st_load(weights), meta
