"""``mura-ray bench train``: the data pipeline's first and later epochs, and training with 1 and 2 workers."""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
import time
from typing import Any

from mura_ray import cluster
from mura_ray.archive import storage
from mura_ray.archive.catalog import build_catalog
from mura_ray.archive.sample import write_sample
from mura_ray.bench.scoring import cpu_text
from mura_ray.config import TrainConfig
from mura_ray.hardware import cpu_info
from mura_ray.imaging.preprocess import cache_side
from mura_ray.training.dataset import cached_training_split, train_view
from mura_ray.training.driver import run_training
from mura_ray.training.worker import SHUFFLE_BUFFER


def bench_train(
    *, studies: int = 300, image_size: int = 128, batch_size: int = 16, epochs: int = 3, workdir: str | None = None
) -> dict[str, Any]:
    """Data-pipeline images/s for the first and later epochs, and training images/s with 1 and 2 workers."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        archive = os.path.join(tmp, "archive")
        write_sample(archive, studies=studies, seed=0)
        cluster.connect()
        catalog = build_catalog(archive)
        fs, _ = storage.filesystem(archive)

        t0 = time.perf_counter()
        cached, _ = cached_training_split(catalog, split="train", side=cache_side(image_size), fs=fs)
        decode_seconds = time.perf_counter() - t0
        n = cached.count()
        epoch_seconds = []
        for _ in range(epochs):
            t0 = time.perf_counter()
            view = train_view(cached, size=image_size)
            for _batch in view.iter_batches(batch_size=batch_size, local_shuffle_buffer_size=SHUFFLE_BUFFER):
                pass
            epoch_seconds.append(time.perf_counter() - t0)
        data = {
            "train_images": n,
            "decode_once_seconds": decode_seconds,
            "first_epoch_ips": n / (decode_seconds + epoch_seconds[0]),
            "later_epoch_ips": n * (epochs - 1) / sum(epoch_seconds[1:]) if epochs > 1 else None,
        }
        data["later_over_first"] = data["later_epoch_ips"] / data["first_epoch_ips"] if epochs > 1 else None

        training = {}
        for workers in (1, 2):
            cfg = TrainConfig(
                data=archive,
                out=os.path.join(tmp, f"run{workers}"),
                workers=workers,
                epochs=2,
                image_size=image_size,
                batch_size=batch_size,
                weights="none",
                patience=5,
            )
            run_training(cfg)
            history = json.loads(storage.read_text(os.path.join(cfg.out, "metrics.json")))
            training[f"workers_{workers}"] = {
                f"epoch_{h['epoch']}_ips": h["train_images"] / h["train_seconds"] for h in history
            }
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "cpu": cpu_info(),
        "settings": {"studies": studies, "image_size": image_size, "batch_size": batch_size, "trainable": "all"},
        "data_pipeline": data,
        "training": training,
    }


def train_table(r: dict[str, Any]) -> str:
    d = r["data_pipeline"]
    lines = [
        f"| training benchmark ({d['train_images']} images, {r['settings']['image_size']} px, {r['cpus']} CPUs) "
        "| images/s |",
        "| --- | ---: |",
        f"| data pipeline, epoch 1 (decode + cache + augment) | {d['first_epoch_ips']:.1f} |",
        f"| data pipeline, later epochs (augment only) | {d['later_epoch_ips']:.1f} |",
    ]
    for key, epochs in r["training"].items():
        for ek, v in epochs.items():
            lines.append(f"| training, {key.replace('_', ' ')}, {ek.split('_ips')[0].replace('_', ' ')} | {v:.1f} |")
    return "\n".join(lines) + "\n\n" + cpu_text(r)
