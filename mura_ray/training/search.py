"""``mura-ray tune``: a hyperparameter search on Ray Tune whose best trials become an ensemble.

The Train V2 pattern: a ``ray.tune.Tuner`` runs ``trial`` once per point of
the search, and each trial is a driver that runs ``run_training`` (which
builds and fits its own ``TorchTrainer``) into its own run directory,
``OUT/trials/trial-K``. Every trial carves the same tuning split
(``--split-seed``) and trains with its own ``--seed`` (the base seed + K), so
the trials are comparable on the tuning split and can be ensembled. What the
search varies, unless the option fixing it is given: the learning rate
(log-uniform over ``--lr-range``), the weight decay (``--weight-decays``) and
the input side (``--image-sizes``). Trials are ranked by the kept epoch's
tuning-split metric (``--select-on``); the best ``--keep`` make the ensemble
in ``OUT/ensemble/model`` (``training.ensemble``). The validation split chose
nothing and only reports. Rerunning the same command resumes: Tune restores
its experiment from ``OUT/search`` and each unfinished trial resumes its run.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from mura_ray import cluster, recipes
from mura_ray.archive import storage
from mura_ray.config import EnsembleConfig, TrainConfig, TuneSearchConfig
from mura_ray.errors import UsageError
from mura_ray.training.ensemble import build_ensemble

log = logging.getLogger(__name__)

SEARCH_DIR = "search"  # Ray Tune's experiment, under OUT
# A trial is a driver: it reserves no CPU (which would leave Ray Data a fraction short of the one its tasks need),
# only a token of memory, since Tune needs a resource to place it by.
TRIAL_RESOURCES = {"cpu": 0, "memory": 2**20}


def _numbers(text: str, what: str, kind: type = float) -> list[Any]:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{what}: expected comma-separated numbers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise UsageError(f"{what}: expected comma-separated non-negative numbers, got {text!r}")
    return values


def search_space(cfg: TuneSearchConfig) -> dict[str, Any]:
    """Ray Tune's param_space: ``member`` (grid 0..trials-1) and what is searched, fixed where an option is given."""
    from ray import tune

    workers, batch = cfg.workers, cfg.batch_size or recipes.RECIPES[cfg.recipe]["batch_size"]
    if cfg.lr is not None:
        lr: Any = cfg.lr
    elif cfg.lr_range:
        bounds = _numbers(cfg.lr_range, "--lr-range")
        low, high = bounds if len(bounds) == 2 else (0, 0)
        if not 0 < low < high:
            raise UsageError(f"--lr-range: expected LOW,HIGH with 0 < LOW < HIGH, got {cfg.lr_range!r}")
        lr = tune.loguniform(low, high)
    else:
        center = recipes.recipe_lr(cfg.recipe, workers, batch)
        lr = tune.loguniform(center / 3, center * 3)
    sizes = _numbers(cfg.image_sizes, "--image-sizes", int) if cfg.image_sizes else None
    size: Any = cfg.image_size or (tune.choice(sizes) if sizes else recipes.RECIPES[cfg.recipe]["image_size"])
    decays = _numbers(cfg.weight_decays, "--weight-decays")
    return {
        "member": tune.grid_search(list(range(cfg.trials))),
        "lr": lr,
        "weight_decay": tune.choice(decays) if len(decays) > 1 else decays[0],
        "image_size": size,
    }


def train_fields(cfg: TuneSearchConfig) -> dict[str, Any]:
    """The search's options that are train's."""
    return {f: getattr(cfg, f) for f in TrainConfig.__dataclass_fields__}


def trial_config(cfg: TuneSearchConfig, point: dict[str, Any]) -> TrainConfig:
    """The TrainConfig of one trial: the search's own options, the point's values, its run directory and seed."""
    fields = train_fields(cfg)
    k = int(point["member"])
    fields.update(
        out=storage.join(cfg.out, "trials", f"trial-{k}"),
        seed=cfg.seed + k,
        lr=float(point["lr"]),
        weight_decay=float(point["weight_decay"]),
        image_size=int(point["image_size"]),
    )
    cfg = TrainConfig(**fields)
    recipes.resolve(cfg)  # what run_training will resolve, known here too (select_on)
    return cfg


@ray.remote(num_cpus=0)
def _train_outside_the_trial(cfg: TrainConfig) -> dict[str, Any]:
    from mura_ray.training.driver import run_training

    return run_training(cfg)


def trial(point: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """One Tune trial: train into the trial's run directory and report the kept epoch's tuning metric.

    Tune runs a trial in its placement group and captures what the trial starts into it: Ray Data's tasks
    would wait forever for the trial's sliver of a CPU. The training runs in a task outside any placement
    group instead, as it would from a driver; its TorchTrainer places its own workers."""
    from ray import tune

    search = TuneSearchConfig(**cfg)
    train_cfg = trial_config(search, point)
    outside = PlacementGroupSchedulingStrategy(placement_group=None)
    result = ray.get(_train_outside_the_trial.options(scheduling_strategy=outside).remote(train_cfg))
    chosen = train_cfg.select_on
    report = {
        "score": float(result["metrics"][f"tune_{chosen}"]),
        "select_on": chosen,
        "model_dir": result["model_dir"],
        "model_id": result["model_id"],
        "epoch": int(result["metrics"]["epoch"]),
        "valid_study_kappa": float(result["validation"]["study"]["kappa"]),
        "wall_seconds": float(result["wall_seconds"]),
    }
    tune.report(report)
    return report


def max_concurrent(cfg: TuneSearchConfig) -> int:
    """Trials at once: ``--max-concurrent``, else as many as the cluster's GPUs hold (autoscaled node types
    included), else 1 (on CPUs, trials would only share the same cores)."""
    if cfg.max_concurrent:
        return cfg.max_concurrent
    if cfg.use_gpu == "no":
        return 1
    reachable = cluster.gpu_supply().reachable
    if not reachable:
        return 1
    return max(1, min(cfg.trials, math.floor(min(reachable, 1e9) / (cfg.workers * cfg.gpus_per_worker))))


def run_search(cfg: TuneSearchConfig) -> dict[str, Any]:
    """Run (or resume) the search; write OUT/tune.json and tune.md; build the ensemble of the best ``--keep``."""
    from ray import tune

    if cfg.keep > cfg.trials:
        raise UsageError(f"--keep {cfg.keep} is more than --trials {cfg.trials}")
    if cfg.tune_fraction <= 0:
        raise UsageError("--tune-fraction must be over 0: the tuning split ranks the trials")
    probe = TrainConfig(**train_fields(cfg))
    recipes.resolve(probe)  # the select_on and batch size every trial will resolve to
    space = search_space(cfg)
    cluster.connect()
    fs, base = storage.filesystem(cfg.out)
    fs.makedirs(base, exist_ok=True)
    experiment = storage.join(cfg.out, SEARCH_DIR)
    trainable = tune.with_resources(tune.with_parameters(trial, cfg=cfg.to_dict()), TRIAL_RESOURCES)
    if tune.Tuner.can_restore(experiment):
        log.info("resuming the search in %s", experiment)
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            # Tune ignores TuneConfig.max_concurrent_trials beside a search algorithm: it is set on the generator.
            tune_config=tune.TuneConfig(
                search_alg=tune.search.BasicVariantGenerator(random_state=cfg.seed, max_concurrent=max_concurrent(cfg))
            ),
            run_config=tune.RunConfig(name=SEARCH_DIR, storage_path=cfg.out, verbose=0),
        )
    grid = tuner.fit()
    failed = [r for r in grid if r.error]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(grid)} trials failed; the first: {failed[0].error}")
    trials = sorted(
        ({**r.metrics, "member": r.config["member"], **_searched(r.config)} for r in grid),
        key=lambda t: (-t["score"], t["member"]),
    )
    kept = trials[: cfg.keep]
    ensemble = None
    if cfg.keep >= 2:
        ensemble = build_ensemble(
            EnsembleConfig(
                models=[t["model_dir"] for t in kept],
                out=storage.join(cfg.out, "ensemble"),
                calibration=cfg.calibration,
                target_sensitivity=cfg.target_sensitivity,
                seed=cfg.seed,
            )
        )
    result = {
        "select_on": probe.select_on,
        "trials": trials,
        "kept": [t["member"] for t in kept],
        "ensemble": None
        if ensemble is None
        else {
            "model_dir": ensemble["model_dir"],
            "model_id": ensemble["model_id"],
            "validation_study_kappa": ensemble["validation"]["study"]["kappa"],
            "validation_study_kappa_ci": ensemble["validation"]["study"]["kappa_ci"],
        },
    }
    storage.write_text(storage.join(cfg.out, "tune.json"), json.dumps(result, indent=2))
    storage.write_text(storage.join(cfg.out, "tune.md"), render_markdown(result))
    return result


def _searched(config: dict[str, Any]) -> dict[str, Any]:
    return {k: config[k] for k in ("lr", "weight_decay", "image_size")}


def render_markdown(r: dict[str, Any]) -> str:
    lines = [
        "# Hyperparameter search",
        "",
        f"Trials ranked by the kept epoch's tuning-split {r['select_on']}; the validation split chose nothing.",
        "",
        f"| trial | tuning {r['select_on']} | lr | weight decay | image size | kept epoch | validation study kappa "
        "| in the ensemble |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for t in r["trials"]:
        lines.append(
            f"| {t['member']} | {t['score']:.3f} | {t['lr']:.2e} | {t['weight_decay']:.0e} | {t['image_size']} | "
            f"{t['epoch']} | {t['valid_study_kappa']:.3f} | {'yes' if t['member'] in r['kept'] else ''} |"
        )
    e = r["ensemble"]
    if e:
        lo, hi = e["validation_study_kappa_ci"]
        lines += [
            "",
            f"Ensemble of trials {', '.join(map(str, r['kept']))}: `{e['model_dir']}` (model {e['model_id'][:12]}), "
            f"validation study kappa {e['validation_study_kappa']:.3f} [{lo:.3f}, {hi:.3f}].",
        ]
    return "\n".join(lines) + "\n"
