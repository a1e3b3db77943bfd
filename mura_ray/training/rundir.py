"""The run directory: what a training run leaves under RUN_DIR, and who writes it.

```
RUN_DIR/train_config.json     the settings (driver, before training)
RUN_DIR/tune_patients.txt     the training patients set aside to choose epoch, temperature, threshold
RUN_DIR/{tune,valid}_predictions.parquet   the kept model's predictions with image paths and patient ids
RUN_DIR/events.jsonl          started, resumed, epoch_done (rank 0, as they happen)
RUN_DIR/metrics.{json,csv}    per-epoch history, and training_curves.png (rank 0, each epoch)
RUN_DIR/ray_train/            Ray Train's checkpoints of the full training state
RUN_DIR/model/                the kept model (the driver, once, when training ends): no image path or
                              patient id in it (``predictions``) unless ``--keep-predictions``
RUN_DIR/ray.log               Ray's own output (local RUN_DIR only)
```

Each file has one writer. Workers never write ``model/``: the best epoch's
weights and predictions travel inside Ray Train's checkpoints, and the
driver writes the model folder from the final one.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import time
from typing import Any

import pyarrow as pa

from mura_ray.archive import storage
from mura_ray.reporting import plots
from mura_ray.versions import versions

MODEL_DIR = "model"
VALID_PREDICTIONS = "valid_predictions.parquet"
TUNE_PREDICTIONS = "tune_predictions.parquet"
RELIABILITY = "reliability.png"
CURVES = "training_curves.png"
EVENTS = "events.jsonl"
CONFIG = "train_config.json"
TRAIN_RUN_NAME = "ray_train"  # Ray Train's own folder in RUN_DIR: per-epoch state for restarts and reruns


def log_event(run_dir: str, **event: Any) -> None:
    """Append one line to ``RUN_DIR/events.jsonl``: what happened when (epochs done, resumes)."""
    path = storage.join(run_dir, EVENTS)
    before = storage.read_text(path) if storage.exists(path) else ""
    event = {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **event}
    storage.write_text(path, before + json.dumps(event) + "\n")


def write_history(run_dir: str, history: list[dict[str, Any]]) -> None:
    """Per-epoch metrics as ``metrics.json`` and ``metrics.csv``, and the curves, under the run directory."""
    storage.write_text(storage.join(run_dir, "metrics.json"), json.dumps(history, indent=2))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    storage.write_text(storage.join(run_dir, "metrics.csv"), buf.getvalue())
    plots.training_curves(history, storage.join(run_dir, CURVES))


def recorded_epoch(run_dir: str) -> int:
    """The epoch of the latest checkpoint Ray Train has recorded for the run in ``run_dir`` (0: none yet)."""
    try:
        state = json.loads(storage.read_text(storage.join(run_dir, TRAIN_RUN_NAME, "checkpoint_manager_snapshot.json")))
    except (FileNotFoundError, ValueError):
        return 0
    latest = state.get("latest_checkpoint_result") or {}
    return int((latest.get("metrics") or {}).get("epoch", 0))


def wait_for_recorded_epoch(run_dir: str, epoch: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while recorded_epoch(run_dir) < epoch and time.monotonic() < deadline:
        time.sleep(0.2)


def write_model_folder(
    run_dir: str,
    weights: bytes,
    tune_predictions: pa.Table,
    valid_predictions: pa.Table,
    metadata: dict[str, Any],
    *,
    target_sensitivity: float | None,
    seed: int,
    calibration: str = "platt",
    guard_sample: dict[str, Any] | None = None,
    keep_predictions: bool = False,
) -> dict[str, Any]:
    """Write ``RUN_DIR/model/`` once, complete: weights, predictions, model card, metadata.

    The model folder's predictions are keyed (``predictions.keyed``): no image path or patient id, unless
    ``keep_predictions``; predictions that hold them are also written whole to ``RUN_DIR``.

    The calibration (``calibration``: its method) and the threshold are chosen on the kept epoch's tuning
    predictions, and the report with patient-level intervals is computed on
    the validation predictions (``selection.choose_and_report``). The folder is
    replaced whole (``write_checkpoint``): a reader sees the earlier model or
    this one, never a mix. With ``guard_sample`` (cached validation squares,
    ``label`` and ``study_uri``), every inference engine is checked against
    torch fp32 at the chosen threshold and the figures kept in the metadata
    (``engine_guard``), which ``--backend auto`` obeys. Returns the metadata.
    """
    from mura_ray.model.calibration import Calibration
    from mura_ray.model.checkpoint import METADATA_FILE, WEIGHTS_FILE, model_id_of, write_checkpoint
    from mura_ray.reporting.modelcard import render_model_card
    from mura_ray.reporting.plots import reliability_png
    from mura_ray.training.predictions import keyed
    from mura_ray.training.selection import choose_and_report, with_calibrated

    tune_keyed = keyed(tune_predictions, keep_identifiers=keep_predictions)
    valid_keyed = keyed(valid_predictions, keep_identifiers=keep_predictions)
    chooser = metadata["protocol"]["chosen_on"]["threshold"]
    chosen = choose_and_report(
        tune_keyed,
        valid_keyed,
        target_sensitivity=target_sensitivity,
        seed=seed,
        chooser=chooser,
        method=calibration,
    )
    meta = dict(metadata, **chosen, package_versions=versions(), model_id=model_id_of(weights))
    if guard_sample is not None and len(guard_sample["pixels"]):
        from mura_ray.reporting.guard import check_sample

        meta["engine_guard"] = check_sample(
            weights, meta, guard_sample["pixels"], guard_sample["label"], guard_sample["study_uri"]
        )
    calibrated = Calibration.of(meta)
    files = {
        WEIGHTS_FILE: weights,
        VALID_PREDICTIONS: storage.parquet_bytes(with_calibrated(valid_keyed, calibrated)),
        TUNE_PREDICTIONS: storage.parquet_bytes(with_calibrated(tune_keyed, calibrated)),
        RELIABILITY: reliability_png(meta["calibration"]),
        "model_card.md": render_model_card(meta).encode(),
        METADATA_FILE: json.dumps(meta, indent=2, sort_keys=True).encode(),
    }
    write_checkpoint(storage.join(run_dir, MODEL_DIR), files)
    fs, base = storage.filesystem(run_dir)
    for name, table in ((VALID_PREDICTIONS, valid_predictions), (TUNE_PREDICTIONS, tune_predictions)):
        if "image_uri" in table.column_names:  # the run's own record, which never leaves RUN_DIR
            whole = with_calibrated(table.sort_by("image_uri"), calibrated)
            storage.write_atomic(fs, storage.join(base, name), storage.parquet_bytes(whole))
    return meta


def read_history(run_dir: str) -> list[dict[str, Any]]:
    path = storage.join(run_dir, "metrics.json")
    return json.loads(storage.read_text(path)) if storage.exists(path) else []


def run_config(run_dir: str, max_failures: int) -> Any:
    """Ray Train keeps its checkpoints in RUN_DIR/ray_train; rerunning the same RUN_DIR resumes from them."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    if storage.is_remote(run_dir):
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        fs, path = storage.filesystem(run_dir)
        storage_path, storage_fs = path, PyFileSystem(FSSpecHandler(fs))
    else:
        storage_path, storage_fs = run_dir, None
    return RunConfig(
        name=TRAIN_RUN_NAME,
        storage_path=storage_path,
        storage_filesystem=storage_fs,
        # The latest epochs' full state, for restarts and reruns; each also holds the best epoch so far.
        checkpoint_config=CheckpointConfig(num_to_keep=2),
        failure_config=FailureConfig(max_failures=max_failures),
    )


def check_same_run(run_dir: str, now: dict[str, Any], resumable: set[str]) -> None:
    """A RUN_DIR holds one run: rerunning it resumes, so its settings must match (epochs and a few others aside)."""
    from mura_ray.errors import UsageError

    path = storage.join(run_dir, CONFIG)
    if not storage.exists(path):
        return
    before = json.loads(storage.read_text(path))
    changed = sorted(k for k in now if k not in resumable and before.get(k, now[k]) != now[k])
    if changed:
        differences = ", ".join(f"{k}: {before.get(k)!r} -> {now[k]!r}" for k in changed)
        raise UsageError(
            f"{run_dir!r} holds a run with other settings ({differences}); "
            f"rerunning a RUN_DIR resumes it: use a new --out for a new run"
        )
