"""DDP fine-tuning of ResNet18 on Ray Train: the driver.

``run_training(cfg)`` catalogs the archive, decodes both splits once into
Ray's object store, runs a ``TorchTrainer`` whose workers run
``worker.train_loop_per_worker``, shows their progress, and when they are
done writes ``RUN_DIR/model/`` once, complete, from the last checkpoint
(the best epoch's weights and validation predictions travel in it).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig
from ray.train.torch import TorchTrainer

from mura_ray import __version__, cluster, console, faults
from mura_ray.archive import storage
from mura_ray.archive.catalog import build_catalog, fingerprint
from mura_ray.config import TrainConfig, resumable_fields
from mura_ray.errors import UsageError
from mura_ray.imaging.preprocess import cache_side
from mura_ray.model.checkpoint import STATE_JSON, model_metadata
from mura_ray.model.resnet import DEFAULT_TRAINABLE, build_model, load_starting_weights, parse_trainable
from mura_ray.model.steps import class_weights
from mura_ray.progress import Follower, Progress, event_sink
from mura_ray.training import rundir
from mura_ray.training.dataset import ExactValidationConfig, cached_training_split, eval_view, train_view
from mura_ray.training.events import TrainingDisplay
from mura_ray.training.worker import read_best, train_loop_per_worker

log = logging.getLogger(__name__)


def run_training(cfg: TrainConfig) -> dict[str, Any]:
    """Train and keep the best model under ``cfg.out``; returns its metrics and where it is."""
    t_start = time.monotonic()
    if cfg.trainable == "auto":
        cfg.trainable = "all" if cfg.weights == "none" else ",".join(DEFAULT_TRAINABLE)
    parse_trainable(cfg.trainable)
    _check_same_run(cfg)
    start = build_model()
    skipped = load_starting_weights(start, cfg.weights)
    catalog, weights = _catalog_for_training(cfg)
    if not storage.is_remote(cfg.out):
        console.set_ray_log(storage.join(cfg.out, "ray.log"))
    cluster.connect()
    log.info("starting weights: %s (%d tensors left at initial values)", cfg.weights, len(skipped))
    train_cached, valid_cached, unreadable = _decode_splits(cfg, catalog)

    storage.write_text(storage.join(cfg.out, rundir.CONFIG), json.dumps(cfg.to_dict(), indent=2))
    sink = event_sink()
    trainer = _trainer(cfg, catalog, start.state_dict(), weights, train_cached, valid_cached, sink)
    display = TrainingDisplay()
    try:
        with Follower(sink, display.handle):
            result = trainer.fit()
    finally:
        display.close()
    if result.error:
        raise result.error
    sample = _guard_sample(valid_cached, catalog, cfg.guard_images)
    meta = _write_model(cfg, result.checkpoint, weights, fingerprint(catalog), sample)
    return {
        "model_dir": storage.join(cfg.out, rundir.MODEL_DIR),
        "metrics": meta["metrics"],
        "model_id": meta["model_id"],
        "threshold": meta["threshold"],
        "validation": meta["validation"],
        "wall_seconds": time.monotonic() - t_start,
        "unreadable_images": unreadable,
    }


def _trainer(
    cfg: TrainConfig,
    catalog: Any,
    start_state: dict,
    weights: list[float],
    train_cached: Any,
    valid_cached: Any,
    sink: Any,
) -> TorchTrainer:
    """The TorchTrainer: workers sized for the cluster, the two splits, and what each worker needs."""
    scaling, cpus = cluster.training_plan(cfg.workers, cfg.use_gpu, cfg.cpus_per_worker, cfg.placement_strategy)
    valid = catalog.filter(pc.equal(catalog["split"], "valid")).select(["image_uri", "study_uri", "body_part"])
    log.info(
        "training ResNet18 on %d %s workers (%s CPUs each), up to %d epochs",
        cfg.workers,
        "GPU" if scaling.use_gpu else "CPU",
        f"{cpus:g}",
        cfg.epochs,
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.to_dict(),
            "start_state": ray.put(start_state),
            "class_weights": weights,
            "cpus_per_worker": cpus,
            "train_images": train_cached.count(),
            "valid_catalog": ray.put(valid),
            "sink": sink,
            "fault": faults.spec(),
        },
        scaling_config=scaling,
        datasets={
            "train": train_view(train_cached, size=cfg.image_size),
            "valid": eval_view(valid_cached, size=cfg.image_size),
        },
        dataset_config=ExactValidationConfig(),
        run_config=_run_config(cfg),
    )


def _catalog_for_training(cfg: TrainConfig) -> tuple[Any, list[float]]:
    """The archive's catalog and the class weights of its training split; refuses archives that cannot train."""
    t0 = time.monotonic()
    catalog = build_catalog(cfg.data)
    counts = {}
    for split in ("train", "valid"):
        n = pc.sum(pc.and_(pc.equal(catalog["split"], split), pc.is_valid(catalog["label"]))).as_py() or 0
        if n == 0:
            raise UsageError(
                f"no labelled images in split {split!r} under {cfg.data!r}: training needs train and valid"
            )
        counts[split] = n
    log.info(
        "listed %d images under %s: %d train, %d valid (labelled) in %.1fs",
        catalog.num_rows,
        cfg.data,
        counts["train"],
        counts["valid"],
        time.monotonic() - t0,
    )
    if counts["train"] < cfg.workers * cfg.batch_size:
        raise UsageError(
            f"the training split has {counts['train']} labelled images, fewer than "
            f"--workers x --batch-size = {cfg.workers * cfg.batch_size}: lower one of them"
        )
    # Class counts do not change when --shuffle-labels permutes labels, so the weights are the same.
    train_labels = catalog.filter(pc.equal(catalog["split"], "train"))["label"].drop_null().to_numpy()
    return catalog, class_weights(train_labels)


def _decode_splits(cfg: TrainConfig, catalog: Any) -> tuple[Any, Any, int]:
    """Both splits decoded once into the object store, with a progress bar; (train, valid, unreadable)."""
    fs, _ = storage.filesystem(cfg.data)
    side = cache_side(cfg.image_size)
    in_splits = pc.and_(pc.is_in(catalog["split"], pa.array(["train", "valid"])), pc.is_valid(catalog["label"]))
    total = pc.sum(in_splits).as_py() or 0
    sink = event_sink()
    seed = cfg.seed if cfg.shuffle_labels else None
    with Progress(f"decoding to {side}x{side}", total) as bar, Follower(sink, lambda e: bar.update(e["decoded"])):
        train, bad_train = cached_training_split(
            catalog, split="train", side=side, fs=fs, shuffle_labels_seed=seed, sink=sink
        )
        valid, bad_valid = cached_training_split(catalog, split="valid", side=side, fs=fs, sink=sink)
    log.info(
        "decoded %d images to %dx%d in %.1fs (%.0f images/s)",
        total,
        side,
        side,
        bar.seconds,
        total / max(bar.seconds, 1e-9),
    )
    if bad_train or bad_valid:
        log.warning("skipping %d unreadable training and %d unreadable validation images", bad_train, bad_valid)
    return train, valid, bad_train + bad_valid


def _guard_sample(valid: Any, catalog: Any, n: int) -> dict[str, Any] | None:
    """Up to ``n`` cached validation squares with their labels and studies, for the engines' accuracy guard."""
    if n == 0:
        return None
    rows = valid.limit(n).take_all()
    study_of = dict(zip(catalog["image_uri"].to_pylist(), catalog["study_uri"].to_pylist()))
    return {
        "pixels": np.stack([r["pixels"] for r in rows]) if rows else np.zeros((0, 1, 1), np.uint8),
        "label": np.array([r["label"] for r in rows]),
        "study_uri": np.array([study_of[r["image_uri"]] for r in rows], dtype=object),
    }


def _write_model(
    cfg: TrainConfig, checkpoint: Any, weights: list[float], data_fingerprint: str, guard_sample: Any = None
) -> dict[str, Any]:
    """The model folder, from the best epoch kept in the run's last checkpoint."""
    if checkpoint is None:
        raise RuntimeError(f"training of {cfg.out} finished without a checkpoint")
    with checkpoint.as_directory() as d:
        best_weights, predictions = read_best(d)
        with open(os.path.join(d, STATE_JSON)) as f:
            history = json.load(f)["progress"]["history"]
    if best_weights is None:
        raise RuntimeError(f"training of {cfg.out} finished without a kept model")
    best = max((h for h in history if h.get("best")), key=lambda h: h["epoch"])
    metadata = {
        **model_metadata(cfg.image_size),
        "class_weights": weights,
        "metrics": {k: v for k, v in best.items() if k != "best"},
        "data_fingerprint": data_fingerprint,
        "train_config": cfg.to_dict(),
        "package_version": __version__,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    meta = rundir.write_model_folder(
        cfg.out,
        best_weights,
        predictions,
        metadata,
        target_sensitivity=cfg.target_sensitivity,
        seed=cfg.seed,
        guard_sample=guard_sample,
    )
    log.info(
        "kept epoch %d; threshold %.3f (%s); study kappa %.3f [%.3f, %.3f]",
        best["epoch"],
        meta["threshold"],
        meta["threshold_rule"],
        meta["validation"]["study"]["kappa"],
        *meta["validation"]["study"]["kappa_ci"],
    )
    return meta


def _run_config(cfg: TrainConfig) -> RunConfig:
    """Ray Train keeps its checkpoints in RUN_DIR/ray_train; rerunning the same RUN_DIR resumes from them."""
    if storage.is_remote(cfg.out):
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        fs, path = storage.filesystem(cfg.out)
        storage_path, storage_fs = path, PyFileSystem(FSSpecHandler(fs))
    else:
        storage_path, storage_fs = cfg.out, None
    return RunConfig(
        name=rundir.TRAIN_RUN_NAME,
        storage_path=storage_path,
        storage_filesystem=storage_fs,
        # The latest epochs' full state, for restarts and reruns; each also holds the best epoch so far.
        checkpoint_config=CheckpointConfig(num_to_keep=2),
        failure_config=FailureConfig(max_failures=cfg.max_failures),
    )


def _check_same_run(cfg: TrainConfig) -> None:
    """A RUN_DIR holds one run: rerunning it resumes, so its settings must match (epochs and a few others aside)."""
    path = storage.join(cfg.out, rundir.CONFIG)
    if not storage.exists(path):
        return
    before = json.loads(storage.read_text(path))
    now = cfg.to_dict()
    changed = sorted(k for k in now if k not in resumable_fields() and before.get(k, now[k]) != now[k])
    if changed:
        differences = ", ".join(f"{k}: {before.get(k)!r} -> {now[k]!r}" for k in changed)
        raise UsageError(
            f"{cfg.out!r} holds a run with other settings ({differences}); "
            f"rerunning a RUN_DIR resumes it: use a new --out for a new run"
        )
