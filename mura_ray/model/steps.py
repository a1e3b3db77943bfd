"""One train step, one epoch, evaluation and one scoring step. No Ray here.

Batches are dicts with ``pixels`` ((B, S, S) uint8, numpy or torch) and,
for training and evaluation, ``label`` ((B,) ints). The same ``evaluate``
serves per-epoch validation and evaluation runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from mura_ray.errors import UsageError
from mura_ray.hardware import bf16_native
from mura_ray.imaging.tensors import to_input
from mura_ray.model.resnet import NUM_CLASSES, freeze_frozen_norms


def class_weights(labels: np.ndarray) -> list[float]:
    """Inverse-frequency weights ``n / (2 * n_c)`` for classes 0 and 1, for the weighted cross-entropy."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=NUM_CLASSES)
    if (counts == 0).any():
        raise UsageError(f"the training split needs both classes; label counts are {counts.tolist()}")
    return (counts.sum() / (NUM_CLASSES * counts)).tolist()


def autocast_for(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """bf16 autocast where asked, or under ``auto`` where the device computes bf16 natively (GPUs of sm80 and
    newer, CPUs with AVX512-BF16 or AMX); fp16 autocast where asked (inference on GPUs without bf16); full
    precision elsewhere."""
    if precision == "bf16" or (precision == "auto" and bf16_native(device)):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def _tensor(x: Any, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        a = np.asarray(x)
        x = torch.from_numpy(a if a.flags.writeable else a.copy())  # Ray hands out read-only arrays
    t = x
    return t.to(device, dtype=dtype, non_blocking=True)


def train_step(
    model: nn.Module,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    precision: str = "auto",
) -> torch.Tensor:
    """Forward, backward and update on one batch already on the model's device; returns the detached loss."""
    with autocast_for(pixels.device, precision):
        logits = model(to_input(pixels))
        loss = loss_fn(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    on_batch: Callable[[int, torch.Tensor], None] | None = None,
    precision: str = "auto",
    frozen_norms: bool = True,
) -> dict[str, float]:
    """Train over ``batches``; returns ``{"loss": mean loss per image, "images": n}``.

    ``on_batch(i, loss)`` gets the batch's loss as a tensor on the device: reading it (``float``) waits for
    the device, so a caller does that only when it shows the value. ``frozen_norms=False`` lets the batch
    norms of frozen blocks follow the batches (``model.train()``'s own behaviour, for comparison only)."""
    model.train()
    if frozen_norms:
        freeze_frozen_norms(model)  # a frozen block's batch norms keep their running statistics
    total = torch.zeros((), device=device)
    seen = 0
    for i, batch in enumerate(batches):
        pixels = _tensor(batch["pixels"], device)
        labels = _tensor(batch["label"], device, torch.long)
        loss = train_step(model, pixels, labels, loss_fn, optimizer, precision)
        total += loss * len(labels)
        seen += len(labels)
        if on_batch is not None:
            on_batch(i, loss)
    return {"loss": float(total) / max(seen, 1), "images": seen}


@torch.inference_mode()
def score_step(model: nn.Module, pixels: torch.Tensor, precision: str = "auto") -> torch.Tensor:
    """(B, S, S) uint8 on the model's device -> (B,) float32 probability of abnormal."""
    with autocast_for(pixels.device, precision):
        logits = model(to_input(pixels))
    return torch.softmax(logits.float(), dim=1)[:, 1]


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    device: torch.device,
    loss_fn: nn.Module | None = None,
    keep: tuple[str, ...] = (),
    precision: str = "auto",
) -> dict[str, np.ndarray]:
    """Probabilities (and the summed loss when ``loss_fn`` is given) over ``batches``.

    Pass the plain module, not a DDP wrapper: DDP's forward may run
    collectives, and validation shards differ in length between workers.
    Returns ``prob`` and ``label`` arrays, ``loss_sum`` and the columns named in ``keep``.
    """
    model.eval()
    probs, labels, loss_sum = [], [], 0.0
    kept: dict[str, list] = {k: [] for k in keep}
    for batch in batches:
        pixels = _tensor(batch["pixels"], device)
        with autocast_for(device, precision):
            logits = model(to_input(pixels)).float()
        probs.append(torch.softmax(logits, dim=1)[:, 1].cpu().numpy())
        if "label" in batch:
            y = _tensor(batch["label"], device, torch.long)
            labels.append(y.cpu().numpy())
            if loss_fn is not None:
                loss_sum += float(loss_fn(logits, y)) * len(y)
        for k in keep:
            kept[k].append(np.asarray(batch[k]))
    out = {
        "prob": np.concatenate(probs) if probs else np.zeros(0, np.float32),
        "label": np.concatenate(labels) if labels else np.zeros(0, np.int64),
        "loss_sum": np.float64(loss_sum),
    }
    for k, parts in kept.items():
        out[k] = np.concatenate(parts) if parts else np.zeros(0, dtype=object)
    return out
