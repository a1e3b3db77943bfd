"""Ray Data's side of reading an archive, shared by training and scoring: catalog rows -> cached squares.

A dataset here carries only the key (``image_uri``) and what the decode
task adds (``pixels``, ``error``, ``read_size``); the catalog's other
columns stay with the driver, which joins results back onto it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import ray

from mura_ray.imaging.preprocess import read_and_decode

ROWS_PER_BLOCK = 64


def catalog_dataset(catalog: pa.Table, rows_per_block: int = ROWS_PER_BLOCK) -> ray.data.Dataset:
    """The catalog as a Ray Dataset in small blocks, so reads spread over the cluster."""
    blocks = [catalog.slice(i, rows_per_block) for i in range(0, catalog.num_rows, rows_per_block)]
    return ray.data.from_arrow(blocks)


def _decode_and_report(
    batch: dict[str, np.ndarray], *, side: int, fs: Any, fit: str, sink: Any
) -> dict[str, np.ndarray]:
    out = read_and_decode(batch, side=side, fs=fs, fit=fit)
    if sink is not None:
        sink.push.remote({"decoded": len(out["error"])})  # fire and forget: the driver's progress bar
    return out


def decoded_images(
    catalog: pa.Table, *, side: int, fs: Any, num_cpus: float = 1.0, fit: str = "crop", sink: Any = None
) -> ray.data.Dataset:
    """Lazy dataset of the catalog's images decoded to (side, side) uint8, errors as rows.

    ``sink`` (a ``progress.event_sink``) receives ``{"decoded": n}`` after each batch.
    """
    return catalog_dataset(catalog).map_batches(
        _decode_and_report,
        fn_kwargs={"side": side, "fs": fs, "fit": fit, "sink": sink},
        batch_size=16,
        num_cpus=num_cpus,
    )
