"""``mura-ray ensemble``: one model folder from several trained ones, scored by the mean of their probabilities.

No Ray and no images: every member's folder already holds its uncalibrated
predictions on the tuning and the validation split (``prob_uncalibrated``),
keyed by rank rather than by path (``training.predictions``).
The ensemble's predictions are their mean per image; the calibration and the
threshold are chosen on the tuning split's and the report computed on the
validation split's, as for one model (``rundir.write_model_folder``). The
members must have been tuned on the same images (the same tuning split) and
share their preprocessing (``fit``); their input sides may differ.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from mura_ray import __version__
from mura_ray.archive import storage
from mura_ray.config import EnsembleConfig
from mura_ray.errors import UsageError
from mura_ray.imaging.preprocess import fit_of
from mura_ray.model.checkpoint import model_metadata, read_checkpoint
from mura_ray.model.ensemble import ENSEMBLE, is_ensemble
from mura_ray.model.registry import resolve_model_dir
from mura_ray.training import predictions, rundir

log = logging.getLogger(__name__)


def _predictions(model_dir: str, name: str) -> pa.Table:
    fs, path = storage.filesystem(model_dir)
    file = storage.join(path, name)
    if not fs.exists(file):
        raise UsageError(f"{model_dir!r} has no {name}: it was not written by `mura-ray train`")
    return predictions.keyed(pq.read_table(fs.open(file)))  # members written before keys get them here


def mean_predictions(tables: list[pa.Table], split: str) -> pa.Table:
    """The members' keyed predictions on one split, one row per image, ``prob_abnormal`` the mean of their
    uncalibrated probabilities. The members must hold the same images with the same labels."""
    first = tables[0]
    for k, t in enumerate(tables[1:], start=2):
        if not predictions.same_images([first, t]):
            raise UsageError(
                f"member {k} holds predictions on other {split} images than member 1: the members of an ensemble "
                "must be trained on one archive with one tuning split (the same --data, --tune-fraction and --seed)"
            )
    mean = np.mean([t["prob_uncalibrated"].to_numpy() for t in tables], axis=0).astype(np.float32)
    table = first.select([*predictions.KEYS, "label", "body_part"]).append_column("prob_abnormal", pa.array(mean))
    return table.replace_schema_metadata(first.schema.metadata)


def ensemble_weights(members: list[bytes]) -> bytes:
    """One safetensors file with member K's tensors under ``members.K.`` (``model.ensemble.Ensemble``'s keys)."""
    return st_save({f"members.{k}.{name}": t for k, w in enumerate(members) for name, t in st_load(w).items()})


def build_ensemble(cfg: EnsembleConfig) -> dict[str, Any]:
    """Write ``cfg.out/model/``: the members' weights, the mean predictions, calibration, threshold, report."""
    if len(cfg.models) < 2:
        raise UsageError("--models: an ensemble needs at least 2 members")
    dirs = [resolve_model_dir(m) for m in cfg.models]
    read = [read_checkpoint(d) for d in dirs]
    metas = [meta for _, meta in read]
    for d, meta in zip(dirs, metas):
        if is_ensemble(meta):
            raise UsageError(f"{d!r} is an ensemble: list its members instead")
    ids = [meta["model_id"] for meta in metas]
    if len(set(ids)) < len(ids):
        raise UsageError("--models: a model is listed twice")
    fits = {fit_of(meta) for meta in metas}
    if len(fits) > 1:
        raise UsageError(f"--models: the members fit images to the square differently ({', '.join(sorted(fits))})")
    tune = mean_predictions([_predictions(d, rundir.TUNE_PREDICTIONS) for d in dirs], "tuning")
    valid = mean_predictions([_predictions(d, rundir.VALID_PREDICTIONS) for d in dirs], "validation")
    sizes = [int(meta["image_size"]) for meta in metas]
    metadata = {
        **model_metadata(max(sizes), fits.pop()),
        "architecture": ENSEMBLE,
        "members": [
            {
                "model_id": meta["model_id"],
                "image_size": size,
                "source": d,
                "validation_study_kappa": meta.get("validation", {}).get("study", {}).get("kappa"),
            }
            for d, meta, size in zip(dirs, metas, sizes)
        ],
        "protocol": metas[0].get("protocol"),
        "data_fingerprint": metas[0].get("data_fingerprint"),
        "ensemble_config": cfg.to_dict(),
        "package_version": __version__,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if metadata["protocol"] is None:
        raise UsageError(f"{dirs[0]!r} records no tuning protocol: retrain it with this version of mura-ray")
    meta = rundir.write_model_folder(
        cfg.out,
        ensemble_weights([w for w, _ in read]),
        tune,
        valid,
        metadata,
        target_sensitivity=cfg.target_sensitivity,
        seed=cfg.seed,
        calibration=cfg.calibration,
    )
    return dict(meta, model_dir=storage.join(cfg.out, rundir.MODEL_DIR))
