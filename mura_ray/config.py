"""Every job's settings, in one place: one dataclass per job.

Each field carries its command-line help, its check and whether it is a path
(resolved once, in the driver, to an absolute path or an ``s3://`` URI). The
CLI is built from these fields, so a default or a help text is written once.
A config is saved next to the job's outputs and crosses the Ray boundary as a
plain dict.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from mura_ray.archive.catalog import FOLLOW_LINKS, SPLITS
from mura_ray.archive.sample import KINDS
from mura_ray.checks import (
    fraction,
    image_size,
    int_list,
    modality_list,
    non_negative_float,
    non_negative_int,
    open_fraction,
    positive_float,
    positive_int,
    run_name,
)
from mura_ray.imaging.preprocess import FITS
from mura_ray.model.calibration import METHODS as CALIBRATIONS
from mura_ray.options import (
    ConfigBase,
    add_options,
    engine_option,
    gpu_timeout_option,
    gpus_option,
    option,
    tta_option,
    use_gpu_option,
)
from mura_ray.recipes import RECIPES, SELECT_ON

__all__ = ["add_options", "option"]


def follow_links_option() -> Any:
    """``--follow-links``, the same in every verb that lists an archive."""
    return option(
        "inside",
        choices=FOLLOW_LINKS,
        help="symbolic links to files in a local archive: inside = follow those whose target (every link on the "
        "way resolved) is inside the archive root, skip and count the others; all = follow every one; none = "
        "follow none. Links to folders are never followed",
    )


@dataclass
class SampleConfig(ConfigBase):
    out: str = option(help="folder or s3:// prefix to write MURA-v1.1/ into", metavar="DIR", path=True)
    studies: int = option(400, help="number of studies (about 2.6 images each)", check=positive_int)
    seed: int = option(0, help="random seed; the same seed writes the same bytes", check=non_negative_int)
    kind: str = option(
        "demo",
        choices=KINDS,
        help="demo = fractures near the image centre, sizes and orientations drawn freely; hard = each body "
        "part's own shape (tall forearms and humeri, wide hands), fractures anywhere along the bone, ends "
        "included, and subtler: what a centre crop misses",
    )


@dataclass
class TrainConfig(ConfigBase):
    data: str = option(help="archive root with train and valid splits (MURA layout)", metavar="ROOT", path=True)
    out: str = option(
        help="run directory: the model, history, curves and checkpoints go here", metavar="RUN_DIR", path=True
    )
    follow_links: str = follow_links_option()
    recipe: str = option(
        "default",
        choices=tuple(RECIPES),
        help="what the options left unset get: default = 224 px, pad, batch 32, Adam 1e-3, 10 epochs, rotation "
        "15, the kept epoch by tuning F1, layer3,layer4,fc trained from pretrained weights; mura = the MURA "
        "paper's: 320 px, stretch, batch 8, Adam 1e-4 x sqrt(workers x batch / 8), 30 epochs, rotation 30, the "
        "kept epoch by tuning study kappa, every layer trained",
    )
    workers: int = option(2, help="DDP workers", check=positive_int)
    epochs: int | None = option(
        None, help="maximum epochs (default: the recipe's, 10 or 30)", check=positive_int, resumable=True
    )
    image_size: int | None = option(
        None, help="model input side in pixels (default: the recipe's, 224 or 320)", check=image_size
    )
    fit: str | None = option(
        None,
        choices=FITS,
        help="how an image becomes the square input: pad = scale the long side to it and letterbox (the whole "
        "image, aspect kept), stretch = resize the whole image (as the MURA paper), crop = scale the short side "
        "and cut the centre (loses the ends of long bones); recorded in the model, which scoring follows "
        "(default: the recipe's, pad or stretch)",
    )
    batch_size: int | None = option(
        None, help="images per worker per step (default: the recipe's, 32 or 8)", check=positive_int
    )
    lr: float | None = option(None, help="Adam learning rate (default: the recipe's)", check=positive_float)
    weight_decay: float = option(0.0, help="Adam's L2 weight decay", check=non_negative_float)
    rotation: float | None = option(
        None,
        help="augmentation: random rotation up to this many degrees (default: the recipe's, 15 or 30)",
        check=non_negative_float,
    )
    select_on: str | None = option(
        None,
        choices=SELECT_ON,
        help="the tuning-split metric that early stopping and the kept epoch follow (default: the recipe's, f1 "
        "or study_kappa)",
    )
    weights: str = option(
        "imagenet",
        metavar="imagenet|PATH|none",
        help="starting weights: torchvision's ImageNet download, a safetensors state dict (path or s3://), or none",
    )
    trainable: str = option(
        "auto",
        metavar="BLOCKS",
        help="blocks to train: a comma list of conv1,bn1,layer1..layer4,fc, or all; "
        "auto = layer3,layer4,fc from pretrained weights (all under --recipe mura), all with --weights none",
    )
    tune_fraction: float = option(
        0.1,
        metavar="F",
        check=fraction,
        help="training patients set aside (stratified by body part) to choose the epoch, temperature and "
        "threshold, so that the validation split only reports; 0: the validation split chooses",
    )
    calibration: str = option(
        "platt",
        choices=CALIBRATIONS,
        help="how the probabilities are calibrated on the tuning split: platt = sigmoid(z / T + b), whose "
        "offset b also takes back the shift of the logit that the class weights cause; temperature = "
        "sigmoid(z / T)",
        resumable=True,
    )
    patience: int = option(
        3, help="early stopping: epochs without a better tuning-split F1", check=positive_int, resumable=True
    )
    lr_patience: int = option(
        1, help="ReduceLROnPlateau: epochs without a lower tuning-split loss", check=non_negative_int
    )
    lr_factor: float = option(0.3, help="ReduceLROnPlateau: factor applied to the learning rate", check=open_fraction)
    seed: int = option(
        0, help="random seed of the weights' start, the batches and the augmentation", check=non_negative_int
    )
    split_seed: int = option(
        0,
        help="random seed of the tuning split's draw of patients: runs that differ only in --seed share their "
        "tuning split, as the members of an ensemble must",
        check=non_negative_int,
    )
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
    use_gpu: str = use_gpu_option(resumable=True)
    gpus_per_worker: float = gpus_option("worker", resumable=True)
    gpu_timeout: float = gpu_timeout_option(resumable=True)
    cpus_per_worker: float | None = option(
        None, help="CPUs each worker reserves (default: sized from the cluster)", check=positive_float, resumable=True
    )
    frozen_norms: bool = option(
        True,
        cli=False,
        help="batch norms of frozen blocks keep their running statistics (False: they follow the batches, as "
        "model.train() has them; for `bench recipe`'s comparison)",
    )
    shuffle_labels: bool = option(
        False,
        help="leakage check: train and tune on randomly permuted labels (the tuning split's too, since it "
        "chooses); validation metrics should stay at chance",
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
        help="decision threshold: the highest whose study-level tuning-split sensitivity is >= S (for triage); "
        "default: the one that maximises study-level kappa",
    )
    mlflow: str | None = option(
        None,
        metavar="URI",
        resumable=True,
        help="log the run to MLflow at URI (default: MLFLOW_TRACKING_URI when set; needs mura-ray[mlflow]): "
        "configuration, metrics by epoch, the model folder, curves and the validation report",
    )
    register: str | None = option(
        None, metavar="NAME", resumable=True, help="with MLflow: register the kept model under NAME (tagged model_id)"
    )
    keep_predictions: bool = option(
        False,
        resumable=True,
        help="keep image paths and patient ids in the model folder's tune and validation predictions (and log "
        "tune_patients.txt to MLflow); by default the model folder, which MLflow and every registry cache "
        "copy, names images, studies and patients by opaque keys, and only RUN_DIR keeps the paths",
    )
    placement_strategy: str = option(
        "PACK",
        choices=("PACK", "SPREAD", "STRICT_SPREAD"),
        resumable=True,
        help="where Ray places the workers: PACK fills a node first, STRICT_SPREAD one per node",
    )


@dataclass
class EvalConfig(ConfigBase):
    model: str = option(help="checkpoint folder (RUN_DIR/model) or a training RUN_DIR", metavar="MODEL", path=True)
    data: str = option(help="archive root with labels (MURA CSVs or folder names)", metavar="ROOT", path=True)
    out: str = option(help="folder for the report, predictions and plots", metavar="DIR", path=True)
    follow_links: str = follow_links_option()
    split: str = option(
        "valid", help="split to evaluate (a warning says when it helped choose the model)", choices=SPLITS
    )
    threshold: float | None = option(None, help="decision threshold (default: the checkpoint's)", check=fraction)
    batch_size: int | None = option(
        None, help="images per model call (default: 64 on CPUs, 256 on GPUs)", check=positive_int
    )
    resamples: int = option(1000, help="bootstrap resamples for the 95%% intervals", check=positive_int)
    seed: int = option(0, help="random seed of the bootstrap", check=non_negative_int)
    backend: str = engine_option("backend")
    precision: str = engine_option("precision")
    tta: str = tta_option()
    use_gpu: str = use_gpu_option()
    gpus_per_actor: float = gpus_option("actor")
    gpu_timeout: float = gpu_timeout_option()


@dataclass
class ScoreConfig(ConfigBase):
    model: str = option(
        help="checkpoint folder (RUN_DIR/model), a training RUN_DIR, or models:/NAME/VERSION|models:/NAME@ALIAS "
        "from the MLflow registry at MLFLOW_TRACKING_URI",
        metavar="MODEL",
        path=True,
    )
    data: str = option(help="archive root: MURA layout or any tree of PNG/JPEG/DICOM files", metavar="ROOT", path=True)
    out: str = option(help="output root: the scores table (OUT/scores) and heatmaps go here", metavar="DIR", path=True)
    split: str | None = option(None, help="score only this split (default: every image)", choices=SPLITS)
    follow_links: str = follow_links_option()
    full: bool = option(False, help="rescore every image, not only new and changed ones")
    vacuum: bool = option(
        False,
        help="after the run, delete the table's files replaced more than 7 days ago, files of killed runs and "
        "orphan heatmaps, as 'mura-ray scores vacuum' does (the nightly CronJob sets it)",
    )
    max_error_rate: float = option(
        0.01, metavar="F", check=fraction, help="exit 3 when more than this fraction of the scored images fail"
    )
    batch_size: int | None = option(
        None, help="images per model call (default: 64 on CPUs, 256 on GPUs)", check=positive_int
    )
    actors: int | None = option(
        None,
        help="model actors (default on GPUs: a pool that starts with the GPUs up now and grows with the GPUs the "
        "autoscaler adds; on CPUs: sized from the CPUs)",
        check=positive_int,
    )
    cpus_per_actor: float | None = option(None, help="CPUs each model actor reserves", check=positive_float, cli=False)
    use_gpu: str = use_gpu_option()
    gpus_per_actor: float = gpus_option("actor")
    gpu_timeout: float = gpu_timeout_option()
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
    tta: str = tta_option()
    heatmaps: str = option(
        "off",
        choices=("off", "flagged"),
        help="flagged: also write a Grad-CAM overlay PNG for each image this run scores in a study predicted "
        "abnormal, under OUT/heatmaps/, committed with the run",
    )
    pseudonymize: str | None = option(
        None,
        metavar="KEY_FILE",
        path=True,
        help="replace image and study paths and patient ids in rows, logs and heatmap names by keyed pseudonyms "
        "(HMAC-SHA256 under the key in KEY_FILE, at least 32 bytes, e.g. from openssl rand -hex 32): the same key "
        "gives the same pseudonyms every night, and an OUT holds one key's rows (default: "
        "MURA_RAY_PSEUDONYM_KEY_FILE when set)",
    )
    pseudonym_map: str | None = option(
        None,
        metavar="FILE",
        path=True,
        help="with --pseudonymize: also write each pseudonym and the path or id it stands for to FILE (CSV), "
        "for those allowed to re-identify; keep it outside OUT (default: written nowhere)",
    )


@dataclass
class ExplainConfig(ConfigBase):
    model: str = option(help="checkpoint folder (RUN_DIR/model) or a training RUN_DIR", metavar="MODEL", path=True)
    data: str = option(help="archive root: MURA layout or any tree of PNG/JPEG/DICOM files", metavar="ROOT", path=True)
    out: str = option(help="folder for the overlay PNGs and their index.parquet", metavar="DIR", path=True)
    studies: str = option(
        "flagged",
        metavar="flagged|all|LIST",
        help="which studies: those predicted abnormal, all, or a comma list of study folders (relative to ROOT "
        "or full URIs)",
    )
    split: str | None = option(None, help="only this split (default: every image)", choices=SPLITS)
    follow_links: str = follow_links_option()
    layer: str = option(
        "layer3", help="ResNet18 block whose activations Grad-CAM weighs", choices=("layer2", "layer3", "layer4")
    )
    batch_size: int = option(16, help="images per Grad-CAM call", check=positive_int)
    use_gpu: str = use_gpu_option()
    gpus_per_actor: float = gpus_option("actor")
    gpu_timeout: float = gpu_timeout_option()


@dataclass
class MonitorConfig(ConfigBase):
    scores: str = option(help="a scoring output (score --out): its runs' rows are read", metavar="DIR", path=True)
    model: str | None = option(
        None,
        metavar="MODEL",
        path=True,
        help="compare each night with this model's validation predictions (default: with the first night)",
    )
    out: str | None = option(
        None, metavar="DIR", path=True, help="where monitor.md, monitor.json, monitor.png go (default: SCORES/monitor)"
    )
    psi_alert: float = option(
        0.2, metavar="X", check=positive_float, help="exit 4 when the latest night's PSI is over X"
    )
    max_error_rate: float = option(
        0.01, metavar="F", check=fraction, help="exit 4 when the latest night's error rate is over F"
    )


@dataclass
class EnsembleConfig(ConfigBase):
    models: list[str] = option(
        help="the members: model folders, run directories holding model/, or models:/ registry URIs, trained "
        "with the same tuning split and preprocessing (fit)",
        metavar="MODEL",
        path=True,
        many=True,
    )
    out: str = option(
        help="run directory: the ensemble's model folder goes to RUN_DIR/model", metavar="RUN_DIR", path=True
    )
    calibration: str = option(
        "platt", choices=CALIBRATIONS, help="how the mean probability is calibrated on the tuning split"
    )
    target_sensitivity: float | None = option(
        None,
        metavar="S",
        check=fraction,
        help="decision threshold: the highest whose study-level tuning-split sensitivity is >= S; default: the "
        "one that maximises study-level kappa",
    )
    seed: int = option(0, help="random seed of the bootstrap intervals", check=non_negative_int)


@dataclass
class TuneSearchConfig(TrainConfig):
    out: str = option(
        help="search directory: the trials' run directories (trials/), Ray Tune's experiment (search/), the "
        "ensemble (ensemble/model), tune.md and tune.json",
        metavar="OUT",
        path=True,
    )
    trials: int = option(4, help="trials of the search (each a training run under OUT/trials/)", check=positive_int)
    keep: int = option(
        3, help="the best trials (tuning split) that make the ensemble in OUT/ensemble", check=positive_int
    )
    lr_range: str | None = option(
        None,
        metavar="LOW,HIGH",
        help="learning rates searched, log-uniform (default: the recipe's / 3 to x 3; --lr fixes it)",
    )
    weight_decays: str = option("0,1e-5,1e-4", metavar="LIST", help="weight decays searched (comma list)")
    image_sizes: str | None = option(
        None, metavar="LIST", help="input sides searched, e.g. 224,320 (default: the recipe's; --image-size fixes it)"
    )
    max_concurrent: int | None = option(
        None,
        metavar="N",
        help="trials at once (default: as many as the cluster's GPUs hold, autoscaled ones included; 1 on CPUs)",
        check=positive_int,
    )


@dataclass
class DemoConfig(ConfigBase):
    out: str = option("demo-out", help="folder for everything the demo writes", metavar="DIR", path=True)
    studies: int = option(400, help="studies in the synthetic archive", check=positive_int)
    epochs: int = option(10, help="maximum epochs", check=positive_int)
    image_size: int = option(64, help="model input side (small, for a laptop CPU)", check=image_size)
    workers: int = option(2, help="DDP workers", check=positive_int)


@dataclass
class BenchScoreConfig(ConfigBase):
    images: int = option(500, help="N, the images per measurement", check=positive_int)
    image_size: int = option(224, help="model input side", check=image_size)
    batch_size: int = option(64, help="images per forward pass", check=positive_int)
    json: str | None = option(None, metavar="FILE", help="also write the figures as JSON", path=True)
    plot: str | None = option(None, metavar="PNG", help="also draw images/s per stage as PNG", path=True)


@dataclass
class BenchGuardConfig(ConfigBase):
    model: str = option(help="checkpoint folder (RUN_DIR/model) or a training RUN_DIR", metavar="MODEL", path=True)
    data: str = option(help="archive root with labels", metavar="ROOT", path=True)
    split: str = option("valid", help="labelled split to compare on", choices=("train", "valid"))
    json: str | None = option(None, metavar="FILE", help="also write the figures as JSON", path=True)


@dataclass
class BenchRecipeConfig(ConfigBase):
    out: str = option(help="folder for the hard sample, the runs and the ensemble", metavar="DIR", path=True)
    studies: int = option(400, help="studies in the hard synthetic archive", check=positive_int)
    image_size: int = option(112, help="model input side", check=image_size)
    epochs: int = option(6, help="maximum epochs per run", check=positive_int)
    json: str | None = option(None, metavar="FILE", help="also write the figures as JSON", path=True)


@dataclass
class ScoresHistoryConfig(ConfigBase):
    out: str = option(help="a scoring output (score --out)", metavar="DIR", path=True)
    limit: int = option(20, help="show the last N commits", metavar="N", check=positive_int)


@dataclass
class ScoresRetractConfig(ConfigBase):
    out: str = option(help="a scoring output (score --out)", metavar="DIR", path=True)
    run: str = option(help="the run id whose rows go (see: mura-ray scores history)", metavar="RUN_ID")


@dataclass
class ScoresVacuumConfig(ConfigBase):
    out: str = option(help="a scoring output (score --out)", metavar="DIR", path=True)
    retention_hours: int = option(
        168,
        metavar="H",
        check=positive_int,
        help="keep files replaced or retracted less than H hours ago (time travel reaches that far back), "
        "and any written that recently (a run still at work); at least 168 (7 days)",
    )
    dry_run: bool = option(False, help="list what would be deleted, delete nothing")


@dataclass
class BenchNightlyConfig(ConfigBase):
    sizes: tuple[int, ...] = option((100_000, 1_000_000), help="archive sizes in files", metavar="N,N", check=int_list)
    nights: tuple[int, ...] = option(
        (1, 100), help="committed nights behind the timed one", metavar="K,K", check=int_list
    )
    new: int = option(1000, help="new images the timed night finds", check=positive_int)
    repeats: int = option(
        3, help="nights timed per size and history, the histories in turn; the table shows medians", check=positive_int
    )
    json: str | None = option(None, metavar="FILE", help="also write the figures as JSON", path=True)


@dataclass
class BenchTrainConfig(ConfigBase):
    studies: int = option(300, help="studies in the synthetic archive", check=positive_int)
    image_size: int = option(128, help="model input side", check=image_size)
    batch_size: int = option(16, help="images per worker per step", check=positive_int)
    json: str | None = option(None, metavar="FILE", help="also write the figures as JSON", path=True)


def resumable_fields() -> set[str]:
    """TrainConfig fields that a rerun of the same RUN_DIR may change."""
    return {f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("resumable")}
