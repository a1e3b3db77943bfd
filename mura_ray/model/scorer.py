"""What a scoring actor does with a batch, without Ray: weights in once, cached squares in, probabilities out.

``BatchScorer`` holds the folded model on its device, chooses the inference
engine on the first batch that has images to score (``backends.select``,
whose accuracy guard runs on that batch's first images: 16 on a CPU, the
whole batch on a GPU, where it costs little) and calibrates with the model's
temperature. The Ray actor (``scoring.pipeline.Scorer``) is this class with
the weights taken from Ray's object store; the GPU check
(``bench/gpu_core.py``) runs it as it is.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mura_ray.imaging.preprocess import EvalPreset
from mura_ray.model import backends
from mura_ray.model.calibration import IDENTITY, Calibration
from mura_ray.model.checkpoint import model_id_of
from mura_ray.model.ensemble import module_from
from mura_ray.model.resnet import for_inference

CPU_GUARD_IMAGES = 16


class BatchScorer:
    """Scores batches of cached squares with the weights whose sha256 is ``model_id``."""

    def __init__(
        self,
        weights: bytes,
        model_id: str,
        image_size: int,
        threads: int,
        device: torch.device,
        backend: str = "auto",
        precision: str = "auto",
        refused: tuple[str, ...] = (),
        calibration: Calibration = IDENTITY,
        tta: str = "none",
        architecture: dict[str, Any] | None = None,
    ):
        torch.set_num_threads(threads)
        if model_id_of(weights) != model_id:
            raise RuntimeError(f"the weights handed to this actor are not model {model_id[:12]}")
        model = module_from(weights, architecture or {})
        self.device = device
        self.model = for_inference(model, device)
        self.model_id, self.image_size, self.setting, self.refused = model_id, image_size, (backend, precision), refused
        self.crop = EvalPreset(size=image_size)
        self.engine: backends.Engine | None = None
        self.calibration, self.tta = calibration, tta

    def choose_engine(self, pixels: np.ndarray) -> backends.Engine:
        """The engine, chosen once on ``pixels`` (centre-cropped squares) as the accuracy guard's batch."""
        if self.engine is None:
            guard = pixels if self.device.type != "cpu" else pixels[:CPU_GUARD_IMAGES]
            self.engine = backends.select(
                self.model, *self.setting, self.device, self.image_size, self.model_id, guard, tuple(self.refused)
            )
        return self.engine

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = (batch["error"] == "") & (batch["modality"] == "")
        probs = np.full(len(ok), np.nan, dtype=np.float32)
        raw = probs.copy()
        if ok.any():
            pixels = self.crop({"pixels": batch["pixels"][ok]})["pixels"]
            engine = self.choose_engine(pixels)
            raw[ok] = engine(pixels)
            if self.tta == "flip":
                raw[ok] = (raw[ok] + engine(pixels[:, :, ::-1])) / 2
            probs[ok] = self.calibration.apply(raw[ok])
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
