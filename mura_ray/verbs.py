"""One function per verb of ``mura-ray``: build the job's config from the arguments, run it, print the result.

Each function's docstring is its ``--help``: the first line the summary,
the rest the description.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from mura_ray import config as C
from mura_ray import hardware
from mura_ray.recipes import SELECTED


def config_from(cls: type, args: argparse.Namespace) -> Any:
    names = {f.name for f in dataclasses.fields(cls) if f.metadata.get("cli", True)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})


def sample(args: argparse.Namespace) -> int:
    """write a synthetic archive in the MURA-v1.1 layout

    Write a deterministic synthetic archive in the MURA-v1.1 layout (images, *_image_paths.csv,
    *_labeled_studies.csv) under --out: MURA's class imbalance, PNGs of varied sizes, and an
    abnormality (a displaced fracture) that a small network can learn.
    """
    from mura_ray.archive.sample import write_sample

    cfg = config_from(C.SampleConfig, args)
    plan = write_sample(cfg.out, studies=cfg.studies, seed=cfg.seed, kind=cfg.kind)
    print(f"wrote {len(plan)} images in {len({i.study_rel for i in plan})} studies to {cfg.out}/MURA-v1.1")
    return 0


def train(args: argparse.Namespace) -> int:
    """fine-tune ResNet18 with DDP on Ray Train

    Fine-tune ResNet18 (normal/abnormal) with DDP on N Ray Train workers, on GPUs or CPUs
    (--use-gpu). --recipe sets what is left unset: default, or mura (the MURA paper's: 320 px, every
    layer, Adam 1e-4 scaled with the global batch, rotations up to 30 degrees, 30 epochs). A tuning
    split (--tune-fraction of the training patients, by body part) chooses the epoch (--select-on),
    the calibration of the probabilities (--calibration) and the decision threshold; the validation
    split only reports, with patient-level intervals. The model goes to RUN_DIR/model/
    (safetensors, metadata.json, model_card.md, reliability.png), the per-epoch history to
    RUN_DIR/metrics.{csv,json} and RUN_DIR/training_curves.png. Every epoch is checkpointed: the
    same command with the same RUN_DIR resumes after the last completed epoch.
    """
    from mura_ray.reporting.calibration import calibration_line
    from mura_ray.reporting.metrics import fmt_ci
    from mura_ray.training.driver import run_training

    cfg = config_from(C.TrainConfig, args)
    result = run_training(cfg)
    m, v = result["metrics"], result["validation"]["study"]
    chosen = cfg.select_on
    print(
        f"kept epoch {m['epoch']} (tuning {SELECTED[chosen]} {m[f'tune_{chosen}']:.3f}); "
        f"threshold {result['threshold']:.3f}; "
        f"validation study kappa {v['kappa']:.3f} {fmt_ci(v['kappa_ci'])}, AUROC {v['auroc']:.3f} "
        f"{fmt_ci(v['auroc_ci'])}, sensitivity {v['sensitivity']:.3f}, specificity {v['specificity']:.3f}; "
        f"{calibration_line(result['calibration'])}; model in {result['model_dir']} ({result['wall_seconds']:.0f}s)"
    )
    if result["mlflow"]:
        t = result["mlflow"]
        registered = f"; registered as {args.register} version {t['registered']}" if t["registered"] else ""
        print(f"MLflow run {t['run_id']} at {t['tracking_uri']}{registered}")
    return 0


def tune(args: argparse.Namespace) -> int:
    """a hyperparameter search on Ray Tune; its best trials become an ensemble

    Search learning rate, weight decay and input side on Ray Tune: --trials training runs (each the
    same as `train` with these options, under OUT/trials/trial-K, with --seed + K and one tuning
    split for all, from --split-seed), --max-concurrent at once (default: what the cluster's GPUs
    hold). An option given fixes what it sets: --lr, --image-size. Trials are ranked by the kept
    epoch's tuning-split --select-on metric; the best --keep are ensembled into OUT/ensemble/model
    (see `ensemble`). OUT/tune.md and tune.json list every trial. Rerunning the same command
    resumes the search where it stopped.
    """
    from mura_ray.training.search import run_search

    cfg = config_from(C.TuneSearchConfig, args)
    r = run_search(cfg)
    for t in r["trials"]:
        kept = "  (in the ensemble)" if t["member"] in r["kept"] else ""
        print(
            f"trial {t['member']}: tuning {r['select_on']} {t['score']:.3f}  lr {t['lr']:.2e}  weight decay "
            f"{t['weight_decay']:.0e}  {t['image_size']} px  validation study kappa {t['valid_study_kappa']:.3f}{kept}"
        )
    e = r["ensemble"]
    if e:
        lo, hi = e["validation_study_kappa_ci"]
        print(
            f"ensemble {e['model_id'][:12]}: validation study kappa {e['validation_study_kappa']:.3f} "
            f"[{lo:.3f}, {hi:.3f}]; model in {e['model_dir']}"
        )
    print(f"trials in {cfg.out}/tune.md")
    return 0


def ensemble(args: argparse.Namespace) -> int:
    """one model from several trained ones: the mean of their probabilities

    Combine trained models (--models, two or more, trained on the same archive with the same tuning
    split and fit; their input sides may differ) into one model folder under RUN_DIR/model whose
    P(abnormal) is the mean of the members' probabilities, as the MURA paper's ensemble. From the
    members' saved predictions, without Ray or images: the calibration and the threshold are chosen
    on the tuning split and the report with patient-level intervals computed on the validation
    split. score, evaluate, explain and the registry take the folder as any model; its model_id
    covers every member's weights and metadata.json names them.
    """
    from mura_ray.reporting.calibration import calibration_line
    from mura_ray.reporting.metrics import fmt_ci
    from mura_ray.training.ensemble import build_ensemble

    cfg = config_from(C.EnsembleConfig, args)
    r = build_ensemble(cfg)
    for k, m in enumerate(r["members"]):
        kappa = m["validation_study_kappa"]
        alone = f"{kappa:.3f}" if kappa is not None else "n/a"
        print(f"member {k}: {m['model_id'][:12]} ({m['image_size']} px), validation study kappa alone {alone}")
    v = r["validation"]["study"]
    print(
        f"ensemble {r['model_id'][:12]}: threshold {r['threshold']:.3f}; validation study kappa {v['kappa']:.3f} "
        f"{fmt_ci(v['kappa_ci'])}, AUROC {v['auroc']:.3f} {fmt_ci(v['auroc_ci'])}; "
        f"{calibration_line(r['calibration'])}; model in {r['model_dir']}"
    )
    return 0


def evaluate(args: argparse.Namespace) -> int:
    """MURA metrics with intervals, calibration, per body part, and plots

    Score a labelled split with a model and write, under --out: report.json and report.md (image-
    and study-level kappa, F1, precision, sensitivity, specificity, accuracy, AUROC; 95% bootstrap
    intervals over patients; the same per body part; ECE and Brier score before and after the
    model's calibration; which split chose the epoch, calibration and threshold),
    predictions.parquet, and PNGs: confusion matrices, ROC with the operating point, kappa per body
    part, the reliability diagram, the most confident false positives and negatives under their
    Grad-CAM heatmaps. Warns when the split evaluated helped choose the model.
    """
    from mura_ray.reporting.calibration import calibration_line
    from mura_ray.reporting.metrics import fmt, fmt_ci
    from mura_ray.review.evaluate import run_evaluation

    cfg = config_from(C.EvalConfig, args)
    r = run_evaluation(cfg)
    for level in ("image", "study"):
        m = r[level]
        print(
            f"{level:5s} n={m['n']}  kappa {fmt(m['kappa'])} {fmt_ci(m['kappa_ci'])}  "
            f"AUROC {fmt(m['auroc'])} {fmt_ci(m['auroc_ci'])}  F1 {fmt(m['f1'])}  "
            f"sensitivity {fmt(m['sensitivity'])}  specificity {fmt(m['specificity'])}"
        )
    print(f"calibration, study level: {calibration_line(r['calibration'])}")
    if r["protocol"]["warning"]:
        print(f"warning: {r['protocol']['warning']}")
    engines = ", ".join(f"{k} ({n} images)" for k, n in r["engines"].items())
    print(f"threshold {r['threshold']:.3f}; scored by {engines}; report in {cfg.out}/report.md")
    return 0


def score(args: argparse.Namespace) -> int:
    """score an archive into a Delta Lake table, incrementally (per image and per study)

    Score the images under --data with a model and commit the rows to the scores
    table under --out.

    Run it every night: by default only images that no committed run of this
    model (with the same calibration and --tta) has scored with the same size and
    ETag (object storage) or mtime, ctime and inode (local disk) are scored (--full
    rescores all). A run commits every --commit-every images and at its end:
    committed chunks stay if the run is stopped, and the next run scores only the
    rest, so a backlog larger than one night is worked off over several nights.
    A run started again with the same --run-id goes on after its last chunk.

      OUT/scores/   one Delta Lake table (deltalake, Spark, DuckDB, Polars read it),
                    rows by kind: 'image' (one current row per image file and
                    model; undecodable files have error set and a null score),
                    'study' (one current row per study, over all its images),
                    'heatmap', 'not_scored' and 'run'. Each chunk is one commit:
                    readers see it whole or not at all; a rescore replaces the
                    row, the old one stays in the table's history.
      OUT/heatmaps/run_date=YYYY-MM-DD/run_id=<run_id>/  with --heatmaps flagged:
                    a Grad-CAM overlay PNG per image of each study predicted
                    abnormal (drawn once per current image row; a killed run's
                    are drawn by the next run)

    Two runs into one OUT at once are safe: each commit is checked against the
    other's, and one image never gets two current rows. 'mura-ray scores'
    lists, retracts and vacuums runs.

    --pseudonymize KEY_FILE (or MURA_RAY_PSEUDONYM_KEY_FILE) replaces image and
    study paths and patient ids in rows, logs and heatmap names by keyed
    pseudonyms (HMAC-SHA256), the same every night with the same key;
    --pseudonym-map FILE also writes what each stands for, and only there.
    Overlay captions never show a path.

    DICOM files of other modalities than --modalities (CT, MR, ...), files
    the MURA CSVs list that are missing, links that lead nowhere, links that
    --follow-links does not follow (by default those leading out of --data),
    folders that cannot be listed and malformed CSV rows are counted, one
    line each, not scored, and are not errors. A file that changed between
    the listing and its reading is a read error, tried again the next night.

    Exit status: 0; 2 for unusable arguments or input; 3 when more than
    --max-error-rate of the scored images failed (the run is still committed).
    """
    from mura_ray.scoring.run import run_scoring

    cfg = config_from(C.ScoreConfig, args)
    m = run_scoring(cfg)
    print(
        f"scored {m['images']}, skipped {m['skipped']} (already scored), errors {m['errors']}, "
        f"ignored {m['ignored_files']} non-image files; {m['studies']} studies updated; "
        f"{m['images_per_second']:.1f} images/s; run {m['run_id']} in {m['output']}"
    )
    if m["engines"]:
        print("scored by " + ", ".join(f"{k} ({n} images)" for k, n in sorted(m["engines"].items())))
    if cfg.heatmaps == "flagged":
        print(f"{m['heatmaps']} heatmaps of the images in flagged studies, under {m['output']}/heatmaps")
    for line in _not_scored_lines(m):
        print(line)
    if cfg.vacuum:
        from mura_ray.scoring import maintenance

        r = maintenance.vacuum(cfg.out, maintenance.MIN_RETENTION_HOURS)
        print(f"vacuum: {maintenance.vacuum_line(r, maintenance.MIN_RETENTION_HOURS)}")
    if m["images"] and m["errors"] / m["images"] > cfg.max_error_rate:
        print(
            f"mura-ray: {m['errors']} of {m['images']} images could not be scored "
            f"({m['errors'] / m['images']:.1%}, over --max-error-rate {cfg.max_error_rate:.1%}); "
            f"the run is committed, see the error column",
            file=sys.stderr,
        )
        return 3
    return 0


def scores(args: argparse.Namespace) -> int:
    """the scores table: its history, retracting a run, vacuuming old files

    The scores of every run are one Delta Lake table, OUT/scores (score's --help).
    'history' lists its commits, newest first (version, time, run, chunk, what it
    did), and every run with its images, errors and whether it finished.
    'retract' removes every row a run wrote, image, study, heatmap and its own,
    in one commit: readers see the night before it, and the next night scores
    those images again. Its rows stay in the table's history until 'vacuum'.
    'vacuum' deletes the data files that no current row needs and that were
    replaced more than --retention-hours ago (so time travel reaches that far),
    files of commits that never happened (a killed run) older than that, and
    heatmap PNGs under OUT/heatmaps that no current heatmap row names.

    Exit status: 0; 2 for unusable arguments, an output with no scores table,
    or a run id that wrote nothing there.
    """
    from mura_ray.scoring import maintenance

    if args.action == "history":
        cfg = config_from(C.ScoresHistoryConfig, args)
        for line in maintenance.history_lines(cfg.out, cfg.limit):
            print(line)
    elif args.action == "retract":
        cfg = config_from(C.ScoresRetractConfig, args)
        r = maintenance.retract(cfg.out, cfg.run)
        print(
            f"retracted run {cfg.run}: {r['rows']} rows ({r['images']} images) in table version {r['version']}; "
            "the next night scores those images again"
        )
    else:
        cfg = config_from(C.ScoresVacuumConfig, args)
        r = maintenance.vacuum(cfg.out, cfg.retention_hours, dry_run=cfg.dry_run)
        print(f"{maintenance.vacuum_line(r, cfg.retention_hours, dry_run=cfg.dry_run)} under {cfg.out}")
    return 0


def explain(args: argparse.Namespace) -> int:
    """Grad-CAM heatmaps: where the model looked, per image

    Write one overlay PNG per image of the chosen studies under --out (the
    radiograph, the same under its Grad-CAM heatmap for "abnormal", and the
    calibrated score), at --out/<path under --data>.heatmap.png, and
    --out/index.parquet (image, study, PNG path, score, the map's peak).
    --studies flagged (default) scores the archive first and keeps the
    studies predicted abnormal; all takes every study; or name study
    folders, comma-separated. Heatmaps need a backward pass and run on the
    plain model in their own actors.
    """
    from mura_ray.review.explain import run_explain

    cfg = config_from(C.ExplainConfig, args)
    r = run_explain(cfg)
    errors = f", {r['errors']} unreadable" if r["errors"] else ""
    print(f"wrote {r['images']} heatmaps of {r['studies']} studies{errors} to {r['out']} ({r['seconds']:.0f}s)")
    return 0


def monitor(args: argparse.Namespace) -> int:
    """nightly runs side by side: volume, errors, flagged share, score drift (PSI)

    Read the run rows of every finished scoring run under --scores and write, under --out
    (default SCORES/monitor): monitor.md, monitor.json and monitor.png with, per night, the images
    scored, the error rate, images/s, the share predicted abnormal (overall and per body part) and
    the population stability index (PSI) of the night's scores against the model's validation
    predictions (--model) or, without it, the first night.

    Exit status: 0; 4 when the latest night's PSI is over --psi-alert and over what chance gives a
    night of its size (the "chance" column: the PSI an unchanged population exceeds once in 1000
    nights), or its error rate over --max-error-rate (for cron or a Ray Job to alert on); 2 for
    unusable arguments.
    """
    from mura_ray.review.monitor import run_monitor

    r = run_monitor(config_from(C.MonitorConfig, args))
    for n in r["nights"]:
        print(
            f"{n['run_id']:<28} {n['run_date']}  {n['images']:>7} images  errors {n['error_rate']:6.1%}  "
            f"flagged {n['flagged_share']:6.1%}  PSI {n['psi']:.3f} (chance {n['psi_noise']:.3f})"
        )
    for alert in r["alerts"]:
        print(f"mura-ray: alert: {alert}", file=sys.stderr)
    print(f"report in {r['out']}/monitor.md")
    return 4 if r["alerts"] else 0


def _not_scored_lines(m: dict) -> list[str]:
    """What the run found and did not score, one line each, with examples."""
    lines = []
    if m["not_radiographs"] or m["not_radiographs_known"]:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(m["not_radiographs"].items())) or "none new"
        lines.append(
            f"not radiographs (DICOM modality not in --modalities): {counts}; "
            f"{m['not_radiographs_known']} found by earlier runs"
        )
    if m["missing_files"]:
        lines.append(
            f"missing: {m['missing_files']} files listed in the CSVs are not there, e.g. {m['missing_examples'][0]}"
        )
    if m["broken_links"]:
        lines.append(f"broken links: {m['broken_links']} lead nowhere, e.g. {m['broken_link_examples'][0]}")
    return lines


def demo(args: argparse.Namespace) -> int:
    """sample -> train (2 workers) -> evaluate -> score, on this machine

    Write a synthetic archive, train with 2 DDP workers on CPU, evaluate and score the validation
    split, and print the metrics, the wall time of each step and where the outputs are.
    Running it again starts over.
    """
    from mura_ray.demo import render_summary, run_demo

    print(render_summary(run_demo(config_from(C.DemoConfig, args))))
    return 0


def doctor(args: argparse.Namespace) -> int:
    """versions, CPU features, GPUs, the Ray cluster and storage access

    Print what mura-ray runs on: versions of mura-ray, Ray, torch, torchvision and pydicom; the
    CPU and the features that matter for speed (AVX2, AVX512, AVX512-BF16, AMX); the GPUs torch
    sees; the Ray cluster a command would use (RAY_ADDRESS, or a local one) and its resources;
    and, with --check, whether a path or s3:// prefix can be listed with the current credentials.
    Exit 0 when all is usable, 1 with the reason otherwise.
    """
    from mura_ray.doctor import run_doctor

    return run_doctor(checks=args.check)


def bench(args: argparse.Namespace) -> int:
    """benchmarks: scoring and training throughput, and the recipe's choices

    Benchmarks on synthetic images of MURA-like size. 'score' measures the model alone, decoding
    alone, the machine's limit, the notebook's DataLoader way and the mura-ray pipeline side by side;
    'train' measures the data pipeline's first and later epochs and training with 1 and 2 workers;
    'nightly' times a night that finds new images in a large archive with 1 and 100 committed nights
    behind it; 'guard' compares every inference engine installed here with torch fp32 on a model and
    a labelled split (the accuracy guard); 'recipe' trains --fit crop and pad and an ensemble of 3
    pad models on the hard sample and compares them on the validation split. Each prints the CPU's
    model and flags beside its figures.
    """
    from mura_ray.archive import storage
    from mura_ray.bench import nightly, scoring, training

    if args.bench == "score":
        cfg = config_from(C.BenchScoreConfig, args)
        result = scoring.bench_score(cfg.images, image_size=cfg.image_size, batch_size=cfg.batch_size)
        print(scoring.score_table(result))
        if cfg.plot:
            scoring.plot_score(result, cfg.plot)
    elif args.bench == "guard":
        from mura_ray.reporting import guard

        cfg = config_from(C.BenchGuardConfig, args)
        result = guard.check_model(cfg.model, cfg.data, cfg.split)
        print(guard.guard_table(result))
        print(hardware.cpu_line())
    elif args.bench == "recipe":
        from mura_ray.bench import recipe

        cfg = config_from(C.BenchRecipeConfig, args)
        result = recipe.bench_recipe(studies=cfg.studies, image_size=cfg.image_size, epochs=cfg.epochs, out=cfg.out)
        print(recipe.recipe_table(result))
    elif args.bench == "nightly":
        cfg = config_from(C.BenchNightlyConfig, args)
        result = nightly.bench_nightly(cfg.sizes, cfg.nights, cfg.new, repeats=cfg.repeats)
        print(nightly.nightly_table(result))
    else:
        cfg = config_from(C.BenchTrainConfig, args)
        result = training.bench_train(studies=cfg.studies, image_size=cfg.image_size, batch_size=cfg.batch_size)
        print(training.train_table(result))
    if cfg.json:
        storage.write_text(cfg.json, json.dumps(result, indent=2))
    return 0
