"""DDP fine-tuning of ResNet18 on Ray Train: the driver.

``run_training(cfg)`` catalogs the archive, carves the tuning split out of
the training split by patient (``protocol``), decodes the splits once into
Ray's object store, runs a ``TorchTrainer`` whose workers run
``worker.train_loop_per_worker`` (early stopping on the tuning split), shows
their progress, and when they are done scores the validation split with the
kept weights and writes ``RUN_DIR/model/`` once, complete, from the last
checkpoint (the best epoch's weights and tuning predictions travel in it).
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
from ray.train import ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from mura_ray import __version__, cluster, console, faults, recipes
from mura_ray.archive import storage
from mura_ray.archive.catalog import build_catalog, fingerprint
from mura_ray.config import TrainConfig, resumable_fields
from mura_ray.errors import UsageError
from mura_ray.imaging.preprocess import cache_side
from mura_ray.model.calibration import Calibration
from mura_ray.model.checkpoint import STATE_JSON, model_metadata
from mura_ray.model.registry import tracking_uri
from mura_ray.model.resnet import build_model, load_starting_weights, parse_trainable
from mura_ray.model.steps import class_weights
from mura_ray.progress import Follower, Progress, event_sink
from mura_ray.training import protocol, rundir
from mura_ray.training.dataset import (
    AugmentationDraws,
    ExactValidationConfig,
    cached_training_split,
    eval_view,
    train_view,
)
from mura_ray.training.distributed import backend_for
from mura_ray.training.events import TrainingDisplay
from mura_ray.training.protocol import TUNE
from mura_ray.training.selection import JOIN_COLUMNS, validation_predictions
from mura_ray.training.worker import read_best, train_loop_per_worker

log = logging.getLogger(__name__)


def run_training(cfg: TrainConfig) -> dict[str, Any]:
    """Train and keep the best model under ``cfg.out``; returns its metrics and where it is."""
    t_start = time.monotonic()
    filled = recipes.resolve(cfg)
    parse_trainable(cfg.trainable)
    rundir.check_same_run(cfg.out, cfg.to_dict(), resumable_fields())
    tracker = start_tracking(cfg)
    start = build_model()
    skipped = load_starting_weights(start, cfg.weights)
    catalog, weights, patients = _catalog_for_training(cfg)
    if not storage.is_remote(cfg.out):
        console.set_ray_log(storage.join(cfg.out, "ray.log"))
    cluster.connect()
    scaling, cpus = _place_workers(cfg)
    log.info("recipe %s: %s", cfg.recipe, ", ".join(filled) or "every setting given")
    log.info("starting weights: %s (%d tensors left at initial values)", cfg.weights, len(skipped))
    cached, unreadable = _decode_splits(cfg, catalog)

    storage.write_text(storage.join(cfg.out, rundir.CONFIG), json.dumps(cfg.to_dict(), indent=2))
    if tracker:
        tracker.log_params(dict(cfg.to_dict(), data_fingerprint=fingerprint(catalog)))
    sink = event_sink()
    trainer = _trainer(cfg, scaling, cpus, catalog, start.state_dict(), weights, cached, sink)
    display = TrainingDisplay(also=tracker.on_event if tracker else None)
    try:
        with Follower(sink, display.handle):
            result = trainer.fit()
    finally:
        display.close()
    if result.error:
        if tracker:
            tracker.fail()
        raise result.error
    sample = _guard_sample(cached["valid"], catalog, cfg.guard_images)
    counts = {split: ds.count() for split, ds in cached.items()}
    record = protocol.record(cfg.tune_fraction, patients, counts.get(TUNE, 0), counts["valid"])
    meta = _write_model(cfg, result.checkpoint, weights, fingerprint(catalog), sample, cached["valid"], catalog, record)
    tracked = (
        tracker.finish(meta, rundir.read_history(cfg.out), cfg.register, keep_predictions=cfg.keep_predictions)
        if tracker
        else None
    )
    return {
        "mlflow": tracked,
        "model_dir": storage.join(cfg.out, rundir.MODEL_DIR),
        "metrics": meta["metrics"],
        "model_id": meta["model_id"],
        "threshold": meta["threshold"],
        "validation": meta["validation"],
        "calibration": meta["calibration"],
        "protocol": meta["protocol"],
        "wall_seconds": time.monotonic() - t_start,
        "unreadable_images": unreadable,
    }


def start_tracking(cfg: TrainConfig) -> Any:
    """The MLflow tracker of this run, or None when tracking is off (then MLflow is not imported)."""
    uri = tracking_uri(cfg.mlflow)
    if uri is None:
        if cfg.register:
            raise UsageError("--register needs MLflow tracking: give --mlflow URI or set MLFLOW_TRACKING_URI")
        return None
    from mura_ray.training.tracking import Tracker

    return Tracker(uri, cfg.out)


def _place_workers(cfg: TrainConfig) -> tuple[ScalingConfig, float]:
    """Ray Train's workers sized for the cluster; on GPUs, once the cluster has placed them (its autoscaler
    starting GPU nodes if need be) and torch sees CUDA on each, so that a request that cannot be met ends
    with one line before the archive is decoded."""
    scaling, cpus = cluster.training_plan(
        cfg.workers, cfg.use_gpu, cfg.cpus_per_worker, cfg.placement_strategy, cfg.gpus_per_worker
    )
    if scaling.use_gpu:
        bundles = [dict(scaling.resources_per_worker)] * cfg.workers
        cluster.reserve_gpus(bundles, cfg.placement_strategy, cfg.gpu_timeout, "training workers")
    return scaling, cpus


def _trainer(
    cfg: TrainConfig,
    scaling: ScalingConfig,
    cpus: float,
    catalog: Any,
    start_state: dict,
    weights: list[float],
    cached: dict[str, Any],
    sink: Any,
) -> TorchTrainer:
    """The TorchTrainer: the workers, the training and tuning splits, what each worker needs.

    On GPUs the process group is ``cpu:gloo,cuda:nccl``: NCCL takes the
    tensors on the GPUs, and anything on a CPU goes to gloo instead of
    making NCCL raise."""
    chooser = TUNE if cfg.tune_fraction > 0 else "valid"
    tune = catalog.filter(pc.equal(catalog["split"], chooser)).select(JOIN_COLUMNS)
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
            "use_gpu": scaling.use_gpu,
            "train_images": cached["train"].count(),
            "tune_catalog": ray.put(tune),
            "sink": sink,
            "fault": faults.spec(),
        },
        scaling_config=scaling,
        torch_config=TorchConfig(backend=backend_for(scaling.use_gpu)),
        datasets={
            "train": train_view(
                cached["train"],
                size=cfg.image_size,
                rotation=cfg.rotation,
                seed=cfg.seed,
                draws=AugmentationDraws.remote(),
            ),
            TUNE: eval_view(cached[chooser], size=cfg.image_size),
        },
        dataset_config=ExactValidationConfig(),
        run_config=rundir.run_config(cfg.out, cfg.max_failures),
    )


def _catalog_for_training(cfg: TrainConfig) -> tuple[Any, list[float], list[str]]:
    """The archive's catalog with the tuning split carved out, the class weights of what is left to train
    on, and the tuning patients; refuses archives that cannot train."""
    t0 = time.monotonic()
    catalog = build_catalog(cfg.data, follow_links=cfg.follow_links)
    catalog, patients = protocol.carve_tuning_split(catalog, cfg.tune_fraction, cfg.split_seed, cfg.out)
    counts = {}
    for split in ("train", TUNE, "valid") if patients else ("train", "valid"):
        n = pc.sum(pc.and_(pc.equal(catalog["split"], split), pc.is_valid(catalog["label"]))).as_py() or 0
        if n == 0:
            raise UsageError(
                f"no labelled images in split {split!r} under {cfg.data!r}: training needs train and valid"
            )
        counts[split] = n
    log.info(
        "listed %d images under %s: %d train, %d tune (%d patients), %d valid (labelled) in %.1fs",
        catalog.num_rows,
        cfg.data,
        counts["train"],
        counts.get(TUNE, 0),
        len(patients),
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
    return catalog, class_weights(train_labels), patients


def _decode_splits(cfg: TrainConfig, catalog: Any) -> tuple[dict[str, Any], int]:
    """The splits decoded once into the object store, with a progress bar; ({split: dataset}, unreadable)."""
    fs, _ = storage.filesystem(cfg.data)
    side = cache_side(cfg.image_size, cfg.fit)
    splits = ["train", TUNE, "valid"] if cfg.tune_fraction > 0 else ["train", "valid"]
    in_splits = pc.and_(pc.is_in(catalog["split"], pa.array(splits)), pc.is_valid(catalog["label"]))
    total = pc.sum(in_splits).as_py() or 0
    sink = event_sink()
    seed = cfg.seed if cfg.shuffle_labels else None
    with Progress(f"decoding to {side}x{side}", total) as bar, Follower(sink, lambda e: bar.update(e["decoded"])):
        cached, bad = {}, {}
        for split in splits:
            train = split == "train"
            cached[split], bad[split] = cached_training_split(
                catalog,
                split=split,
                side=side,
                fs=fs,
                # The leakage check permutes every label that trains or chooses; the validation split keeps its own.
                shuffle_labels_seed=None if seed is None or split == "valid" else seed + (split == TUNE),
                order_seed=cfg.seed if train else None,
                fit=cfg.fit,
                sink=sink,
            )
    log.info(
        "decoded %d images to %dx%d in %.1fs (%.0f images/s)",
        total,
        side,
        side,
        bar.seconds,
        total / max(bar.seconds, 1e-9),
    )
    if any(bad.values()):
        log.warning("skipping unreadable images: %s", ", ".join(f"{n} in {s}" for s, n in bad.items() if n))
    return cached, sum(bad.values())


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
    cfg: TrainConfig,
    checkpoint: Any,
    weights: list[float],
    data_fingerprint: str,
    guard_sample: Any,
    valid_cached: Any,
    catalog: Any,
    record: dict[str, Any],
) -> dict[str, Any]:
    """The model folder, from the best epoch kept in the run's last checkpoint, and the validation split
    scored with its weights."""
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
        **model_metadata(cfg.image_size, cfg.fit),
        "class_weights": weights,
        "metrics": {k: v for k, v in best.items() if k != "best"},
        "data_fingerprint": data_fingerprint,
        "train_config": cfg.to_dict(),
        "package_version": __version__,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    valid = validation_predictions(best_weights, eval_view(valid_cached, size=cfg.image_size), catalog)
    meta = rundir.write_model_folder(
        cfg.out,
        best_weights,
        predictions,
        valid,
        dict(metadata, protocol=record),
        target_sensitivity=cfg.target_sensitivity,
        calibration=cfg.calibration,
        seed=cfg.seed,
        guard_sample=guard_sample,
        keep_predictions=cfg.keep_predictions,
    )
    log.info(
        "kept epoch %d; calibration %s and threshold %.3f (%s); validation study kappa %.3f [%.3f, %.3f]",
        best["epoch"],
        Calibration.of(meta).describe(),
        meta["threshold"],
        meta["threshold_rule"],
        meta["validation"]["study"]["kappa"],
        *meta["validation"]["study"]["kappa_ci"],
    )
    return meta
