"""Weights files: a state dict as safetensors, read without ever unpickling."""

from __future__ import annotations

import torch
from safetensors.torch import load as st_load

from mura_ray.archive import storage
from mura_ray.errors import UsageError

WEIGHTS_FILE = "model.safetensors"  # in a model folder, beside metadata.json


def read_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file, or from a model folder holding one."""
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
