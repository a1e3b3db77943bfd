"""DDP fine-tuning of ResNet18 on Ray Train.

``run_training(cfg)`` is the driver: it catalogs the archive, decodes both
splits once into Ray's object store, and starts a ``TorchTrainer`` whose
workers run ``train_loop_per_worker``. The best epoch (validation F1) is
kept as a checkpoint (``RUN_DIR/model/``) in the format of
``mura_ray.checkpoint``, and the per-epoch history as
``RUN_DIR/metrics.{json,csv}``.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import logging
import math
import os
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow.compute as pc
import ray
import torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from mura_ray import __version__, cluster, console, faults, plots, storage
from mura_ray.catalog import build_catalog, fingerprint
from mura_ray.checkpoint import METADATA_FILE, load_training_state, model_metadata, save_checkpoint, save_training_state
from mura_ray.config import TrainConfig, resumable_fields
from mura_ray.data import ExactValidationConfig, cached_training_split, eval_view, train_view
from mura_ray.decode import cache_side
from mura_ray.engine import evaluate, train_one_epoch
from mura_ray.errors import UsageError
from mura_ray.metrics import evaluation_metrics
from mura_ray.model import (
    DEFAULT_TRAINABLE,
    NUM_CLASSES,
    build_model,
    load_starting_weights,
    parse_trainable,
    set_trainable,
)
from mura_ray.progress import Follower, Progress, event_sink

log = logging.getLogger(__name__)

MODEL_DIR = "model"
VALID_PREDICTIONS = "valid_predictions.parquet"
SHUFFLE_BUFFER = 256  # rows mixed across blocks each epoch, on top of a random block order
CURVES = "training_curves.png"
EVENTS = "events.jsonl"
TRAIN_RUN_NAME = "ray_train"  # Ray Train's own folder in RUN_DIR: per-epoch state for restarts and reruns
# Settings a resumed run may change; any other difference means a different run.
RESUMABLE_CHANGES = resumable_fields()


def class_weights(labels: np.ndarray) -> list[float]:
    """Inverse-frequency weights ``n / (2 * n_c)`` for classes 0 and 1."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=NUM_CLASSES)
    if (counts == 0).any():
        raise UsageError(f"the training split needs both classes; label counts are {counts.tolist()}")
    return (counts.sum() / (NUM_CLASSES * counts)).tolist()


# ---- distributed helpers (the only torch.distributed calls) ----


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_arrays(local: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Concatenate each worker's arrays, in rank order, on every worker."""
    rank, world = _world()
    if world == 1:
        return local
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, local)
    return {k: np.concatenate([p[k] for p in parts]) if np.ndim(local[k]) else np.sum([p[k] for p in parts]) for k in local}


def mean_over_workers(value: float, count: int) -> tuple[float, int]:
    """Count-weighted mean of a per-worker value, and the total count."""
    _, world = _world()
    if world == 1:
        return value, count
    t = torch.tensor([value * count, float(count)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t[0] / max(t[1], 1.0)), int(t[1])


# ---- the worker ----


class EarlyStopping:
    """Stop after ``patience`` epochs without a higher score."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best = -math.inf
        self.bad_epochs = 0

    def step(self, score: float) -> bool:
        """Record an epoch's score; returns whether it is the best so far."""
        if score > self.best:
            self.best, self.bad_epochs = score, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience


def _worker_threads(cpus: float) -> int:
    return max(1, int(cpus))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: build the model, train, validate on all workers, report each epoch.

    Every epoch ends with a full training-state checkpoint (weights,
    optimizer, scheduler, RNG, history, early-stopping state). A restarted
    worker group, or a rerun of the same RUN_DIR, continues after the latest
    one. The best epoch's weights also go to ``RUN_DIR/model/`` with the
    validation predictions they made.
    """
    cfg = TrainConfig(**config["cfg"])
    sink = config.get("sink")
    torch.set_num_threads(_worker_threads(config["cpus_per_worker"]))
    torch.manual_seed(cfg.seed)
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    is_rank0 = rank == 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    model = build_model()
    model.load_state_dict(ray.get(config["start_state"]))
    set_trainable(model, parse_trainable(cfg.trainable))
    model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)  # Ray: DDP wrap and device placement
    device = ray.train.torch.get_device()
    plain = model.module if hasattr(model, "module") else model

    loss_fn = torch.nn.CrossEntropyLoss(weight=torch.tensor(config["class_weights"], dtype=torch.float32, device=device))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=cfg.lr_factor, patience=cfg.lr_patience)
    stopper = EarlyStopping(cfg.patience)
    history: list[dict[str, Any]] = []
    first_epoch, resumed_from = 1, 0

    restored = ray.train.get_checkpoint()  # Ray: the latest epoch's state after a restart or a rerun
    if restored is not None:
        with restored.as_directory() as d:
            progress = load_training_state(d, plain, optimizer, scheduler)
        history = progress["history"]
        stopper.best, stopper.bad_epochs = progress["best"], progress["bad_epochs"]
        resumed_from = progress["epoch"]
        first_epoch = resumed_from + 1
        if is_rank0:
            log.info("resuming after epoch %d (best validation F1 so far %.3f)", resumed_from, stopper.best)
            _tell_driver(sink, kind="note", text=f"resuming after epoch {resumed_from} (best validation F1 so far {stopper.best:.3f})")
            log_event(cfg.out, event="resumed", after_epoch=resumed_from)
    if stopper.should_stop and history:
        first_epoch = cfg.epochs + 1  # the run had already stopped early

    nodes = gather_arrays({"node": np.array([ray.get_runtime_context().get_node_id()], dtype=object)})["node"]
    if is_rank0:
        log_event(cfg.out, event="started", workers=ctx.get_world_size(), nodes=len(set(nodes.tolist())), after_epoch=resumed_from)
    train_shard = ray.train.get_dataset_shard("train")  # Ray: this worker's data
    valid_shard = ray.train.get_dataset_shard("valid")
    steps = config["train_images"] // (cfg.batch_size * ctx.get_world_size())
    for epoch in range(first_epoch, cfg.epochs + 1):
        t0 = time.monotonic()
        progress_line = _StepReporter(sink, epoch, cfg.epochs, steps, cfg.batch_size * ctx.get_world_size(), enabled=is_rank0)

        def on_batch(i: int, loss: float, progress_line=progress_line, epoch=epoch) -> None:
            progress_line(i, loss)
            if cfg.fault == f"crash@{epoch}" and rank == ctx.get_world_size() - 1 and resumed_from == 0 and i == 1:
                # Test hook: this worker dies in the middle of the epoch, once Ray Train has recorded the
                # previous epoch's checkpoint (a report still in flight would be lost with the worker).
                _wait_for_recorded_epoch(cfg.out, epoch - 1)
                faults.kill_now()

        # drop_last: a final batch of one image would break BatchNorm, and DDP needs equal step counts.
        batches = train_shard.iter_torch_batches(
            batch_size=cfg.batch_size, device=device, drop_last=True, local_shuffle_buffer_size=SHUFFLE_BUFFER,
            pin_memory=device.type == "cuda", prefetch_batches=2,
        )
        tr = train_one_epoch(model, batches, loss_fn, optimizer, device, on_batch=on_batch)
        train_loss, train_images = mean_over_workers(tr["loss"], tr["images"])
        train_seconds = time.monotonic() - t0

        local = evaluate(plain, valid_shard.iter_batches(batch_size=128, batch_format="numpy"), device, loss_fn, keep=("study_uri", "body_part"))
        allv = gather_arrays(local)
        val_loss = float(allv["loss_sum"]) / max(len(allv["label"]), 1)
        m = evaluation_metrics(allv["label"], allv["prob"], allv["study_uri"])
        scheduler.step(val_loss)
        improved = stopper.step(m["f1"])
        metrics = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_f1": m["f1"],
            "val_auroc": m["auroc"],
            "val_kappa": m["kappa"],
            "val_study_kappa": m["study_kappa"],
            "val_study_f1": m["study_f1"],
            "val_images": m["images"],
            "lr": optimizer.param_groups[0]["lr"],
            "epoch_seconds": time.monotonic() - t0,
            "train_seconds": train_seconds,
            "train_images": train_images,
            "resumed_from": resumed_from,
            "best": improved,
        }
        history.append(metrics)
        if is_rank0:
            log.info(
                "epoch %d/%d  train_loss %.4f  val_loss %.4f  val_f1 %.3f  val_auroc %.3f  study_kappa %.3f  lr %.2g  (%.1fs)%s",
                epoch, cfg.epochs, train_loss, val_loss, m["f1"], m["auroc"], m["study_kappa"],
                metrics["lr"], metrics["epoch_seconds"], "  *best*" if improved else "",
            )
            if improved:
                model_dir = storage.join(cfg.out, MODEL_DIR)
                save_checkpoint(model_dir, plain, checkpoint_metadata(cfg, config, metrics))
                write_predictions(storage.join(model_dir, VALID_PREDICTIONS), allv)
            write_history(cfg.out, history)
            _tell_driver(sink, kind="epoch", epochs=cfg.epochs, **metrics)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if is_rank0:
                progress = {"epoch": epoch, "history": history, "best": stopper.best, "bad_epochs": stopper.bad_epochs, "seed": cfg.seed}
                save_training_state(tmp, plain, optimizer, scheduler, progress)
                checkpoint = Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)  # Ray: every worker reports; rank 0 checkpoints
        if is_rank0:
            log_event(cfg.out, event="epoch_done", epoch=epoch, resumed_from=resumed_from)
        if stopper.should_stop:
            if is_rank0:
                log.info("early stop: no better validation F1 for %d epochs", cfg.patience)
                _tell_driver(sink, kind="note", text=f"early stop: no better validation F1 for {cfg.patience} epochs")
            break


class _StepReporter:
    """Rank 0's progress inside an epoch, pushed to the driver's event sink at most every half second."""

    def __init__(self, sink: Any, epoch: int, epochs: int, steps: int, images_per_step: int, enabled: bool) -> None:
        self.sink, self.epoch, self.epochs, self.steps, self.per_step = sink, epoch, epochs, steps, images_per_step
        self.enabled = enabled and sink is not None
        self.last = 0.0

    def __call__(self, i: int, loss: float) -> None:
        now = time.monotonic()
        if self.enabled and (now - self.last >= 0.5 or i + 1 == self.steps):
            self.sink.push.remote({"kind": "step", "epoch": self.epoch, "epochs": self.epochs, "images": (i + 1) * self.per_step,
                                   "total": self.steps * self.per_step, "loss": loss})
            self.last = now


def _tell_driver(sink: Any, **event: Any) -> None:
    if sink is not None:
        sink.push.remote(event)


def log_event(run_dir: str, **event: Any) -> None:
    """Append one line to ``RUN_DIR/events.jsonl``: what happened when (epochs done, resumes)."""
    path = storage.join(run_dir, EVENTS)
    before = storage.read_text(path) if storage.exists(path) else ""
    event = {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **event}
    storage.write_text(path, before + json.dumps(event) + "\n")


def read_events(run_dir: str) -> list[dict[str, Any]]:
    path = storage.join(run_dir, EVENTS)
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()] if storage.exists(path) else []


def write_predictions(uri: str, allv: dict[str, np.ndarray]) -> None:
    """The validation predictions of the kept epoch: study_uri, body_part, label, prob."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mura_ray.score import nullable_strings

    table = pa.table(
        {
            "study_uri": pa.array([str(x) for x in allv["study_uri"]], pa.string()),
            "body_part": pa.array(nullable_strings(np.asarray(allv["body_part"], dtype=object)), pa.string()),
            "label": pa.array(allv["label"].astype(np.int8)),
            "prob_abnormal": pa.array(allv["prob"].astype(np.float32)),
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    fs, path = storage.filesystem(uri)
    storage.write_bytes(fs, path, buf.getvalue())


def checkpoint_metadata(cfg: TrainConfig, config: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """What rebuilds and uses the model, stored as ``metadata.json``."""
    return {
        **model_metadata(cfg.image_size),
        "class_weights": config["class_weights"],
        "threshold": 0.5,
        "metrics": {k: v for k, v in metrics.items() if k != "best"},
        "data_fingerprint": config["data_fingerprint"],
        "train_config": cfg.to_dict(),
        "package_version": __version__,
        "torch_version": torch.__version__,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def write_history(run_dir: str, history: list[dict[str, Any]]) -> None:
    """Per-epoch metrics as ``metrics.json`` and ``metrics.csv`` under the run directory."""
    storage.write_text(storage.join(run_dir, "metrics.json"), json.dumps(history, indent=2))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    storage.write_text(storage.join(run_dir, "metrics.csv"), buf.getvalue())
    plots.training_curves(history, storage.join(run_dir, CURVES))


# ---- the driver ----


def _scaling(cfg: TrainConfig) -> tuple[ScalingConfig, float]:
    resources = ray.cluster_resources()
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else resources.get("GPU", 0) >= cfg.workers
    if cfg.cpus_per_worker is not None:
        cpus = cfg.cpus_per_worker
    elif use_gpu:
        cpus = 1.0
    else:
        # Leave at least one CPU to Ray Data's tasks, or ingest can starve and hang.
        cpus = max(0.25, min(4.0, (resources.get("CPU", 1) - 1) / cfg.workers))
        # A worker must fit on one node and leave that node a whole CPU for Ray Data's tasks
        # (some of them ask for one CPU, and with one worker per node none could run anywhere).
        largest_node = cluster.largest_node_cpus(default=cpus)
        cpus = max(0.25, min(cpus, largest_node - 1))
    scaling = ScalingConfig(
        num_workers=cfg.workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus}, placement_strategy=cfg.placement_strategy
    )
    return scaling, cpus


def recorded_epoch(run_dir: str) -> int:
    """The epoch of the latest checkpoint Ray Train has recorded for the run in ``run_dir`` (0: none yet)."""
    try:
        state = json.loads(storage.read_text(storage.join(run_dir, TRAIN_RUN_NAME, "checkpoint_manager_snapshot.json")))
    except (FileNotFoundError, ValueError):
        return 0
    latest = state.get("latest_checkpoint_result") or {}
    return int((latest.get("metrics") or {}).get("epoch", 0))


def _wait_for_recorded_epoch(run_dir: str, epoch: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while recorded_epoch(run_dir) < epoch and time.monotonic() < deadline:
        time.sleep(0.2)


def _storage_for(run_dir: str) -> tuple[str, Any]:
    """(storage_path, pyarrow filesystem or None) for Ray Train's own checkpoint storage."""
    if storage.is_remote(run_dir):
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        fs, path = storage.filesystem(run_dir)
        return path, PyFileSystem(FSSpecHandler(fs))
    return os.path.abspath(run_dir), None


class _TrainingDisplay:
    """The driver's view of the workers' events: a bar per epoch and one line when each epoch ends."""

    def __init__(self) -> None:
        self.bar: Progress | None = None
        self.bar_epoch = 0

    def handle(self, event: dict[str, Any]) -> None:
        kind = event.get("kind")
        if kind == "step":
            if self.bar is None or self.bar_epoch != event["epoch"]:
                self.close()
                self.bar = Progress(f"epoch {event['epoch']}/{event['epochs']}", event["total"])
                self.bar_epoch = event["epoch"]
            self.bar.set(event["images"], postfix=f"loss {event['loss']:.4f}")
        elif kind == "epoch":
            self.close()
            log.info(
                "epoch %d/%d  train loss %.4f  val loss %.4f  F1 %.3f  AUROC %.3f  study kappa %.3f  lr %.2g  "
                "%.1f images/s  %.0fs%s",
                event["epoch"], event["epochs"], event["train_loss"], event["val_loss"], event["val_f1"],
                event["val_auroc"], event["val_study_kappa"], event["lr"],
                event["train_images"] / max(event["train_seconds"], 1e-9), event["epoch_seconds"],
                "  (best so far)" if event["best"] else "",
            )
        elif kind == "note":
            self.close()
            log.info("%s", event["text"])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _catalog_for_training(cfg: TrainConfig) -> tuple[Any, np.ndarray]:
    """The archive's catalog and the training labels; refuses archives that cannot train."""
    t0 = time.monotonic()
    catalog = build_catalog(cfg.data)
    counts = {}
    for split in ("train", "valid"):
        n = pc.sum(pc.and_(pc.equal(catalog["split"], split), pc.is_valid(catalog["label"]))).as_py() or 0
        if n == 0:
            raise UsageError(f"no labelled images in split {split!r} under {cfg.data!r}: training needs train and valid")
        counts[split] = n
    log.info("listed %d images under %s: %d train, %d valid (labelled) in %.1fs",
             catalog.num_rows, cfg.data, counts["train"], counts["valid"], time.monotonic() - t0)
    train_labels = catalog.filter(pc.equal(catalog["split"], "train"))["label"].drop_null().to_numpy()
    if len(train_labels) < cfg.workers * cfg.batch_size:
        raise UsageError(
            f"the training split has {len(train_labels)} labelled images, fewer than "
            f"--workers x --batch-size = {cfg.workers * cfg.batch_size}: lower one of them"
        )
    return catalog, train_labels


def _decode_splits(cfg: TrainConfig, catalog: Any) -> tuple[Any, Any, int]:
    """Both splits decoded once into the object store, with a progress bar; (train, valid, unreadable)."""
    fs, _ = storage.filesystem(cfg.data)
    side = cache_side(cfg.image_size)
    total = pc.sum(pc.is_valid(catalog["label"])).as_py() or 0
    sink = event_sink()
    seed = cfg.seed if cfg.shuffle_labels else None
    with Progress(f"decoding to {side}x{side}", total) as bar, Follower(sink, lambda e: bar.update(e["decoded"])):
        train_cached, bad_train = cached_training_split(catalog, split="train", side=side, fs=fs, shuffle_labels_seed=seed, sink=sink)
        valid_cached, bad_valid = cached_training_split(catalog, split="valid", side=side, fs=fs, sink=sink)
    log.info("decoded %d images to %dx%d in %.1fs (%.0f images/s)", total, side, side, bar.seconds, total / max(bar.seconds, 1e-9))
    if bad_train or bad_valid:
        log.warning("skipping %d unreadable training and %d unreadable validation images", bad_train, bad_valid)
    return train_cached, valid_cached, bad_train + bad_valid


def run_training(cfg: TrainConfig) -> dict[str, Any]:
    """Train and keep the best model under ``cfg.out``; returns its metrics and where it is."""
    t_start = time.monotonic()
    if cfg.trainable == "auto":
        cfg.trainable = "all" if cfg.weights == "none" else ",".join(DEFAULT_TRAINABLE)
    parse_trainable(cfg.trainable)
    _check_same_run(cfg)
    start = build_model()
    skipped = load_starting_weights(start, cfg.weights)
    catalog, train_labels = _catalog_for_training(cfg)
    if cfg.shuffle_labels:
        train_labels = np.random.default_rng(cfg.seed).permutation(train_labels)
    weights = class_weights(train_labels)
    if not storage.is_remote(cfg.out):
        console.set_ray_log(storage.join(cfg.out, "ray.log"))
    cluster.connect()
    log.info("starting weights: %s (%d tensors left at initial values)", cfg.weights, len(skipped))
    train_cached, valid_cached, unreadable = _decode_splits(cfg, catalog)

    scaling, cpus = _scaling(cfg)
    _check_same_run(cfg)
    storage.write_text(storage.join(cfg.out, "train_config.json"), json.dumps(cfg.to_dict(), indent=2))
    sink = event_sink()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.to_dict(),
            "start_state": ray.put(start.state_dict()),
            "class_weights": weights,
            "cpus_per_worker": cpus,
            "data_fingerprint": fingerprint(catalog),
            "train_images": train_cached.count(),
            "sink": sink,
        },
        scaling_config=scaling,
        datasets={"train": train_view(train_cached, size=cfg.image_size), "valid": eval_view(valid_cached, size=cfg.image_size)},
        dataset_config=ExactValidationConfig(),
        run_config=_run_config(cfg),
    )
    log.info("training ResNet18 on %d %s workers (%s CPUs each), up to %d epochs",
             cfg.workers, "GPU" if scaling.use_gpu else "CPU", f"{cpus:g}", cfg.epochs)
    display = _TrainingDisplay()
    try:
        with Follower(sink, display.handle):
            result = trainer.fit()
    finally:
        display.close()
    if result.error:
        raise result.error
    model_dir = storage.join(cfg.out, MODEL_DIR)
    if not storage.exists(storage.join(model_dir, METADATA_FILE)):
        raise RuntimeError(f"training finished without a kept model in {model_dir}")
    meta = finalize_model(cfg, model_dir)
    return {
        "model_dir": model_dir,
        "metrics": meta["metrics"],
        "model_id": meta["model_id"],
        "threshold": meta["threshold"],
        "validation": meta["validation"],
        "wall_seconds": time.monotonic() - t_start,
        "unreadable_images": unreadable,
    }


def _run_config(cfg: TrainConfig) -> RunConfig:
    storage_path, storage_fs = _storage_for(cfg.out)
    return RunConfig(
        name=TRAIN_RUN_NAME,
        storage_path=storage_path,
        storage_filesystem=storage_fs,
        # The latest epochs' full state, for restarts and reruns; the best weights live in RUN_DIR/model.
        checkpoint_config=CheckpointConfig(num_to_keep=2),
        failure_config=FailureConfig(max_failures=cfg.max_failures),
    )


def _check_same_run(cfg: TrainConfig) -> None:
    """A RUN_DIR holds one run: rerunning it resumes, so its settings must match (epochs and a few others aside)."""
    path = storage.join(cfg.out, "train_config.json")
    if not storage.exists(path):
        return
    before = json.loads(storage.read_text(path))
    now = cfg.to_dict()
    changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and before.get(k, now[k]) != now[k])
    if changed:
        raise UsageError(
            f"{cfg.out!r} holds a run with other settings ({', '.join(f'{k}: {before.get(k)!r} -> {now[k]!r}' for k in changed)}); "
            f"rerunning a RUN_DIR resumes it: use a new --out for a new run"
        )


def finalize_model(cfg: TrainConfig, model_dir: str) -> dict[str, Any]:
    """Choose the threshold on the kept epoch's validation predictions, add the report and write the model card."""
    import pyarrow.parquet as pq

    from mura_ray.metrics import choose_threshold, full_report, study_scores
    from mura_ray.modelcard import render_model_card

    fs, path = storage.filesystem(model_dir)
    table = pq.read_table(io.BytesIO(storage.read_bytes(fs, storage.join(path, VALID_PREDICTIONS))))
    labels = table["label"].to_numpy().astype(np.int64)
    probs = table["prob_abnormal"].to_numpy().astype(np.float64)
    studies = np.asarray(table["study_uri"].to_pylist(), dtype=object)
    parts = np.asarray(table["body_part"].to_pylist(), dtype=object)
    _, s_probs, s_labels = study_scores(studies, probs, labels)
    threshold = choose_threshold(s_labels, s_probs, cfg.target_sensitivity)
    rule = (
        f"highest threshold with study-level sensitivity >= {cfg.target_sensitivity} on validation"
        if cfg.target_sensitivity is not None
        else "maximises study-level Cohen's kappa on validation"
    )
    report = full_report(labels, probs, studies, parts, threshold, seed=cfg.seed)
    meta_path = storage.join(path, METADATA_FILE)
    meta = json.loads(storage.read_bytes(fs, meta_path))
    meta.update(threshold=threshold, threshold_rule=rule, validation=report, package_versions=package_versions())
    storage.write_bytes(fs, meta_path, json.dumps(meta, indent=2, sort_keys=True).encode())
    storage.write_bytes(fs, storage.join(path, "model_card.md"), render_model_card(meta).encode())
    log.info("threshold %.3f (%s); study kappa %.3f [%.3f, %.3f]", threshold, rule, report["study"]["kappa"], *report["study"]["kappa_ci"])
    return meta


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("mura-ray", "ray", "torch", "torchvision", "numpy", "pyarrow", "scikit-learn", "pillow", "pydicom", "safetensors"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out
