"""Helpers the tests share that are not fixtures: what a test reads back or computes beside the product."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from mura_ray.archive import storage
from mura_ray.imaging import preprocess
from mura_ray.training import rundir


def read_events(run_dir: str) -> list[dict[str, Any]]:
    """The lines of ``RUN_DIR/events.jsonl``, oldest first."""
    path = storage.join(run_dir, rundir.EVENTS)
    if not storage.exists(path):
        return []
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


def box_in_input(
    box: tuple[float, float, float, float], height: int, width: int, image_size: int, fit: str = "crop"
) -> np.ndarray:
    """A box ``(x0, y0, x1, y1)`` in an original image's pixels -> the same box in the model's (S, S) input,
    through the cache's ``fit`` and the evaluation crop."""
    x0, y0, x1, y1 = box
    if fit == "stretch":
        sx, sy = image_size / width, image_size / height
        return np.array([x0 * sx, y0 * sy, (x1 + 1) * sx, (y1 + 1) * sy])
    if fit == "pad":
        nh, nw = preprocess._padded_size(height, width, image_size)
        top, left = (image_size - nh) // 2, (image_size - nw) // 2
        sx, sy = nw / width, nh / height
        return np.array([x0 * sx + left, y0 * sy + top, (x1 + 1) * sx + left, (y1 + 1) * sy + top])
    side = preprocess.cache_side(image_size)
    nh, nw, top, left = preprocess._crop_geometry(height, width, side)
    off = (side - image_size) // 2
    sx, sy = nw / width, nh / height
    return np.array([x0 * sx - left - off, y0 * sy - top - off, (x1 + 1) * sx - left - off, (y1 + 1) * sy - top - off])
