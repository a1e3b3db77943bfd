"""Training recipes: the settings a ``--recipe`` gives every option left unset. No Ray here.

``default`` is sized for a first run anywhere (224 px, the whole image
letterboxed, Adam 1e-3, the last blocks trained from ImageNet, 10 epochs,
the kept epoch chosen by the tuning split's image F1). ``mura`` follows the
MURA paper (Rajpurkar et al. 2017: the whole image scaled to 320x320, every
layer trained, Adam 1e-4 at batch 8, flips and rotations up to 30 degrees),
with early stopping and the kept epoch on the tuning split's study kappa,
MURA's own figure. The paper trained on one GPU at batch 8; on N workers
the learning rate grows with the square root of the global batch (the rule
usually kept for Adam): 1e-4 x sqrt(N x batch / 8).
"""

from __future__ import annotations

import math
from typing import Any

RECIPES: dict[str, dict[str, Any]] = {
    "default": {
        "image_size": 224,
        "fit": "pad",
        "batch_size": 32,
        "lr": 1e-3,
        "epochs": 10,
        "rotation": 15.0,
        "select_on": "f1",
        "trainable_from_pretrained": "layer3,layer4,fc",
    },
    "mura": {
        "image_size": 320,
        "fit": "stretch",
        "batch_size": 8,
        "lr": None,  # 1e-4 at the paper's batch of 8, scaled with the global batch (module docstring)
        "epochs": 30,
        "rotation": 30.0,
        "select_on": "study_kappa",
        "trainable_from_pretrained": "all",
    },
}
MURA_LR, MURA_BATCH = 1e-4, 8
SELECT_ON = ("f1", "study_kappa", "auroc")  # the tuning-split metrics early stopping can follow
SELECTED = {"f1": "F1", "study_kappa": "study kappa", "auroc": "AUROC"}  # as the console and the card say them


def recipe_lr(recipe: str, workers: int, batch_size: int) -> float:
    """The recipe's learning rate for ``workers`` x ``batch_size`` images per step."""
    lr = RECIPES[recipe]["lr"]
    if lr is not None:
        return lr
    return MURA_LR * math.sqrt(workers * batch_size / MURA_BATCH)


def resolve(cfg: Any) -> list[str]:
    """Fill the options of ``cfg`` (a TrainConfig) left unset (None, ``trainable auto``) from its recipe;
    returns ``name=value`` for each one filled, for the log."""
    recipe = RECIPES[cfg.recipe]
    filled = []
    for name in ("image_size", "fit", "batch_size", "epochs", "rotation", "select_on"):
        if getattr(cfg, name) is None:
            setattr(cfg, name, recipe[name])
            filled.append(f"{name}={recipe[name]}")
    if cfg.lr is None:
        cfg.lr = recipe_lr(cfg.recipe, cfg.workers, cfg.batch_size)
        filled.append(f"lr={cfg.lr:.3g}")
    if cfg.trainable == "auto":
        cfg.trainable = "all" if cfg.weights == "none" else recipe["trainable_from_pretrained"]
        filled.append(f"trainable={cfg.trainable}")
    return filled
