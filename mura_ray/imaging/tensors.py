"""The torch side of preprocessing: the training preset and the model input. No Ray.

- ``TrainPreset``: random rotation, resized crop, flip, brightness/contrast
  (torchvision v2 transforms) over batches of cached squares;
- ``to_input``: uint8 gray -> ImageNet-normalised float on the model's
  device, so the data moved per image stays one byte per pixel.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np
import torch
from torchvision.transforms import v2

from mura_ray.imaging.preprocess import IMAGENET_MEAN, IMAGENET_STD


class TrainPreset:
    """Random rotation, random resized crop, horizontal flip, brightness/contrast jitter (torchvision v2)."""

    def __init__(
        self,
        *,
        size: int,
        rotation: float = 15.0,
        crop_scale: tuple[float, float] = (0.6, 1.0),
        hflip_prob: float = 0.5,
        jitter: float = 0.2,
        seed: int | None = None,
    ) -> None:
        self.transform = v2.Compose(
            [
                v2.RandomRotation(rotation, interpolation=v2.InterpolationMode.BILINEAR),
                v2.RandomResizedCrop(size, scale=crop_scale, ratio=(3 / 4, 4 / 3), antialias=True),
                v2.RandomHorizontalFlip(hflip_prob),
                v2.ColorJitter(brightness=jitter, contrast=jitter),
            ]
        )
        # torch's default seed is the same in every new process: each preset draws its own.
        self.seed = seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Augment ``pixels``; with an ``aug_seed`` column (int64 per row), each row from its own seed, so an
        image's augmentation depends on nothing but that seed (``augmentation_seeds``)."""
        pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"]))  # (B, R, R)
        seeds = batch.get("aug_seed")
        with torch.random.fork_rng(devices=[]):  # v2 samples from the global generator: keep it to this call
            if seeds is None:
                torch.manual_seed(self.seed)
                self.seed += 1
            images = []
            for i, p in enumerate(pixels):
                if seeds is not None:
                    torch.manual_seed(int(seeds[i]))
                images.append(self.transform(p[None]))  # (1, S, S)
        out = dict(batch)
        out["pixels"] = torch.cat(images).numpy()
        return out


def augmentation_seeds(seed: int, keys: Any, draws: Any) -> np.ndarray:
    """One seed per row from (the run's ``seed``, the image's key, how many times it was drawn before): the
    same image gets the same augmentation in the same epoch of two runs, whichever worker or batch it is in."""
    out = np.empty(len(keys), dtype=np.int64)
    for i, (key, n) in enumerate(zip(keys, draws)):
        digest = hashlib.blake2b(f"{seed}\0{key}\0{n}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "little") >> 1
    return out


def to_input(pixels: torch.Tensor, *, channels_last: bool = True) -> torch.Tensor:
    """(B, S, S) uint8 gray on any device -> (B, 3, S, S) float, ImageNet-normalised.

    The gray channel is repeated to the three channels ResNet expects.
    """
    x = pixels.unsqueeze(1).float().div_(255.0)  # (B, 1, S, S)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    x = (x.expand(-1, 3, -1, -1) - mean) / std  # (B, 3, S, S)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()
