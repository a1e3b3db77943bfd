"""Every job's settings, in one place: one dataclass per job.

Each field carries its command-line help, its check and whether it is a path
(resolved once, in the driver, to an absolute path or an ``s3://`` URI). The
CLI is built from these fields, so a default or a help text is written once.
A config is saved next to the job's outputs and crosses the Ray boundary as a
plain dict.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field
from typing import Any

from mura_ray.archive import storage
from mura_ray.checks import (
    fraction,
    image_size,
    int_list,
    modality_list,
    non_negative_int,
    open_fraction,
    positive_float,
    positive_int,
    run_name,
)
from mura_ray.errors import UsageError


def option(
    default: Any = MISSING,
    *,
    help: str,
    metavar: str | None = None,
    check: Callable[[Any], Any] | None = None,
    choices: tuple[str, ...] | None = None,
    path: bool = False,
    cli: bool = True,
    resumable: bool = False,
) -> Any:
    """A config field with what the CLI and the checks need to know about it.

    ``path``: resolved to an absolute path or URI before anything reaches Ray.
    ``resumable``: a rerun of the same training RUN_DIR may change it.
    ``cli``: offered as a command-line flag.
    """
    meta = dict(help=help, metavar=metavar, check=check, choices=choices, path=path, cli=cli, resumable=resumable)
    return field(default=default, metadata=meta)


class _Config:
    """Shared behaviour: checks on construction, paths resolved once, a plain dict for Ray."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            check, choices = f.metadata.get("check"), f.metadata.get("choices")
            try:
                if check is not None:
                    setattr(self, f.name, check(value))
                if choices is not None and value not in choices:
                    raise argparse.ArgumentTypeError(f"must be one of {', '.join(choices)}, got {value!r}")
            except (argparse.ArgumentTypeError, ValueError) as exc:
                raise UsageError(f"--{f.name.replace('_', '-')}: {exc}") from None
            if f.metadata.get("path") and value:
                setattr(self, f.name, storage.resolve(value))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class SampleConfig(_Config):
    out: str = option(help="folder or s3:// prefix to write MURA-v1.1/ into", metavar="DIR", path=True)
    studies: int = option(400, help="number of studies (about 2.6 images each)", check=positive_int)
    seed: int = option(0, help="random seed; the same seed writes the same bytes", check=non_negative_int)


@dataclass
class TrainConfig(_Config):
    data: str = option(help="archive root with train and valid splits (MURA layout)", metavar="ROOT", path=True)
    out: str = option(
        help="run directory: the model, history, curves and checkpoints go here", metavar="RUN_DIR", path=True
    )
    workers: int = option(2, help="DDP workers", check=positive_int)
    epochs: int = option(10, help="maximum epochs", check=positive_int, resumable=True)
    image_size: int = option(224, help="model input side in pixels", check=image_size)
    batch_size: int = option(32, help="images per worker per step", check=positive_int)
    lr: float = option(1e-3, help="Adam learning rate", check=positive_float)
    weights: str = option(
        "imagenet",
        metavar="imagenet|PATH|none",
        help="starting weights: torchvision's ImageNet download, a safetensors state dict (path or s3://), or none",
    )
    trainable: str = option(
        "auto",
        metavar="BLOCKS",
        help="blocks to train: a comma list of conv1,bn1,layer1..layer4,fc, or all; "
        "auto = layer3,layer4,fc from pretrained weights, all with --weights none",
    )
    patience: int = option(
        3, help="early stopping: epochs without a better validation F1", check=positive_int, resumable=True
    )
    lr_patience: int = option(
        1, help="ReduceLROnPlateau: epochs without a lower validation loss", check=non_negative_int
    )
    lr_factor: float = option(0.3, help="ReduceLROnPlateau: factor applied to the learning rate", check=open_fraction)
    seed: int = option(0, help="random seed", check=non_negative_int)
    precision: str = option(
        "auto",
        help="bf16 autocast where the CPU (AVX512-BF16, AMX) or GPU computes it natively (auto), or fp32|bf16",
        choices=("auto", "fp32", "bf16"),
        resumable=True,
    )
    guard_images: int = option(
        500,
        help="validation images on which each inference engine is checked against torch fp32 after training "
        "(recorded in the model's metadata; --backend auto skips an engine that failed); 0: none",
        check=non_negative_int,
        resumable=True,
    )
    use_gpu: bool | None = option(
        None, help="use GPUs (default: when the cluster has one per worker)", cli=False, resumable=True
    )
    cpus_per_worker: float | None = option(
        None, help="CPUs each worker reserves (default: sized from the cluster)", check=positive_float, resumable=True
    )
    shuffle_labels: bool = option(
        False,
        help="leakage check: train on randomly permuted training labels; validation metrics should stay at chance",
    )
    max_failures: int = option(
        0,
        metavar="K",
        help="restart crashed workers up to K times from the latest epoch's checkpoint",
        check=non_negative_int,
        resumable=True,
    )
    target_sensitivity: float | None = option(
        None,
        metavar="S",
        check=fraction,
        resumable=True,
        help="decision threshold: the highest whose study-level validation sensitivity is >= S (for triage); "
        "default: the one that maximises study-level kappa",
    )
    placement_strategy: str = option(
        "PACK",
        choices=("PACK", "SPREAD", "STRICT_SPREAD"),
        resumable=True,
        help="where Ray places the workers: PACK fills a node first, STRICT_SPREAD one per node",
    )


def engine_option(name: str) -> Any:
    """``--backend`` or ``--precision``, the same in every verb that scores."""
    if name == "backend":
        return option(
            "auto",
            help="inference engine: the fastest that passes the accuracy guard on this node (auto), or one by name",
            choices=("auto", "torch", "openvino", "onnxruntime"),
        )
    return option(
        "auto",
        help="bf16 where the CPU (AVX512-BF16, AMX) or GPU computes it natively (auto), or fp32|bf16",
        choices=("auto", "fp32", "bf16"),
    )


@dataclass
class EvalConfig(_Config):
    model: str = option(help="checkpoint folder (RUN_DIR/model) or a training RUN_DIR", metavar="MODEL", path=True)
    data: str = option(help="archive root with labels (MURA CSVs or folder names)", metavar="ROOT", path=True)
    out: str = option(help="folder for the report, predictions and plots", metavar="DIR", path=True)
    split: str = option("valid", help="split to evaluate", choices=("train", "valid"))
    threshold: float | None = option(None, help="decision threshold (default: the checkpoint's)", check=fraction)
    batch_size: int = option(64, help="images per model call", check=positive_int)
    resamples: int = option(1000, help="bootstrap resamples for the 95%% intervals", check=positive_int)
    seed: int = option(0, help="random seed of the bootstrap", check=non_negative_int)
    backend: str = engine_option("backend")
    precision: str = engine_option("precision")


@dataclass
class ScoreConfig(_Config):
    model: str = option(help="checkpoint folder (RUN_DIR/model) or a training RUN_DIR", metavar="MODEL", path=True)
    data: str = option(help="archive root: MURA layout or any tree of PNG/JPEG/DICOM files", metavar="ROOT", path=True)
    out: str = option(help="output root: images/, studies/ and the run manifests go here", metavar="DIR", path=True)
    split: str | None = option(None, help="score only this split (default: every image)", choices=("train", "valid"))
    full: bool = option(False, help="rescore every image, not only new and changed ones")
    max_error_rate: float = option(
        0.01, metavar="F", check=fraction, help="exit 3 when more than this fraction of the scored images fail"
    )
    batch_size: int = option(64, help="images per model call", check=positive_int)
    actors: int | None = option(
        None, help="model actors (default: one per GPU, or sized from the CPUs)", check=positive_int
    )
    cpus_per_actor: float | None = option(None, help="CPUs each model actor reserves", check=positive_float, cli=False)
    use_gpu: bool | None = option(None, help="use GPUs (default: when the cluster has any)", cli=False)
    run_id: str | None = option(
        None, help="name of this run, unused in OUT (default: UTC time and a random suffix)", check=run_name
    )
    commit_every: int = option(
        10_000,
        metavar="N",
        check=positive_int,
        help="commit every N scored images (and at the end): a run stopped after K chunks keeps them, "
        "and the next run goes on from there",
    )
    modalities: str = option(
        "CR,DX,RG",
        metavar="LIST",
        check=modality_list,
        help="DICOM modalities to score, or 'all' (read from the header); files of others are counted, not scored",
    )
    backend: str = engine_option("backend")
    precision: str = engine_option("precision")


@dataclass
class DemoConfig(_Config):
    out: str = option("demo-out", help="folder for everything the demo writes", metavar="DIR", path=True)
    studies: int = option(400, help="studies in the synthetic archive", check=positive_int)
    epochs: int = option(10, help="maximum epochs", check=positive_int)
    image_size: int = option(64, help="model input side (small, for a laptop CPU)", check=image_size)
    workers: int = option(2, help="DDP workers", check=positive_int)


@dataclass
class BenchScoreConfig(_Config):
    images: int = option(500, help="N, the images per measurement", check=positive_int)
    image_size: int = option(224, help="model input side", check=image_size)
    batch_size: int = option(64, help="images per forward pass", check=positive_int)
    json: str | None = option(None, metavar="FILE", help="also write the figures as JSON", path=True)
    plot: str | None = option(None, metavar="PNG", help="also draw images/s per stage as PNG", path=True)


@dataclass
class BenchGuardConfig(_Config):
    model: str = option(help="checkpoint folder (RUN_DIR/model) or a training RUN_DIR", metavar="MODEL", path=True)
    data: str = option(help="archive root with labels", metavar="ROOT", path=True)
    split: str = option("valid", help="labelled split to compare on", choices=("train", "valid"))
    json: str | None = option(None, metavar="FILE", help="also write the figures as JSON", path=True)


@dataclass
class BenchNightlyConfig(_Config):
    sizes: tuple[int, ...] = option((100_000, 1_000_000), help="archive sizes in files", metavar="N,N", check=int_list)
    nights: tuple[int, ...] = option(
        (1, 100), help="committed nights behind the timed one", metavar="K,K", check=int_list
    )
    new: int = option(1000, help="new images the timed night finds", check=positive_int)
    json: str | None = option(None, metavar="FILE", help="also write the figures as JSON", path=True)


@dataclass
class BenchTrainConfig(_Config):
    studies: int = option(300, help="studies in the synthetic archive", check=positive_int)
    image_size: int = option(128, help="model input side", check=image_size)
    batch_size: int = option(16, help="images per worker per step", check=positive_int)
    json: str | None = option(None, metavar="FILE", help="also write the figures as JSON", path=True)


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One option per CLI field of the dataclass ``cls``: its help, check, choices and default."""
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        flag = "--" + f.name.replace("_", "-")
        required = f.default is dataclasses.MISSING
        help_text = meta["help"]
        if not required and f.default not in (None, False):
            help_text += f" (default {f.default})"
        if f.default is False:
            parser.add_argument(flag, dest=f.name, action="store_true", help=help_text)
            continue
        kwargs: dict[str, Any] = {"dest": f.name, "help": help_text, "required": required}
        if meta.get("check"):
            kwargs["type"] = meta["check"]
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        if not required:
            kwargs["default"] = f.default
        parser.add_argument(flag, **kwargs)


def resumable_fields() -> set[str]:
    """TrainConfig fields that a rerun of the same RUN_DIR may change."""
    return {f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("resumable")}
