"""The scoring pipeline on Ray Data: image keys -> decode tasks -> model actors -> probabilities.

The dataset carries only ``image_uri`` and the listing's fingerprint
(``source_size``, ``source_etag``: a file changed since it was listed is a
read error) in, and ``image_uri``,
``prob_abnormal`` (NaN where the file failed; calibrated with the model's
temperature, averaged over the image and its mirror with ``--tta flip``)
and ``error`` out; the driver
joins results back onto its catalog. The driver reads the weights once and
hands their bytes to every model actor through Ray's object store; each
actor checks that their sha256 is the run's ``model_id`` before it scores,
so every row is computed with the weights its ``model_id`` names, whatever
happens to the model folder during the run. DICOM files of modalities not
asked for come out with ``modality`` set and no score.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch

from mura_ray import cluster
from mura_ray.archive import storage
from mura_ray.config import ScoreConfig
from mura_ray.data import catalog_dataset
from mura_ray.hardware import no_cuda_message
from mura_ray.imaging.preprocess import fit_of, read_and_decode
from mura_ray.model import backends
from mura_ray.model.calibration import Calibration
from mura_ray.model.ensemble import architecture_of
from mura_ray.model.scorer import BatchScorer


class Scorer(BatchScorer):
    """The model-holding actor: ``BatchScorer`` with the run's weights taken once from Ray's object store.

    An actor given a GPU on a node where torch sees no CUDA stops with one line."""

    def __init__(self, weights: list[ray.ObjectRef], use_gpu: bool, **settings: Any):
        if use_gpu and not torch.cuda.is_available():
            raise RuntimeError(no_cuda_message(ray.get_runtime_context().get_node_id()))
        super().__init__(ray.get(weights[0]), device=torch.device("cuda" if use_gpu else "cpu"), **settings)


_SCORE = {f.name: f.default for f in dataclasses.fields(ScoreConfig)}


@dataclasses.dataclass(frozen=True)
class ScoringSettings:
    """What the scoring pipeline takes of a job's settings: ``score``'s (``of``), and ``evaluate``'s and
    ``explain``'s, which score with the defaults of ``score`` but for what they set."""

    data: str  # the archive root the keys are under
    batch_size: int | None = _SCORE["batch_size"]
    modalities: str = "ALL"
    backend: str = _SCORE["backend"]
    precision: str = _SCORE["precision"]
    tta: str = _SCORE["tta"]
    actors: int | None = _SCORE["actors"]
    cpus_per_actor: float | None = _SCORE["cpus_per_actor"]
    use_gpu: str = _SCORE["use_gpu"]
    gpus_per_actor: float = _SCORE["gpus_per_actor"]
    gpu_timeout: float = _SCORE["gpu_timeout"]

    @classmethod
    def of(cls, cfg: ScoreConfig) -> ScoringSettings:
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


def accepted_modalities(setting: str) -> tuple[str, ...] | None:
    """``--modalities`` as the decoder takes it: the codes, or None for ``all``."""
    return None if setting == "ALL" else tuple(setting.split(","))


def scored_dataset(keys: pa.Table, weights: bytes, meta: dict[str, Any], cfg: ScoringSettings) -> ray.data.Dataset:
    """``image_uri`` rows -> rows with ``prob_abnormal`` (NaN where ``error`` or ``modality`` is set).

    Decode tasks read and decode; model actors score with ``weights`` (the
    safetensors bytes whose sha256 is ``meta["model_id"]``)."""

    backends.check_choice(cfg.backend, cfg.precision)
    cluster.require_connected("scored_dataset")
    weights_ref = ray.put(weights)
    plan = cluster.place_scoring_actors(
        cfg.actors, cfg.use_gpu, cfg.cpus_per_actor, cfg.gpus_per_actor, cfg.gpu_timeout, cfg.backend
    )
    fs, _ = storage.filesystem(cfg.data)
    # The listing's fingerprint travels with the key: a file that changed since is a read error, not a score.
    listed = [c for c in ("image_uri", "source_size", "source_etag") if c in keys.column_names]
    ds = catalog_dataset(keys.select(listed)).map_batches(
        read_and_decode,
        fn_kwargs={
            "side": int(meta["cache_side"]),
            "fs": fs,
            "modalities": accepted_modalities(cfg.modalities),
            "fit": fit_of(meta),
        },
        batch_size=16,
        num_cpus=0.5,
    )
    return ds.map_batches(
        Scorer,
        fn_constructor_kwargs={
            "weights": [weights_ref],
            "model_id": meta["model_id"],
            "image_size": int(meta["image_size"]),
            "threads": plan.threads,
            "use_gpu": plan.use_gpu,
            "backend": cfg.backend,
            "precision": cfg.precision,
            "refused": backends.failed_guard(meta, "cuda" if plan.use_gpu else "cpu"),
            "calibration": Calibration.of(meta),
            "architecture": architecture_of(meta),
            "tta": cfg.tta,
        },
        batch_size=plan.batch_size(cfg.batch_size),
        compute=ray.data.ActorPoolStrategy(min_size=plan.min_actors, max_size=plan.max_actors),
        num_cpus=plan.cpus,
        num_gpus=plan.gpus,
    )


def results_table(batch: dict[str, np.ndarray]) -> pa.Table:
    """A batch of the pipeline's output as Arrow: ``image_uri``, ``prob_abnormal`` (calibrated with the model's
    temperature; null on error) and ``prob_uncalibrated`` (the model's own output), ``error``,
    ``modality`` ("" unless the file is a DICOM of a modality not scored), and the ``backend`` and
    ``precision`` that computed the score (null where there is none)."""
    probs = np.asarray(batch["prob_abnormal"], dtype=np.float32)
    raw = np.asarray(batch["prob_uncalibrated"], dtype=np.float32)
    return pa.table(
        {
            "image_uri": pa.array(batch["image_uri"].astype(str), pa.string()),
            "prob_abnormal": pa.array(probs, pa.float32(), mask=np.isnan(probs)),
            "prob_uncalibrated": pa.array(raw, pa.float32(), mask=np.isnan(raw)),
            "error": pa.array([e or None for e in batch["error"].tolist()], pa.string()),
            "modality": pa.array(batch["modality"].astype(str), pa.string()),
            **{k: pa.array([v or None for v in batch[k].tolist()], pa.string()) for k in ("backend", "precision")},
        }
    )
