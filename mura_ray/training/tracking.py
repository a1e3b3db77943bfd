"""Experiment tracking in MLflow, from the training driver only.

On when ``train --mlflow URI`` is given or ``MLFLOW_TRACKING_URI`` is set;
otherwise this module is not imported and nothing is written. MLflow is the
optional extra ``mura-ray[mlflow]``. What is logged to one MLflow run per
RUN_DIR: the configuration and the data fingerprint (params), each epoch's
metrics as it ends (``step=epoch``), and when training ends the model folder,
the curves, the history and the validation report (artifacts; the model
folder under ``models/<model_id>``, which names no image or patient unless
``--keep-predictions``, as ``tune_patients.txt`` is logged only then) and the
validation figures (metrics). ``--register NAME`` adds the kept model to the
registry, tagged with its model_id. The MLflow run id is kept in
``RUN_DIR/mlflow_run.json``, so a resumed training continues the same run.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from typing import Any

from mura_ray.archive import storage
from mura_ray.model.registry import client as _client
from mura_ray.model.registry import tracking_uri
from mura_ray.training.protocol import PATIENTS_FILE

__all__ = ["RUN_FILE", "Tracker", "tracking_uri"]

log = logging.getLogger(__name__)

RUN_FILE = "mlflow_run.json"
EXPERIMENT = "mura-ray"


class Tracker:
    """One MLflow run per RUN_DIR, created on the first training and continued by every rerun."""

    def __init__(self, uri: str, run_dir: str, experiment: str = EXPERIMENT):
        self.client = _client(uri)
        self.uri, self.run_dir = uri, run_dir
        path = storage.join(run_dir, RUN_FILE)
        known = json.loads(storage.read_text(path)) if storage.exists(path) else None
        if known and known.get("tracking_uri") == uri:
            self.run_id = known["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            log.info("MLflow: continuing run %s at %s", self.run_id, uri)
        else:
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
            name = os.path.basename(run_dir.rstrip("/"))
            run = self.client.create_run(experiment_id, run_name=name, tags={"mura_ray.run_dir": run_dir})
            self.run_id = run.info.run_id
            storage.write_text(path, json.dumps({"tracking_uri": uri, "run_id": self.run_id}, indent=2))
            log.info("MLflow: logging to run %s at %s", self.run_id, uri)
        self._logged_epochs = {m.step for m in self.client.get_metric_history(self.run_id, "train_loss")}

    def log_params(self, params: dict[str, Any]) -> None:
        """Parameters not logged yet (MLflow keeps a parameter's first value; a resume may change a few)."""
        from mlflow.entities import Param

        have = self.client.get_run(self.run_id).data.params
        new = [Param(k, str(v)[:6000]) for k, v in sorted(params.items()) if k not in have]
        if new:
            self.client.log_batch(self.run_id, params=new)

    def log_epoch(self, epoch: int, metrics: dict[str, Any]) -> None:
        """One epoch's numeric metrics at ``step=epoch``, once per epoch."""
        from mlflow.entities import Metric

        if epoch in self._logged_epochs:
            return
        now = int(time.time() * 1000)
        values = [
            Metric(k, float(v), now, epoch)
            for k, v in sorted(metrics.items())
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch"
        ]
        self.client.log_batch(self.run_id, metrics=values)
        self._logged_epochs.add(epoch)

    def on_event(self, event: dict[str, Any]) -> None:
        """The training display's events: an ended epoch is logged as it arrives."""
        if event.get("kind") == "epoch":
            self.log_epoch(int(event["epoch"]), event)

    def finish(
        self, meta: dict[str, Any], history: list[dict[str, Any]], register: str | None, keep_predictions: bool = False
    ) -> dict[str, Any]:
        """Log what training left (epochs not logged yet, the model folder, curves, report), end the run, and
        register the model under ``register``; returns what was logged where. The tuning split's patients
        (``tune_patients.txt``) only with ``keep_predictions``."""
        for h in history:
            self.log_epoch(int(h["epoch"]), h)
        self._log_validation(meta)
        self.client.set_tag(self.run_id, "model_id", meta["model_id"])
        folder = self._log_artifacts(meta, keep_predictions)
        version = self._register(register, meta["model_id"], folder) if register else None
        self.client.set_terminated(self.run_id, "FINISHED")
        return {"tracking_uri": self.uri, "run_id": self.run_id, "registered": version}

    def fail(self) -> None:
        self.client.set_terminated(self.run_id, "FAILED")

    def _log_validation(self, meta: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = {}
        for level in ("image", "study"):
            for key in ("kappa", "auroc", "f1", "sensitivity", "specificity"):
                values[f"valid_{level}_{key}"] = meta["validation"][level][key]
            for when in ("before", "after"):
                for key in ("ece", "brier"):
                    values[f"valid_{level}_{key}_{when}_calibration"] = meta["calibration"][level][when][key]
        values.update(
            threshold=meta["threshold"], temperature=meta["temperature"], logit_offset=meta.get("logit_offset", 0.0)
        )
        finite = [Metric(k, float(v), now, 0) for k, v in values.items() if v == v]  # NaN where undefined
        self.client.log_batch(self.run_id, metrics=finite)

    def _log_artifacts(self, meta: dict[str, Any], keep_predictions: bool) -> str:
        """The run directory's outputs as artifacts; the model folder under ``models/<model_id>``, so that a
        resumed run that keeps another model never changes the files an earlier registered version names."""
        from mura_ray.training import rundir

        folder = f"models/{meta['model_id'][:16]}"
        with tempfile.TemporaryDirectory() as tmp:
            fs, base = storage.filesystem(self.run_dir)
            model = storage.join(base, rundir.MODEL_DIR)
            fs.get(model, os.path.join(tmp, "model"), recursive=True)
            self.client.log_artifacts(self.run_id, os.path.join(tmp, "model"), artifact_path=folder)
            names = [rundir.CURVES, "metrics.csv", rundir.CONFIG] + ([PATIENTS_FILE] if keep_predictions else [])
            for name in names:
                if fs.exists(storage.join(base, name)):
                    fs.get(storage.join(base, name), os.path.join(tmp, name))
                    self.client.log_artifact(self.run_id, os.path.join(tmp, name))
            report = os.path.join(tmp, "validation_report.json")
            with open(report, "w") as f:
                json.dump({"validation": meta["validation"], "calibration": meta["calibration"]}, f, indent=2)
            self.client.log_artifact(self.run_id, report, artifact_path="evaluation")
        return folder

    def _register(self, name: str, model_id: str, folder: str) -> str:
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
                raise
        source = f"{self.client.get_run(self.run_id).info.artifact_uri}/{folder}"
        version = self.client.create_model_version(name, source, run_id=self.run_id, tags={"model_id": model_id})
        log.info("MLflow: registered model %s version %s (model_id %s)", name, version.version, model_id[:12])
        return str(version.version)
