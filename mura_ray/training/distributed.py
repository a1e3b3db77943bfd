"""The only torch.distributed calls: rank and world size, gathering arrays, averaging a value.

Each works unchanged with one process (no process group), so the worker
loop runs the same in a test without Ray Train.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_arrays(local: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Concatenate each worker's arrays, in rank order, on every worker (scalars are summed)."""
    _, size = world()
    if size == 1:
        return local
    parts: list[Any] = [None] * size
    dist.all_gather_object(parts, local)
    return {
        k: np.concatenate([p[k] for p in parts]) if np.ndim(local[k]) else np.sum([p[k] for p in parts]) for k in local
    }


def mean_over_workers(value: float, count: int) -> tuple[float, int]:
    """Count-weighted mean of a per-worker value, and the total count."""
    _, size = world()
    if size == 1:
        return value, count
    t = torch.tensor([value * count, float(count)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t[0] / max(t[1], 1.0)), int(t[1])
