"""Training and evaluation presets on batches of cached uint8 squares.

Each preset takes and returns ``dict[str, np.ndarray]`` so Ray Data can map
it; the ``pixels`` column goes from (B, R, R) uint8 (the cache) to (B, S, S)
uint8. Normalisation to float happens on the model's device
(``model.to_input``), which keeps the data moved per image small.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F


class EvalPreset:
    """Fixed centre crop to ``size`` (the cache already holds the resize)."""

    def __init__(self, *, size: int) -> None:
        self.size = size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels = batch["pixels"]
        r = pixels.shape[-1]
        off = (r - self.size) // 2
        out = dict(batch)
        out["pixels"] = np.ascontiguousarray(pixels[:, off : off + self.size, off : off + self.size])
        return out


class TrainPreset:
    """Random rotation, random resized crop, horizontal flip, brightness/contrast jitter."""

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
        self.size = size
        self.rotation = rotation
        self.crop_scale = crop_scale
        self.hflip_prob = hflip_prob
        self.jitter = jitter
        # Each process needs its own stream: torch's default seed is the same in every new process.
        seed = seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        self.generator = torch.Generator().manual_seed(seed)

    def _uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=self.generator))

    def _crop_box(self, side: int) -> tuple[int, int, int, int]:
        """A random box of ``crop_scale`` of the area and aspect in [3/4, 4/3] (as RandomResizedCrop)."""
        area = self._uniform(*self.crop_scale) * side * side
        aspect = math.exp(self._uniform(math.log(3 / 4), math.log(4 / 3)))
        w = min(side, max(1, round(math.sqrt(area * aspect))))
        h = min(side, max(1, round(math.sqrt(area / aspect))))
        top = int(self._uniform(0, side - h + 1))
        left = int(self._uniform(0, side - w + 1))
        return min(top, side - h), min(left, side - w), h, w

    def augment(self, image: torch.Tensor) -> torch.Tensor:
        """(1, R, R) uint8 -> (1, S, S) uint8."""
        angle = self._uniform(-self.rotation, self.rotation)
        image = F.rotate(image, angle, interpolation=v2.InterpolationMode.BILINEAR)
        top, left, h, w = self._crop_box(image.shape[-1])
        image = F.resized_crop(image, top, left, h, w, [self.size, self.size], antialias=True)
        if self._uniform(0, 1) < self.hflip_prob:
            image = F.horizontal_flip(image)
        image = F.adjust_brightness(image, self._uniform(1 - self.jitter, 1 + self.jitter))
        image = F.adjust_contrast(image, self._uniform(1 - self.jitter, 1 + self.jitter))
        return image

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"]))
        out = dict(batch)
        out["pixels"] = torch.cat([self.augment(p[None]) for p in pixels]).numpy()
        return out
