"""One training epoch and the tuning split's predictions, as every worker runs them. No Ray here.

The worker (``worker.py``) hands these its shards' batches; the GPU check
(``bench/gpu_core.py``) runs the same functions in a one-rank process group
without Ray. Losses and predictions are combined over all workers here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from mura_ray.model.steps import evaluate, train_one_epoch
from mura_ray.training.distributed import gather_arrays, mean_over_workers

# The tuning split chooses the epoch, the temperature and the threshold: its predictions are computed in
# fp32 (IEEE on GPUs, see hardware.ieee_fp32), as the validation split's and the scores are compared with.
CHOICE_PRECISION = "fp32"


def train_epoch(
    model: torch.nn.Module,
    batches: Iterable[dict[str, Any]],
    loss_fn: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    on_batch: Callable[[int, torch.Tensor], None] | None,
    precision: str,
    frozen_norms: bool = True,
) -> tuple[float, int]:
    """Train over this worker's ``batches``; returns the loss per image and the images, over all workers."""
    result = train_one_epoch(model, batches, loss_fn, optimizer, device, on_batch, precision, frozen_norms)
    return mean_over_workers(result["loss"], result["images"], device)


def tune_predictions(
    plain: torch.nn.Module,
    batches: Iterable[dict[str, Any]],
    device: torch.device,
    loss_fn: torch.nn.Module,
    tune_catalog: pa.Table,
) -> tuple[pa.Table, float]:
    """Predictions of every tuning image (gathered from all workers, sorted by ``image_uri``) joined with
    ``tune_catalog`` (``image_uri`` -> study, body part), and the mean loss per image.

    ``plain`` is the module inside the DDP wrapper: tuning shards differ in length between workers, and
    DDP's forward could wait for a collective the others never call."""
    local = evaluate(plain, batches, device, loss_fn, keep=("image_uri",), precision=CHOICE_PRECISION)
    allv = gather_arrays(local)
    predictions = (
        pa.table(
            {
                "image_uri": pa.array(allv["image_uri"].astype(str), pa.string()),
                "label": pa.array(allv["label"].astype(np.int8)),
                "prob_abnormal": pa.array(allv["prob"].astype(np.float32)),
            }
        )
        .join(tune_catalog, "image_uri", join_type="left outer")
        .sort_by("image_uri")
    )
    return predictions, float(allv["loss_sum"]) / max(len(allv["label"]), 1)
