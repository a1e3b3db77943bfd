"""The Ray Train worker: set up, restore, then for each epoch train, validate, report.

Each epoch ends with a checkpoint of the whole training state and of the
best epoch so far (weights, tuning-split predictions): a restarted worker
group or a rerun of RUN_DIR continues after it, and the driver writes the
model folder from the last one. Rank 0 alone logs, writes and checkpoints.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from ray.train import Checkpoint

from mura_ray import faults
from mura_ray.config import TrainConfig
from mura_ray.hardware import ieee_fp32, no_cuda_message
from mura_ray.model.checkpoint import WEIGHTS_FILE, load_training_state, save_training_state, state_dict_bytes
from mura_ray.model.resnet import build_model, parse_trainable, set_trainable
from mura_ray.recipes import SELECTED
from mura_ray.reporting.metrics import evaluation_metrics
from mura_ray.training import rundir
from mura_ray.training.distributed import gather_arrays
from mura_ray.training.epoch import train_epoch, tune_predictions
from mura_ray.training.events import StepReporter, tell_driver
from mura_ray.training.stopping import EarlyStopping

log = logging.getLogger(__name__)

SHUFFLE_BUFFER = 256  # rows mixed across blocks each epoch, on top of a random block order
BEST_DIR = "best"  # inside each checkpoint: the best epoch so far
BEST_PREDICTIONS = "predictions.parquet"


@dataclass
class _Setup:
    """What the epoch loop works with."""

    cfg: TrainConfig
    model: torch.nn.Module  # the DDP wrapper when distributed
    plain: torch.nn.Module  # the module inside it, for evaluation and checkpoints
    device: torch.device
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    rank: int
    world: int
    sink: Any
    fault: str | None
    tune_catalog: pa.Table  # image_uri -> study_uri, body_part: joined onto the gathered predictions

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


@dataclass
class _Progress:
    """What a checkpoint carries besides the weights and the optimizer."""

    history: list[dict[str, Any]] = field(default_factory=list)
    stopper: EarlyStopping = field(default_factory=lambda: EarlyStopping(1))
    resumed_from: int = 0
    best_weights: bytes | None = None
    best_predictions: pa.Table | None = None


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry point on every worker; ``config`` is the driver's ``train_loop_config``."""
    run = _set_up(config)
    progress = _restore(run)
    train_shard = ray.train.get_dataset_shard("train")  # Ray: this worker's data
    tune_shard = ray.train.get_dataset_shard("tune")
    steps = config["train_images"] // (run.cfg.batch_size * run.world)
    for epoch in range(progress.resumed_from + 1, run.cfg.epochs + 1):
        if progress.stopper.should_stop:
            break
        t0 = time.monotonic()
        train_loss, train_images = _train(run, train_shard, epoch, steps, progress.resumed_from)
        train_seconds = time.monotonic() - t0
        predictions, val_loss = _validate(run, tune_shard)
        metrics = _epoch_metrics(run, epoch, predictions, val_loss, progress, train_loss, train_images)
        metrics.update(epoch_seconds=time.monotonic() - t0, train_seconds=train_seconds)
        _report(run, progress, metrics, predictions)
    if run.is_rank0 and progress.stopper.should_stop:
        name = SELECTED[run.cfg.select_on]
        tell_driver(run.sink, kind="note", text=f"early stop: no better tuning {name} for {run.cfg.patience} epochs")


def _set_up(config: dict[str, Any]) -> _Setup:
    cfg = TrainConfig(**config["cfg"])
    if config.get("use_gpu") and not torch.cuda.is_available():
        raise RuntimeError(no_cuda_message(ray.get_runtime_context().get_node_id()))
    ieee_fp32()
    torch.set_num_threads(max(1, int(config["cpus_per_worker"])))
    torch.manual_seed(cfg.seed)
    ctx = ray.train.get_context()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = build_model()
    model.load_state_dict(ray.get(config["start_state"]))
    set_trainable(model, parse_trainable(cfg.trainable))
    model = ray.train.torch.prepare_model(model.to(memory_format=torch.channels_last))  # Ray: DDP wrap, device
    device = ray.train.torch.get_device()
    weights = torch.tensor(config["class_weights"], dtype=torch.float32, device=device)
    optimizer = torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=cfg.lr_factor, patience=cfg.lr_patience
    )
    return _Setup(
        cfg=cfg,
        model=model,
        plain=model.module if hasattr(model, "module") else model,
        device=device,
        loss_fn=torch.nn.CrossEntropyLoss(weight=weights),
        optimizer=optimizer,
        scheduler=scheduler,
        rank=ctx.get_world_rank(),
        world=ctx.get_world_size(),
        sink=config.get("sink"),
        fault=config.get("fault"),
        tune_catalog=ray.get(config["tune_catalog"]),
    )


def _restore(run: _Setup) -> _Progress:
    """The latest checkpoint's state after a restart or a rerun (Ray Train hands it over), else a fresh start."""
    progress = _Progress(stopper=EarlyStopping(run.cfg.patience))
    restored = ray.train.get_checkpoint()  # Ray: the latest epoch's state, or None
    if restored is not None:
        with restored.as_directory() as d:
            state = load_training_state(d, run.plain, run.optimizer, run.scheduler)
            progress.best_weights, progress.best_predictions = read_best(d)
        progress.history = state["history"]
        progress.stopper.load(state)
        progress.resumed_from = state["epoch"]
        if run.is_rank0:
            name = SELECTED[run.cfg.select_on]
            best = progress.stopper.best
            text = f"resuming after epoch {progress.resumed_from} (best tuning {name} so far {best:.3f})"
            log.info("%s", text)
            tell_driver(run.sink, kind="note", text=text)
            rundir.log_event(run.cfg.out, event="resumed", after_epoch=progress.resumed_from)
    nodes = gather_arrays({"node": np.array([ray.get_runtime_context().get_node_id()], dtype=object)})["node"]
    if run.is_rank0:
        rundir.log_event(
            run.cfg.out,
            event="started",
            workers=run.world,
            nodes=len(set(nodes.tolist())),
            after_epoch=progress.resumed_from,
        )
    return progress


def _train(run: _Setup, shard: Any, epoch: int, steps: int, resumed_from: int) -> tuple[float, int]:
    """One epoch over this worker's shard; returns the loss per image and the images, over all workers."""
    reporter = StepReporter(
        run.sink if run.is_rank0 else None, epoch, run.cfg.epochs, steps, run.cfg.batch_size * run.world
    )

    def on_batch(i: int, loss: torch.Tensor) -> None:
        reporter(i, loss)
        if i == 1 and resumed_from == 0 and run.rank == run.world - 1 and faults.armed_in_epoch(run.fault, epoch):
            # The last worker dies mid-epoch, once Ray Train has recorded the previous epoch's
            # checkpoint (a report still in flight would be lost with the worker).
            rundir.wait_for_recorded_epoch(run.cfg.out, epoch - 1)
            faults.kill_now()

    # drop_last: a final batch of one image would break BatchNorm, and DDP needs equal step counts.
    batches = shard.iter_torch_batches(
        batch_size=run.cfg.batch_size,
        device=run.device,
        drop_last=True,
        local_shuffle_buffer_size=SHUFFLE_BUFFER,
        pin_memory=run.device.type == "cuda",
        prefetch_batches=2,
    )
    return train_epoch(
        run.model, batches, run.loss_fn, run.optimizer, run.device, on_batch, run.cfg.precision, run.cfg.frozen_norms
    )


def _validate(run: _Setup, shard: Any) -> tuple[pa.Table, float]:
    """Predictions of every tuning image (gathered from all workers) with their study, and the loss."""
    batches = shard.iter_batches(batch_size=128, batch_format="numpy")
    return tune_predictions(run.plain, batches, run.device, run.loss_fn, run.tune_catalog)


def _epoch_metrics(
    run: _Setup,
    epoch: int,
    predictions: pa.Table,
    val_loss: float,
    progress: _Progress,
    train_loss: float,
    train_images: int,
) -> dict[str, Any]:
    m = evaluation_metrics(
        predictions["label"].to_numpy(),
        predictions["prob_abnormal"].to_numpy(),
        np.asarray(predictions["study_uri"].to_pylist(), dtype=object),
    )
    run.scheduler.step(val_loss)
    improved = progress.stopper.step(m[run.cfg.select_on])
    if improved:
        progress.best_weights, progress.best_predictions = state_dict_bytes(run.plain), predictions
    return {
        "epoch": epoch,
        "train_loss": train_loss,
        "tune_loss": val_loss,
        "tune_f1": m["f1"],
        "tune_auroc": m["auroc"],
        "tune_kappa": m["kappa"],
        "tune_study_kappa": m["study_kappa"],
        "tune_study_f1": m["study_f1"],
        "tune_images": m["images"],
        "lr": run.optimizer.param_groups[0]["lr"],
        "train_images": train_images,
        "resumed_from": progress.resumed_from,
        "best": improved,
    }


def _report(run: _Setup, progress: _Progress, metrics: dict[str, Any], predictions: pa.Table) -> None:
    """Rank 0 logs and checkpoints the epoch; every worker reports it to Ray Train."""
    progress.history.append(metrics)
    if run.is_rank0:
        log.info(
            "epoch %d/%d  train_loss %.4f  tune_loss %.4f  tune_f1 %.3f  tune_study_kappa %.3f%s",
            metrics["epoch"],
            run.cfg.epochs,
            metrics["train_loss"],
            metrics["tune_loss"],
            metrics["tune_f1"],
            metrics["tune_study_kappa"],
            "  *best*" if metrics["best"] else "",
        )
        rundir.write_history(run.cfg.out, progress.history)
        tell_driver(run.sink, kind="epoch", epochs=run.cfg.epochs, **metrics)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if run.is_rank0:
            state = {
                "epoch": metrics["epoch"],
                "history": progress.history,
                "seed": run.cfg.seed,
                **progress.stopper.state(),
            }
            save_training_state(tmp, run.plain, run.optimizer, run.scheduler, state)
            _write_best(tmp, progress, current=metrics["best"])
            checkpoint = Checkpoint.from_directory(tmp)
        ray.train.report({k: v for k, v in metrics.items() if k != "best"}, checkpoint=checkpoint)  # Ray
    if run.is_rank0:
        rundir.log_event(run.cfg.out, event="epoch_done", epoch=metrics["epoch"], resumed_from=progress.resumed_from)


def _write_best(directory: str, progress: _Progress, current: bool) -> None:
    """The best epoch's predictions, and its weights unless they are this checkpoint's own."""
    if progress.best_weights is None:
        return
    best = os.path.join(directory, BEST_DIR)
    os.makedirs(best)
    if not current:
        with open(os.path.join(best, WEIGHTS_FILE), "wb") as f:
            f.write(progress.best_weights)
    pq.write_table(progress.best_predictions, os.path.join(best, BEST_PREDICTIONS))


def read_best(directory: str) -> tuple[bytes | None, pa.Table | None]:
    """The best epoch's weights (safetensors bytes) and tuning-split predictions kept in a checkpoint."""
    best = os.path.join(directory, BEST_DIR)
    if not os.path.exists(os.path.join(best, BEST_PREDICTIONS)):
        return None, None
    weights = os.path.join(best, WEIGHTS_FILE)
    if not os.path.exists(weights):
        weights = os.path.join(directory, WEIGHTS_FILE)  # the best epoch is the checkpoint's own
    with open(weights, "rb") as f:
        return f.read(), pq.read_table(os.path.join(best, BEST_PREDICTIONS))
