"""Ray Data pipelines: catalog rows -> bytes -> cached uint8 squares -> model batches.

Decoding and resizing run once per image (``cached_images`` materializes
the result in Ray's object store); each training epoch then re-runs only the
random augmentation on the cached squares.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import ray
from ray.data.expressions import col
from ray.train import DataConfig

from mura_ray.decode import read_and_decode
from mura_ray.transforms import EvalPreset, TrainPreset

ROWS_PER_BLOCK = 64


def catalog_dataset(catalog: pa.Table, rows_per_block: int = ROWS_PER_BLOCK) -> ray.data.Dataset:
    """The catalog as a Ray Dataset in small blocks, so reads spread over the cluster."""
    blocks = [catalog.slice(i, rows_per_block) for i in range(0, catalog.num_rows, rows_per_block)]
    return ray.data.from_arrow(blocks)


def _decode_and_report(batch: dict[str, np.ndarray], *, side: int, fs: Any, sink: Any) -> dict[str, np.ndarray]:
    out = read_and_decode(batch, side=side, fs=fs)
    if sink is not None:
        sink.push.remote({"decoded": len(out["error"])})  # fire and forget: the driver's progress bar
    return out


def decoded_images(catalog: pa.Table, *, side: int, fs: Any, num_cpus: float = 1.0, sink: Any = None) -> ray.data.Dataset:
    """Lazy dataset of the catalog's images decoded to (side, side) uint8, errors as rows.

    ``sink`` (a ``progress.event_sink``) receives ``{"decoded": n}`` after each batch.
    """
    return catalog_dataset(catalog).map_batches(
        _decode_and_report,
        fn_kwargs={"side": side, "fs": fs, "sink": sink},
        batch_size=16,
        num_cpus=num_cpus,
    )


def cached_training_split(
    catalog: pa.Table, *, split: str, side: int, fs: Any, shuffle_labels_seed: int | None = None, sink: Any = None
) -> tuple[ray.data.Dataset, int]:
    """Decode one labelled split once and keep it in the object store.

    Returns ``(dataset, n_unreadable)``; the dataset has ``pixels``, ``label``
    and ``study_uri`` and no unreadable rows. ``shuffle_labels_seed`` permutes
    labels across images (a leakage check: nothing real should be learnt).
    """
    import pyarrow.compute as pc

    part = catalog.filter(pc.and_(pc.equal(catalog["split"], split), pc.is_valid(catalog["label"])))
    if shuffle_labels_seed is not None:
        perm = np.random.default_rng(shuffle_labels_seed).permutation(part.num_rows)
        part = part.set_column(part.schema.get_field_index("label"), "label", part["label"].take(perm))
    ds = decoded_images(part.select(["image_uri", "label", "study_uri", "body_part"]), side=side, fs=fs, sink=sink)
    ds = ds.materialize()
    clean = ds.filter(expr=col("error") == "").select_columns(["pixels", "label", "study_uri", "body_part"]).materialize()
    return clean, ds.count() - clean.count()


def train_view(cached: ray.data.Dataset, *, size: int) -> ray.data.Dataset:
    """Per-epoch random augmentation over the cached squares (re-run on every iteration).

    Order is randomised cheaply: the blocks' order here, and rows within a
    buffer where the worker iterates (``local_shuffle_buffer_size``); a full
    ``random_shuffle`` would move every image through the object store each epoch.
    """

    def augment(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return TrainPreset(size=size)(batch)

    return cached.select_columns(["pixels", "label"]).randomize_block_order().map_batches(augment, batch_size=64, num_cpus=0.5)


def eval_view(cached: ray.data.Dataset, *, size: int) -> ray.data.Dataset:
    """Centre crop of the cached squares, with ``label`` and ``study_uri`` kept for metrics."""
    return cached.map_batches(EvalPreset(size=size), batch_size=128, num_cpus=0.5)


class ExactValidationConfig(DataConfig):
    """Split ``train`` into equal shards (DDP steps must match), ``valid`` into uneven ones.

    Every validation row then goes to exactly one worker, and the workers'
    predictions are gathered before metrics are computed.
    """

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        rest = {k: v for k, v in datasets.items() if k != "valid"}
        output = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
        if "valid" in datasets:
            ds = datasets["valid"].copy(datasets["valid"])
            ds.set_name("valid")
            ds.context.execution_options = self._resolve_execution_options("valid")
            for i, shard in enumerate(ds.streaming_split(world_size, equal=False)):
                output[i]["valid"] = shard
        return output
