"""The torch side of preprocessing: the training preset and the model input. No Ray.

- ``TrainPreset``: random rotation, resized crop, flip, brightness/contrast
  (torchvision v2 transforms) over batches of cached squares;
- ``to_input``: uint8 gray -> ImageNet-normalised float on the model's
  device, so the data moved per image stays one byte per pixel.
"""

from __future__ import annotations

import os

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
        pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"]))  # (B, R, R)
        with torch.random.fork_rng(devices=[]):  # v2 samples from the global generator: keep it to this call
            torch.manual_seed(self.seed)
            self.seed += 1
            images = [self.transform(p[None]) for p in pixels]  # each (1, S, S)
        out = dict(batch)
        out["pixels"] = torch.cat(images).numpy()
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
