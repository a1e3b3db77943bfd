"""The only torch.distributed calls: rank and world size, gathering arrays, averaging a value. No Ray here.

Each runs the same calls in a process group of one rank as in one of many
(what makes a one-GPU check meaningful), and returns its input unchanged
with no process group, so the epoch code runs in a test without Ray Train.

NCCL has no CPU backend: a CPU tensor handed to a collective of a plain
``nccl`` group raises. So tensor collectives get tensors on the worker's
device, and GPU training uses ``GPU_BACKEND``, under which a CPU tensor
goes to gloo and can never reach NCCL.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

GPU_BACKEND = "cpu:gloo,cuda:nccl"  # the process group of GPU training (Ray Train's TorchConfig(backend=...))
CPU_BACKEND = "gloo"


def backend_for(use_gpu: bool) -> str:
    """The process group backend of a training run on GPUs or on CPUs."""
    return GPU_BACKEND if use_gpu else CPU_BACKEND


def _grouped() -> bool:
    return dist.is_available() and dist.is_initialized()


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    if _grouped():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_arrays(local: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Concatenate each worker's arrays, in rank order, on every worker (scalars are summed).

    An object collective: the arrays are pickled, so any dtype (strings included) travels, on any backend."""
    if not _grouped():
        return local
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return {
        k: np.concatenate([p[k] for p in parts]) if np.ndim(local[k]) else np.sum([p[k] for p in parts]) for k in local
    }


def mean_over_workers(value: float, count: int, device: torch.device) -> tuple[float, int]:
    """Count-weighted mean of a per-worker value, and the total count; ``device`` is the worker's device."""
    if not _grouped():
        return value, count
    t = torch.tensor([value * count, float(count)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    total, n = t.tolist()
    return total / max(n, 1.0), int(n)
