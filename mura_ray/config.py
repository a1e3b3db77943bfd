"""One typed config per job, filled from the CLI, saved next to its outputs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass
class TrainConfig:
    data: str
    out: str
    workers: int = 2
    epochs: int = 10
    image_size: int = 224
    batch_size: int = 32  # per worker
    lr: float = 1e-3
    weights: str = "imagenet"
    trainable: str = "auto"  # layer3,layer4,fc from pretrained weights; all with --weights none
    patience: int = 3  # epochs without a better validation F1 before stopping
    lr_patience: int = 1  # ReduceLROnPlateau on validation loss
    lr_factor: float = 0.3
    seed: int = 0
    use_gpu: bool | None = None  # None: use GPUs when the cluster has enough
    cpus_per_worker: float | None = None  # None: sized from the cluster
    shuffle_labels: bool = False  # leakage check: train on permuted labels
    max_failures: int = 0  # worker-group restarts from the latest epoch's checkpoint
    target_sensitivity: float | None = None  # None: threshold maximising study kappa
    placement_strategy: str = "PACK"  # SPREAD / STRICT_SPREAD put workers on different nodes
    fault: str | None = None  # test hook: "crash@E" kills the last worker once in epoch E

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ScoreConfig:
    model: str
    input: str
    output: str
    split: str | None = None
    batch_size: int = 64
    actors: int | None = None  # None: sized from the cluster
    cpus_per_actor: float | None = None
    use_gpu: bool | None = None
    run_id: str | None = None
    full: bool = False  # rescore everything, not only new and changed files
    max_error_rate: float = 0.01  # above it the run still commits, and the CLI exits 3

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
