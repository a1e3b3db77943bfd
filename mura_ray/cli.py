"""``mura-ray <verb>``: parse arguments, call one function, report.

Exit status: 0 on success, 2 with one line on stderr for bad arguments or
unusable input, 3 when scoring committed but too many images failed, 1 for
anything unexpected (with its traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from mura_ray.errors import UsageError

DESCRIPTION = """Abnormality screening of musculoskeletal radiographs (MURA) on Ray.

Every path takes a local path or an s3://bucket/prefix URI. Commands start a
local Ray cluster unless RAY_ADDRESS names one (as inside a Ray Job)."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _image_size(text: str) -> int:
    value = int(text)
    if value < 32:
        raise argparse.ArgumentTypeError(f"must be >= 32 pixels, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mura-ray", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and the final summary")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("sample", help="write a synthetic archive in the MURA-v1.1 layout",
                         description="Write a deterministic synthetic archive in the MURA-v1.1 layout "
                         "(images, *_image_paths.csv, *_labeled_studies.csv) under OUT.")
    p.add_argument("out", metavar="OUT", help="folder or s3:// prefix to write MURA-v1.1/ into")
    p.add_argument("--studies", type=_positive_int, default=400, help="number of studies (default 400, about 1,060 images)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same bytes (default 0)")

    p = verbs.add_parser("train", help="fine-tune ResNet18 with DDP on Ray Train",
                         description="Fine-tune ResNet18 (normal/abnormal) with DDP on N Ray Train workers. "
                         "Uses GPUs when the cluster has one per worker, CPUs otherwise. The best epoch "
                         "(validation F1) is kept in RUN_DIR/model/ (safetensors, metadata.json with the decision "
                         "threshold, model_card.md), with the per-epoch history in RUN_DIR/metrics.{csv,json} and "
                         "RUN_DIR/training_curves.png. Every epoch is checkpointed: running the same command again "
                         "with the same RUN_DIR resumes after the last completed epoch.")
    p.add_argument("--data", required=True, metavar="ROOT", help="archive root with train and valid splits (MURA layout)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory (path or s3://)")
    p.add_argument("--workers", type=_positive_int, default=2, help="DDP workers (default 2)")
    p.add_argument("--epochs", type=_positive_int, default=10, help="maximum epochs (default 10)")
    p.add_argument("--image-size", type=_image_size, default=224, help="model input side in pixels (default 224)")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="images per worker per step (default 32)")
    p.add_argument("--lr", type=_positive_float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--weights", default="imagenet", metavar="imagenet|PATH|none",
                   help="starting weights: torchvision's ImageNet download, a safetensors state dict "
                   "(path or s3://), or none (default imagenet)")
    p.add_argument("--trainable", default="auto", metavar="BLOCKS",
                   help="blocks to train: a comma list of conv1,bn1,layer1..layer4,fc, or all; "
                   "auto = layer3,layer4,fc from pretrained weights, all with --weights none (default auto)")
    p.add_argument("--patience", type=_positive_int, default=3, help="early stopping: epochs without a better validation F1 (default 3)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--cpus-per-worker", type=_positive_float, default=None, help="CPUs each worker reserves (default: sized from the cluster)")
    p.add_argument("--max-failures", type=int, default=0, metavar="K",
                   help="restart crashed workers up to K times from the latest epoch's checkpoint (default 0)")
    p.add_argument("--target-sensitivity", type=_fraction, default=None, metavar="S",
                   help="decision threshold: the highest whose study-level validation sensitivity is >= S "
                   "(for triage); default: the one that maximises study-level kappa")
    p.add_argument("--placement-strategy", default="PACK", choices=["PACK", "SPREAD", "STRICT_SPREAD"],
                   help="where Ray places the workers: PACK fills a node first, STRICT_SPREAD one per node (default PACK)")
    p.add_argument("--shuffle-labels", action="store_true",
                   help="leakage check: train on randomly permuted training labels; validation metrics should stay at chance")

    p = verbs.add_parser("score", help="score an archive to Parquet, incrementally (per image and per study)",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="""Score the images under ROOT with a trained model and write Parquet under OUT.

Run it every night: by default only images that no completed run of this
model has scored with the same size and ETag/mtime are scored (--full
rescores all). A run's files become visible only when it completes; a run
that died is cleaned up or finished by the next one.

  OUT/images/run_date=D/*.parquet   one row per image file; undecodable
                                    files have error set and a null score
  OUT/studies/run_date=D/*.parquet  one row per study touched by the run,
                                    covering all its images so far
  OUT/_runs/<run_id>.json           one manifest per run

Exit status: 0; 2 for unusable arguments or input; 3 when more than
--max-error-rate of the scored images failed (the run is still committed).""")
    p.add_argument("--model", required=True, metavar="CKPT", help="checkpoint directory (RUN_DIR/model) or a training RUN_DIR")
    p.add_argument("--input", required=True, metavar="ROOT", help="archive root: MURA layout or any tree of PNG/JPEG/DICOM files")
    p.add_argument("--output", required=True, metavar="OUT", help="output root (path or s3://)")
    p.add_argument("--split", default=None, help="score only this split (train, valid)")
    p.add_argument("--full", action="store_true", help="rescore every image, not only new and changed ones")
    p.add_argument("--max-error-rate", type=_fraction, default=0.01, metavar="F",
                   help="exit 3 when more than this fraction of the scored images fail (default 0.01)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="images per model call (default 64)")
    p.add_argument("--actors", type=_positive_int, default=None, help="model actors (default: one per GPU, or sized from the CPUs)")
    p.add_argument("--run-id", default=None, help="name of this run (default: UTC time and a random suffix)")

    p = verbs.add_parser("evaluate", help="MURA metrics with intervals, per body part, and plots",
                         description="Score a labelled split with a checkpoint and write, under OUT: report.json and "
                         "report.md (image- and study-level kappa, F1, precision, sensitivity, specificity, accuracy, "
                         "AUROC; 95%% bootstrap intervals for kappa and AUROC; the same per body part), "
                         "predictions.parquet, and PNGs: confusion matrices, ROC with the operating point, kappa per "
                         "body part, and the most confident false positives and negatives.")
    p.add_argument("--model", required=True, metavar="CKPT", help="checkpoint directory (RUN_DIR/model) or a training RUN_DIR")
    p.add_argument("--data", required=True, metavar="ROOT", help="archive root with labels (MURA CSVs or folder names)")
    p.add_argument("--split", default="valid", help="split to evaluate (default valid)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the report and plots (path or s3://)")
    p.add_argument("--threshold", type=_fraction, default=None, help="decision threshold (default: the checkpoint's)")
    p.add_argument("--resamples", type=_positive_int, default=1000, help="bootstrap resamples (default 1000)")

    p = verbs.add_parser("bench", help="benchmarks: scoring and training throughput",
                         description="Throughput benchmarks on synthetic images of MURA-like size. "
                         "'score' measures the model alone, decoding alone, the machine's limit, the notebook's "
                         "DataLoader way and the mura-ray pipeline side by side; 'train' measures the data "
                         "pipeline's first and later epochs and training with 1 and 2 workers.")
    kinds = p.add_subparsers(dest="bench", required=True, metavar="KIND")
    b = kinds.add_parser("score", help="scoring throughput (a)-(e) and peak memory at N and 4N")
    b.add_argument("--images", type=_positive_int, default=500, help="N, the images per measurement (default 500)")
    b.add_argument("--image-size", type=_image_size, default=224, help="model input side (default 224)")
    b.add_argument("--batch-size", type=_positive_int, default=64, help="images per forward pass (default 64)")
    b.add_argument("--json", default=None, metavar="FILE", help="also write the figures as JSON")
    b.add_argument("--plot", default=None, metavar="PNG", help="also draw images/s per stage as PNG")
    b = kinds.add_parser("train", help="data pipeline and training throughput")
    b.add_argument("--studies", type=_positive_int, default=300, help="studies in the synthetic archive (default 300)")
    b.add_argument("--image-size", type=_image_size, default=128, help="model input side (default 128)")
    b.add_argument("--batch-size", type=_positive_int, default=16, help="images per worker per step (default 16)")
    b.add_argument("--json", default=None, metavar="FILE", help="also write the figures as JSON")

    p = verbs.add_parser("demo", help="sample -> train (2 workers) -> evaluate -> score, on this machine",
                         description="Write a synthetic archive, train with 2 DDP workers on CPU, evaluate and score the "
                         "validation split, and print the metrics, wall time and where the outputs are.")
    p.add_argument("--out", default="demo-out", help="folder for everything the demo writes (default ./demo-out)")
    p.add_argument("--studies", type=_positive_int, default=400, help="studies in the synthetic archive (default 400)")
    p.add_argument("--epochs", type=_positive_int, default=10, help="maximum epochs (default 10)")
    p.add_argument("--image-size", type=_image_size, default=64, help="model input side (default 64, for a laptop CPU)")
    p.add_argument("--workers", type=_positive_int, default=2, help="DDP workers (default 2)")
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.verb == "sample":
        from mura_ray.sample import write_sample

        plan = write_sample(args.out, studies=args.studies, seed=args.seed)
        studies = {i.study_rel for i in plan}
        print(f"wrote {len(plan)} images in {len(studies)} studies to {args.out}/MURA-v1.1")
        return 0
    if args.verb == "train":
        from mura_ray.config import TrainConfig
        from mura_ray.train import run_training

        cfg = TrainConfig(
            data=args.data, out=args.out, workers=args.workers, epochs=args.epochs, image_size=args.image_size,
            batch_size=args.batch_size, lr=args.lr, weights=args.weights, trainable=args.trainable,
            patience=args.patience, seed=args.seed, cpus_per_worker=args.cpus_per_worker, shuffle_labels=args.shuffle_labels,
            max_failures=args.max_failures, target_sensitivity=args.target_sensitivity,
            placement_strategy=args.placement_strategy,
        )
        result = run_training(cfg)
        m, v = result["metrics"], result["validation"]["study"]
        print(
            f"best epoch {m['epoch']}: val_f1 {m['val_f1']:.3f}  val_auroc {m['val_auroc']:.3f}; threshold "
            f"{result['threshold']:.3f}: study kappa {v['kappa']:.3f} [{v['kappa_ci'][0]:.3f}, {v['kappa_ci'][1]:.3f}]  "
            f"sensitivity {v['sensitivity']:.3f}  specificity {v['specificity']:.3f}; model in {result['model_dir']} "
            f"({result['wall_seconds']:.0f}s)"
        )
        return 0
    if args.verb == "score":
        from mura_ray.config import ScoreConfig
        from mura_ray.score import run_scoring

        cfg = ScoreConfig(model=args.model, input=args.input, output=args.output, split=args.split,
                          batch_size=args.batch_size, actors=args.actors, run_id=args.run_id, full=args.full,
                          max_error_rate=args.max_error_rate)
        m = run_scoring(cfg)
        print(
            f"scored {m['images']}, skipped {m['skipped']} (already scored), errors {m['errors']}, "
            f"ignored {m['ignored_files']} non-image files; {m['studies']} studies updated; "
            f"{m['images_per_second']:.1f} images/s; run {m['run_id']} in {m['output']}"
        )
        if m["images"] and m["errors"] / m["images"] > cfg.max_error_rate:
            print(
                f"mura-ray: {m['errors']} of {m['images']} images could not be scored "
                f"({m['errors'] / m['images']:.1%}, over --max-error-rate {cfg.max_error_rate:.1%}); "
                f"the run is committed, see the error column",
                file=sys.stderr,
            )
            return 3
        return 0
    if args.verb == "evaluate":
        from mura_ray.evaluate import EvalConfig, run_evaluation

        r = run_evaluation(EvalConfig(model=args.model, data=args.data, out=args.out, split=args.split,
                                      threshold=args.threshold, resamples=args.resamples))
        for level in ("image", "study"):
            m = r[level]
            print(
                f"{level:5s} n={m['n']}  kappa {m['kappa']:.3f} [{m['kappa_ci'][0]:.3f}, {m['kappa_ci'][1]:.3f}]  "
                f"AUROC {m['auroc']:.3f} [{m['auroc_ci'][0]:.3f}, {m['auroc_ci'][1]:.3f}]  F1 {m['f1']:.3f}  "
                f"sensitivity {m['sensitivity']:.3f}  specificity {m['specificity']:.3f}"
            )
        print(f"threshold {r['threshold']:.3f}; report in {args.out}/report.md")
        return 0
    if args.verb == "bench":
        from mura_ray import bench

        if args.bench == "score":
            result = bench.bench_score(args.images, image_size=args.image_size, batch_size=args.batch_size)
            print(bench.score_table(result))
            if args.plot:
                bench.plot_score(result, args.plot)
        else:
            result = bench.bench_train(studies=args.studies, image_size=args.image_size, batch_size=args.batch_size)
            print(bench.train_table(result))
        if args.json:
            bench.write_json(args.json, result)
        return 0
    if args.verb == "demo":
        from mura_ray.demo import run_demo

        summary = run_demo(args.out, studies=args.studies, epochs=args.epochs, image_size=args.image_size, workers=args.workers)
        print(json.dumps(summary, indent=2))
        return 0
    raise UsageError(f"unknown verb {args.verb!r}")


def _usage_error(exc: BaseException) -> UsageError | None:
    """The UsageError behind ``exc``, also when Ray wrapped it."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UsageError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("mura-ray: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        usage = _usage_error(exc)
        if usage is None:
            raise
        print(f"mura-ray: error: {usage}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
