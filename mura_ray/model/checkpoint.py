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
import os
import shutil
import time
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from mura_ray.archive import storage
from mura_ray.errors import UsageError
from mura_ray.imaging.preprocess import preprocessing_record
from mura_ray.model.calibration import Calibration
from mura_ray.model.resnet import ARCHITECTURE, NUM_CLASSES
from mura_ray.model.weights import WEIGHTS_FILE

METADATA_FILE = "metadata.json"


def model_metadata(image_size: int, fit: str = "crop") -> dict[str, Any]:
    """The metadata every checkpoint carries to rebuild the model and prepare its input."""
    return {
        "architecture": ARCHITECTURE,
        "num_classes": NUM_CLASSES,
        "classes": ["normal", "abnormal"],
        **preprocessing_record(image_size, fit),
    }


def state_dict_bytes(model: nn.Module) -> bytes:
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    return st_save(state)


def model_id_of(weights: bytes) -> str:
    """Identity of a model: the sha256 of its safetensors bytes."""
    return hashlib.sha256(weights).hexdigest()


def scoring_id_of(meta: dict[str, Any], tta: str = "none") -> str:
    """Identity of what makes a score: the sha256 over the model_id and every setting that changes a
    probability the model gives (architecture and members, input size and preprocessing, calibration)
    and the run's test-time augmentation. Editing any of them in ``metadata.json`` makes another
    scoring id, so an incremental run rescores every image; the threshold, in every row, is not part
    of it (it changes flags, not probabilities)."""
    members = [{k: m.get(k) for k in ("model_id", "image_size", "fit")} for m in meta.get("members") or []]
    record = {
        "model_id": meta["model_id"],
        **{k: meta.get(k) for k in ("architecture", "num_classes", "image_size", "fit", "cache_side")},
        "normalization": meta.get("normalization"),
        "calibration": Calibration.of(meta).record(),
        "members": members,
        "tta": tta,
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def write_checkpoint(directory: str, files: dict[str, bytes]) -> None:
    """Write a checkpoint folder's files (``METADATA_FILE`` among them) so that no reader mixes two models.

    Locally the folder is written beside its place and renamed into it, so a
    reader sees the old model or the new one whole. In object storage the
    files go one by one and the metadata, which names the weights' hash,
    last; a reader that meets the halves of two models sees the hashes
    disagree and reads again (``read_checkpoint``)."""
    fs, path = storage.filesystem(directory)
    order = sorted(files, key=lambda name: name == METADATA_FILE)
    if not storage.is_local(fs):
        for name in order:
            storage.write_bytes(fs, storage.join(path, name), files[name])
        return
    tag = f"{os.getpid()}-{os.urandom(3).hex()}"
    staged, old = f"{path}.new-{tag}", f"{path}.old-{tag}"
    os.makedirs(staged)
    for name in order:
        with open(os.path.join(staged, name), "wb") as f:
            f.write(files[name])
            f.flush()
            os.fsync(f.fileno())
    if os.path.isdir(path):
        os.rename(path, old)  # a folder cannot replace a folder in one rename: the old one steps aside
    os.rename(staged, path)
    storage.fsync_dir(os.path.dirname(path))
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(directory: str, model: nn.Module, metadata: dict[str, Any]) -> str:
    """Write weights and metadata under ``directory`` (path or s3://); return the model id."""
    weights = state_dict_bytes(model)
    meta = dict(metadata, model_id=model_id_of(weights))
    body = json.dumps(meta, indent=2, sort_keys=True).encode()
    write_checkpoint(directory, {WEIGHTS_FILE: weights, METADATA_FILE: body})
    return meta["model_id"]


def read_checkpoint(directory: str, attempts: int = 5) -> tuple[bytes, dict[str, Any]]:
    """``(weights bytes, metadata)`` of a checkpoint directory, read once and checked against each other.

    ``metadata["model_id"]`` is the sha256 of the returned bytes. A folder
    caught in the middle of being rewritten is read again."""
    fs, path = storage.filesystem(directory)
    meta_path = storage.join(path, METADATA_FILE)
    weights_path = storage.join(path, WEIGHTS_FILE)
    for attempt in range(attempts):
        try:
            meta = json.loads(storage.read_bytes(fs, meta_path))
            weights = storage.read_bytes(fs, weights_path)
        except FileNotFoundError:
            if fs.exists(path) and attempt == 0:
                time.sleep(0.5)  # a local folder being renamed into place
                continue
            raise UsageError(
                f"{directory!r} is not a mura-ray checkpoint: expected {WEIGHTS_FILE} and {METADATA_FILE} in it"
            ) from None
        actual = model_id_of(weights)
        if meta.get("model_id") in (None, actual):
            return weights, dict(meta, model_id=actual)
        time.sleep(0.5 * (attempt + 1))
    raise UsageError(f"{directory!r}: weights do not match the model_id in {METADATA_FILE}")


def load_checkpoint(directory: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, metadata)`` of a checkpoint directory; the model id is checked against the bytes."""
    weights, meta = read_checkpoint(directory)
    return st_load(weights), meta


# ---- the full training state, for resuming: tensors as safetensors, the rest as JSON ----

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"


def save_training_state(
    directory: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    progress: dict[str, Any],
) -> None:
    """Write everything a resumed run needs into a local ``directory``: weights, optimizer,
    scheduler, RNG and ``progress`` (epoch, history, early-stopping state, ...). No pickle."""
    import os

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, WEIGHTS_FILE), "wb") as f:
        f.write(state_dict_bytes(model))
    opt = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    opt_plain: dict[str, dict[str, Any]] = {}
    for idx, slots in opt["state"].items():
        opt_plain[str(idx)] = {}
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{idx}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                opt_plain[str(idx)][key] = value
    body = {
        "progress": progress,
        "optimizer": {"param_groups": opt["param_groups"], "state": opt_plain},
        "scheduler": scheduler.state_dict(),
    }
    with open(os.path.join(directory, STATE_TENSORS), "wb") as f:
        f.write(st_save(tensors))
    with open(os.path.join(directory, STATE_JSON), "w") as f:
        json.dump(body, f, indent=1)


def load_training_state(
    directory: str, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None
) -> dict[str, Any]:
    """Restore what ``save_training_state`` wrote (the model; optimizer and scheduler when given).

    Returns ``progress``."""
    import os

    with open(os.path.join(directory, WEIGHTS_FILE), "rb") as f:
        model.load_state_dict(st_load(f.read()))
    with open(os.path.join(directory, STATE_JSON)) as f:
        body = json.load(f)
    with open(os.path.join(directory, STATE_TENSORS), "rb") as f:
        tensors = st_load(f.read())
    if optimizer is not None:
        state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in body["optimizer"]["state"].items()}
        for name, value in tensors.items():
            if name.startswith("optimizer."):
                _, idx, key = name.split(".", 2)
                state.setdefault(int(idx), {})[key] = value
        optimizer.load_state_dict({"state": state, "param_groups": body["optimizer"]["param_groups"]})
    if scheduler is not None:
        scheduler.load_state_dict(body["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    return body["progress"]
