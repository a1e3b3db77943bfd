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
    plan = write_sample(cfg.out, studies=cfg.studies, seed=cfg.seed)
    print(f"wrote {len(plan)} images in {len({i.study_rel for i in plan})} studies to {cfg.out}/MURA-v1.1")
    return 0


def train(args: argparse.Namespace) -> int:
    """fine-tune ResNet18 with DDP on Ray Train

    Fine-tune ResNet18 (normal/abnormal) with DDP on N Ray Train workers: GPUs when the cluster has
    one per worker, CPUs otherwise. The best epoch (validation F1) is kept in RUN_DIR/model/
    (safetensors, metadata.json with the decision threshold, model_card.md), with the per-epoch
    history in RUN_DIR/metrics.{csv,json} and RUN_DIR/training_curves.png. Every epoch is
    checkpointed: the same command with the same RUN_DIR resumes after the last completed epoch.
    """
    from mura_ray.reporting.metrics import fmt_ci
    from mura_ray.training.driver import run_training

    result = run_training(config_from(C.TrainConfig, args))
    m, v = result["metrics"], result["validation"]["study"]
    print(
        f"best epoch {m['epoch']}: val F1 {m['val_f1']:.3f}, AUROC {m['val_auroc']:.3f}; threshold "
        f"{result['threshold']:.3f}: study kappa {v['kappa']:.3f} {fmt_ci(v['kappa_ci'])}, "
        f"sensitivity {v['sensitivity']:.3f}, specificity {v['specificity']:.3f}; model in {result['model_dir']} "
        f"({result['wall_seconds']:.0f}s)"
    )
    return 0


def evaluate(args: argparse.Namespace) -> int:
    """MURA metrics with intervals, per body part, and plots

    Score a labelled split with a model and write, under --out: report.json and report.md (image-
    and study-level kappa, F1, precision, sensitivity, specificity, accuracy, AUROC; 95% bootstrap
    intervals; the same per body part), predictions.parquet, and PNGs: confusion matrices, ROC with
    the operating point, kappa per body part, the most confident false positives and negatives.
    """
    from mura_ray.reporting.evaluate import run_evaluation
    from mura_ray.reporting.metrics import fmt, fmt_ci

    cfg = config_from(C.EvalConfig, args)
    r = run_evaluation(cfg)
    for level in ("image", "study"):
        m = r[level]
        print(
            f"{level:5s} n={m['n']}  kappa {fmt(m['kappa'])} {fmt_ci(m['kappa_ci'])}  "
            f"AUROC {fmt(m['auroc'])} {fmt_ci(m['auroc_ci'])}  F1 {fmt(m['f1'])}  "
            f"sensitivity {fmt(m['sensitivity'])}  specificity {fmt(m['specificity'])}"
        )
    engines = ", ".join(f"{k} ({n} images)" for k, n in r["engines"].items())
    print(f"threshold {r['threshold']:.3f}; scored by {engines}; report in {cfg.out}/report.md")
    return 0


def score(args: argparse.Namespace) -> int:
    """score an archive to Parquet, incrementally (per image and per study)

    Score the images under --data with a model and write Parquet under --out.

    Run it every night: by default only images that no committed run of this
    model has scored with the same size and ETag (object storage) or mtime,
    ctime and inode (local disk) are scored (--full rescores all). A run
    commits every --commit-every images and at its end: committed chunks stay
    if the run is stopped, and the next run scores only the rest, so a
    backlog larger than one night is worked off over several nights. One run
    writes to an output at a time; a second one exits 2 naming the first.

      OUT/images/run_date=D/*.parquet   one row per image file; undecodable
                                        files have error set and a null score
      OUT/studies/run_date=D/*.parquet  one row per study touched by a chunk,
                                        covering all its images so far
      OUT/_runs/<run_id>.<chunk>.json   one manifest per committed chunk

    DICOM files of other modalities than --modalities (CT, MR, ...), files
    the MURA CSVs list that are missing, and links that lead nowhere are
    counted, not scored, and are not errors.

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
    for line in _not_scored_lines(m):
        print(line)
    if m["images"] and m["errors"] / m["images"] > cfg.max_error_rate:
        print(
            f"mura-ray: {m['errors']} of {m['images']} images could not be scored "
            f"({m['errors'] / m['images']:.1%}, over --max-error-rate {cfg.max_error_rate:.1%}); "
            f"the run is committed, see the error column",
            file=sys.stderr,
        )
        return 3
    return 0


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
    """benchmarks: scoring and training throughput

        Throughput benchmarks on synthetic images of MURA-like size. 'score' measures the model alone,
        decoding alone, the machine's limit, the notebook's DataLoader way and the mura-ray pipeline
        side by side; 'train' measures the data pipeline's first and later epochs and training with 1
        and 2 workers; 'nightly' times a night that finds new images in a large archive with 1 and 100
        committed nights behind it; 'guard' compares every inference engine installed here with torch
    fp32 on a model and a labelled split (the accuracy guard). Each prints the CPU's model and flags beside its figures.
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
    elif args.bench == "nightly":
        cfg = config_from(C.BenchNightlyConfig, args)
        result = nightly.bench_nightly(cfg.sizes, cfg.nights, cfg.new)
        print(nightly.nightly_table(result))
    else:
        cfg = config_from(C.BenchTrainConfig, args)
        result = training.bench_train(studies=cfg.studies, image_size=cfg.image_size, batch_size=cfg.batch_size)
        print(training.train_table(result))
    if cfg.json:
        storage.write_text(cfg.json, json.dumps(result, indent=2))
    return 0


def doctor_options(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--check",
        action="append",
        default=[],
        metavar="URI",
        help="a local path or s3://bucket/prefix that must be listable (repeatable)",
    )


def bench_options(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    kinds = p.add_subparsers(dest="bench", required=True, metavar="KIND")
    b = kinds.add_parser("score", help="scoring throughput (a)-(e) and peak memory at N and 4N", parents=[common])
    C.add_options(b, C.BenchScoreConfig)
    b = kinds.add_parser("train", help="data pipeline and training throughput", parents=[common])
    C.add_options(b, C.BenchTrainConfig)
    b = kinds.add_parser(
        "guard", help="each inference engine's accuracy against torch fp32 on a model and split", parents=[common]
    )
    C.add_options(b, C.BenchGuardConfig)
    b = kinds.add_parser("nightly", help="a night's fixed cost at archive scale and history", parents=[common])
    C.add_options(b, C.BenchNightlyConfig)
