"""An ensemble of ResNet18 models as one module, and the module any model folder's weights make. No Ray.

As in the MURA paper, an ensemble's P(abnormal) is the mean of its members'
probabilities. ``Ensemble`` returns log(mean_k softmax(f_k(x))): log
probabilities are logits whose softmax is that mean, so everything built for
one ResNet (the inference engines and their exports, test-time flips,
calibration, Grad-CAM on class 1) takes an ensemble unchanged. Its input is
the largest member's; a member trained at a smaller side gets the input
resized to its own (bilinear, which every engine exports; ONNX has no
antialiased resize). Its weights are one safetensors file with each member's
tensors under ``members.K.``: the file's sha256, the model_id, covers every
member, and the metadata's ``members`` name them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from torch import nn

from mura_ray.model.resnet import ARCHITECTURE, build_model

ENSEMBLE = "ensemble"


class Ensemble(nn.Module):
    def __init__(self, sizes: list[int]):
        super().__init__()
        self.members = nn.ModuleList(build_model() for _ in sizes)
        self.sizes = [int(s) for s in sizes]
        self.side = max(self.sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = []
        for member, size in zip(self.members, self.sizes):
            xm = x if size == self.side else F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
            probs.append(torch.softmax(member(xm).float(), dim=1))
        return torch.log(torch.stack(probs).mean(dim=0).clamp_min(1e-12))


def members_of(model: nn.Module) -> list[nn.Module]:
    """The ResNets of ``model``: its members for an ensemble, else itself."""
    return list(model.members) if isinstance(model, Ensemble) else [model]


def is_ensemble(meta: dict[str, Any]) -> bool:
    return meta.get("architecture") == ENSEMBLE


def architecture_of(meta: dict[str, Any]) -> dict[str, Any]:
    """The part of a model's metadata that ``module_from`` needs (small enough to hand to every actor)."""
    return {k: meta[k] for k in ("architecture", "members") if k in meta}


def module_from(weights: bytes, meta: dict[str, Any]) -> nn.Module:
    """The module a model folder's ``weights`` and ``meta`` make: a ResNet18, or an ``Ensemble`` of them."""
    if is_ensemble(meta):
        model: nn.Module = Ensemble([m["image_size"] for m in meta["members"]])
    elif meta.get("architecture", ARCHITECTURE) == ARCHITECTURE:
        model = build_model()
    else:
        raise ValueError(f"unknown architecture {meta.get('architecture')!r}")
    model.load_state_dict(st_load(weights))
    return model
