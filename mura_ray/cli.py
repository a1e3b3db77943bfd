"""``mura-ray <verb>``: parse arguments, call one function, report.

Exit status: 0 on success, 2 with one line on stderr for bad arguments or
unusable input, 1 for anything unexpected (with its traceback).
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
                         "(validation F1) is kept in RUN_DIR/model/ (safetensors + metadata.json), with the "
                         "per-epoch history in RUN_DIR/metrics.{csv,json}.")
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
    p.add_argument("--shuffle-labels", action="store_true",
                   help="leakage check: train on randomly permuted training labels; validation metrics should stay at chance")

    p = verbs.add_parser("score", help="score an archive to Parquet (per image and per study)",
                         description="Score every image under ROOT with a trained model and write Parquet under OUT: "
                         "images/ (one row per file, undecodable files with error set) and studies/ "
                         "(one row per study), partitioned by run_date, visible only once the run completes.")
    p.add_argument("--model", required=True, metavar="CKPT", help="checkpoint directory (RUN_DIR/model) or a training RUN_DIR")
    p.add_argument("--input", required=True, metavar="ROOT", help="archive root: MURA layout or any tree of PNG/JPEG files")
    p.add_argument("--output", required=True, metavar="OUT", help="output root (path or s3://)")
    p.add_argument("--split", default=None, help="score only this split (train, valid)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="images per model call (default 64)")
    p.add_argument("--actors", type=_positive_int, default=None, help="model actors (default: one per GPU, or sized from the CPUs)")

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

    p = verbs.add_parser("demo", help="sample -> train (2 workers) -> score, on this machine",
                         description="Write a synthetic archive, train with 2 DDP workers on CPU, score the "
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
        )
        result = run_training(cfg)
        m = result["metrics"]
        print(
            f"best epoch {m['epoch']}: val_f1 {m['val_f1']:.3f}  val_auroc {m['val_auroc']:.3f}  "
            f"study_kappa {m['val_study_kappa']:.3f}; model in {result['model_dir']} "
            f"({result['wall_seconds']:.0f}s)"
        )
        return 0
    if args.verb == "score":
        from mura_ray.config import ScoreConfig
        from mura_ray.score import run_scoring

        cfg = ScoreConfig(model=args.model, input=args.input, output=args.output, split=args.split,
                          batch_size=args.batch_size, actors=args.actors)
        m = run_scoring(cfg)
        print(
            f"scored {m['images']} images ({m['errors']} errors) in {m['studies']} studies, "
            f"{m['images_per_second']:.1f} images/s; run {m['run_id']} in {m['output']}"
        )
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
