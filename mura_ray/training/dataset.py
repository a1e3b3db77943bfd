"""The training splits in Ray Data: decoded once into the object store, augmented each epoch.

Decoding and resizing run once per image (``cached_training_split``
materializes the squares); each epoch then re-runs only the random
augmentation. Rows carry ``image_uri``, ``label`` and ``pixels``: the worker
joins study and body part back from the catalog for its metrics.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data.expressions import col
from ray.train import DataConfig

from mura_ray.data import decoded_images
from mura_ray.imaging.preprocess import EvalPreset
from mura_ray.imaging.tensors import TrainPreset, augmentation_seeds


def shuffled_rows(table: pa.Table, seed: int) -> pa.Table:
    """``table``'s rows in a seeded random order.

    The catalog is sorted by path, so its blocks of rows would each hold a
    few patients of one body part; shuffling within a buffer and the blocks'
    order cannot mix what a block does not hold. Permuted before they are cut
    into blocks, the rows of any batch come from the whole split."""
    return table.take(pa.array(np.random.default_rng(seed).permutation(table.num_rows)))


def cached_training_split(
    catalog: pa.Table,
    *,
    split: str,
    side: int,
    fs: Any,
    shuffle_labels_seed: int | None = None,
    order_seed: int | None = None,
    fit: str = "crop",
    sink: Any = None,
) -> tuple[ray.data.Dataset, int]:
    """Decode one labelled split once and keep it in the object store.

    Returns ``(dataset, n_unreadable)``; the dataset has ``image_uri``,
    ``pixels`` and ``label``, and no unreadable rows. ``shuffle_labels_seed`` permutes
    labels across images (a leakage check: nothing real should be learnt); ``order_seed``
    puts the rows in a seeded random order (``shuffled_rows``), for the training split.
    """
    part = catalog.filter(pc.and_(pc.equal(catalog["split"], split), pc.is_valid(catalog["label"])))
    if order_seed is not None:
        part = shuffled_rows(part, order_seed)
    if shuffle_labels_seed is not None:
        perm = np.random.default_rng(shuffle_labels_seed).permutation(part.num_rows)
        part = part.set_column(part.schema.get_field_index("label"), "label", part["label"].take(perm))
    ds = decoded_images(part.select(["image_uri", "label"]), side=side, fs=fs, fit=fit, sink=sink)
    ds = ds.materialize()
    clean = ds.filter(expr=col("error") == "").select_columns(["image_uri", "pixels", "label"]).materialize()
    return clean, ds.count() - clean.count()


@ray.remote(num_cpus=0)
class AugmentationDraws:
    """How many times each training image has been augmented so far: its epoch, counted in one place, so that
    no prefetching or worker order can make two runs of the same seed draw another augmentation."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def next(self, keys: list[str]) -> list[int]:
        out = [self.counts.get(k, 0) for k in keys]
        for k, n in zip(keys, out):
            self.counts[k] = n + 1
        return out


def train_view(
    cached: ray.data.Dataset, *, size: int, rotation: float = 15.0, seed: int | None = None, draws: Any = None
) -> ray.data.Dataset:
    """Per-epoch random augmentation over the cached squares (re-run on every iteration).

    With ``seed`` (and ``draws``, an ``AugmentationDraws`` actor), each image's
    augmentation comes from (seed, image, epoch): two runs with the same seed
    see the same augmented images. Order is randomised cheaply: the rows were put in a random order once,
    before they were cut into blocks (``shuffled_rows``); each epoch the
    blocks' order changes here, and rows within a buffer where the worker
    iterates (``local_shuffle_buffer_size``). A full ``random_shuffle`` would
    move every image through the object store each epoch.
    """

    def augment(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if seed is None:
            return TrainPreset(size=size, rotation=rotation)(batch)
        keys = batch["image_uri"].tolist()
        seeds = augmentation_seeds(seed, keys, ray.get(draws.next.remote(keys)))
        out = TrainPreset(size=size, rotation=rotation)({"pixels": batch["pixels"], "aug_seed": seeds})
        return {"pixels": out["pixels"], "label": batch["label"]}

    columns = ["pixels", "label"] if seed is None else ["image_uri", "pixels", "label"]
    return cached.select_columns(columns).randomize_block_order().map_batches(augment, batch_size=64, num_cpus=0.5)


def eval_view(cached: ray.data.Dataset, *, size: int) -> ray.data.Dataset:
    """Centre crop of the cached squares, with ``image_uri`` and ``label`` kept for metrics."""
    return cached.map_batches(EvalPreset(size=size), batch_size=128, num_cpus=0.5)


class ExactValidationConfig(DataConfig):
    """Split ``train`` into equal shards (DDP steps must match), ``tune`` into uneven ones.

    Every tuning row then goes to exactly one worker, and the workers'
    predictions are gathered before metrics are computed.
    """

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        rest = {k: v for k, v in datasets.items() if k != "tune"}
        output = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
        if "tune" in datasets:
            ds = datasets["tune"].copy(datasets["tune"])
            ds.set_name("tune")
            ds.context.execution_options = self._resolve_execution_options("tune")
            for i, shard in enumerate(ds.streaming_split(world_size, equal=False)):
                output[i]["tune"] = shard
        return output
