"""The scoring pipeline on Ray Data: image keys -> decode tasks -> model actors -> probabilities.

The dataset carries only ``image_uri`` in, and ``image_uri``,
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

from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch
from safetensors.torch import load as st_load

from mura_ray import cluster
from mura_ray.archive import storage
from mura_ray.config import ScoreConfig
from mura_ray.data import catalog_dataset
from mura_ray.imaging.preprocess import EvalPreset, read_and_decode
from mura_ray.model import backends
from mura_ray.model.calibration import apply_temperature
from mura_ray.model.checkpoint import model_id_of
from mura_ray.model.resnet import build_model, for_inference

GUARD_IMAGES = 16


class Scorer:
    """Model-holding actor: takes the run's weights once, scores batches of cached squares.

    The inference engine is chosen on the first batch that has images to
    score, whose first images serve as the accuracy guard's batch."""

    def __init__(
        self,
        weights: list[ray.ObjectRef],
        model_id: str,
        image_size: int,
        threads: int,
        use_gpu: bool,
        backend: str = "auto",
        precision: str = "auto",
        refused: tuple[str, ...] = (),
        temperature: float = 1.0,
        tta: str = "none",
    ):
        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        data = ray.get(weights[0])
        if model_id_of(data) != model_id:
            raise RuntimeError(f"the weights handed to this actor are not model {model_id[:12]}")
        model = build_model()
        model.load_state_dict(st_load(data))
        self.model = for_inference(model, self.device)
        self.model_id, self.image_size, self.setting, self.refused = model_id, image_size, (backend, precision), refused
        self.crop = EvalPreset(size=image_size)
        self.engine: backends.Engine | None = None
        self.temperature, self.tta = temperature, tta

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = (batch["error"] == "") & (batch["modality"] == "")
        probs = np.full(len(ok), np.nan, dtype=np.float32)
        raw = probs.copy()
        if ok.any():
            pixels = self.crop({"pixels": batch["pixels"][ok]})["pixels"]
            if self.engine is None:
                self.engine = backends.select(
                    self.model,
                    *self.setting,
                    self.device,
                    self.image_size,
                    self.model_id,
                    pixels[:GUARD_IMAGES],
                    tuple(self.refused),
                )
            raw[ok] = self.engine(pixels)
            if self.tta == "flip":
                raw[ok] = (raw[ok] + self.engine(pixels[:, :, ::-1])) / 2
            probs[ok] = apply_temperature(raw[ok], self.temperature)
        engine = self.engine
        return {
            "image_uri": batch["image_uri"],
            "prob_abnormal": probs,
            "prob_uncalibrated": raw,
            "error": batch["error"],
            "modality": batch["modality"],
            "backend": np.where(ok, engine.backend if engine else "", ""),
            "precision": np.where(ok, engine.precision if engine else "", ""),
        }


def accepted_modalities(setting: str) -> tuple[str, ...] | None:
    """``--modalities`` as the decoder takes it: the codes, or None for ``all``."""
    return None if setting == "ALL" else tuple(setting.split(","))


def scored_dataset(keys: pa.Table, weights: bytes, meta: dict[str, Any], cfg: ScoreConfig) -> ray.data.Dataset:
    """``image_uri`` rows -> rows with ``prob_abnormal`` (NaN where ``error`` or ``modality`` is set).

    Decode tasks read and decode; model actors score with ``weights`` (the
    safetensors bytes whose sha256 is ``meta["model_id"]``)."""

    backends.check_choice(cfg.backend, cfg.precision)
    cluster.connect()
    weights_ref = ray.put(weights)
    actors, cpus, threads, use_gpu = cluster.scoring_plan(cfg.actors, cfg.use_gpu, cfg.cpus_per_actor)
    fs, _ = storage.filesystem(cfg.data)
    ds = catalog_dataset(keys.select(["image_uri"])).map_batches(
        read_and_decode,
        fn_kwargs={"side": int(meta["cache_side"]), "fs": fs, "modalities": accepted_modalities(cfg.modalities)},
        batch_size=16,
        num_cpus=0.5,
    )
    return ds.map_batches(
        Scorer,
        fn_constructor_kwargs={
            "weights": [weights_ref],
            "model_id": meta["model_id"],
            "image_size": int(meta["image_size"]),
            "threads": threads,
            "use_gpu": use_gpu,
            "backend": cfg.backend,
            "precision": cfg.precision,
            "refused": backends.failed_guard(meta),
            "temperature": float(meta.get("temperature", 1.0)),
            "tta": cfg.tta,
        },
        batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus,
        num_gpus=1 if use_gpu else 0,
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
