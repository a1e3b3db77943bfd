"""``mura-ray <verb>``: parse arguments, call one function, report.

The options of each verb are the fields of its config dataclass
(``mura_ray.config``): defaults, checks and help are written there once.
The same flag means the same thing in every verb: ``--data`` the archive
read, ``--out`` the folder written, ``--model`` the model used.

Exit status: 0 on success, 2 with one line on stderr for bad arguments or
unusable input, 3 when scoring committed but too many images failed, 1 for
anything unexpected (with its traceback), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from mura_ray import config as C
from mura_ray.errors import UsageError

DESCRIPTION = """Abnormality screening of musculoskeletal radiographs (MURA) on Ray.

Every path is a local path (relative to where you run the command), ~, file://
or s3://bucket/prefix. Commands start a local Ray cluster unless RAY_ADDRESS
names one (as inside a Ray Job). mura-ray prints its own progress; Ray's own
output goes to a log file that the command names (--verbose shows it)."""

EXAMPLES = {
    "sample": "mura-ray sample --out archive --studies 100",
    "train": "mura-ray train --data archive --out runs/r1 --weights none --epochs 5 --image-size 64",
    "evaluate": "mura-ray evaluate --model runs/r1/model --data archive --out eval",
    "score": "mura-ray score --model runs/r1/model --data /mnt/xrays --out scores",
    "demo": "mura-ray demo --out demo-out",
    "doctor": "mura-ray doctor --check s3://bucket/archive",
    "bench": "mura-ray bench score --images 500 --json bench.json --plot bench.png",
}
# Flags of earlier releases, still accepted: (verb, old) -> new.
RENAMED = {("score", "--input"): "--data", ("score", "--output"): "--out"}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (and exit 2), not the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"mura-ray: error: {self.prog}: {message} (see {self.prog} --help)\n")


def _version() -> str:
    def v(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return f"mura-ray {v('mura-ray')} (ray {v('ray')}, torch {v('torch')}, torchvision {v('torchvision')})"


def add_config_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One option per CLI field of the dataclass ``cls``."""
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


def _verb(verbs: Any, name: str, common: argparse.ArgumentParser, help: str, description: str) -> argparse.ArgumentParser:
    return verbs.add_parser(
        name, help=help, description=description, parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"example:\n  {EXAMPLES[name]}",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mura-ray", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=_version())
    # -q and -v go before or after the verb; SUPPRESS keeps a verb's parser from resetting the global value.
    common = argparse.ArgumentParser(add_help=False)
    for p in (parser, common):
        default = False if p is parser else argparse.SUPPRESS
        p.add_argument("-q", "--quiet", action="store_true", default=default, help="only warnings, errors and the result")
        p.add_argument("-v", "--verbose", action="store_true", default=default,
                       help="show Ray's own output here too, not only in its log file")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = _verb(verbs, "sample", common, "write a synthetic archive in the MURA-v1.1 layout",
              "Write a deterministic synthetic archive in the MURA-v1.1 layout (images, *_image_paths.csv,\n"
              "*_labeled_studies.csv) under --out: MURA's class imbalance, PNGs of varied sizes, and an\n"
              "abnormality (a displaced fracture) that a small network can learn.")
    add_config_options(p, C.SampleConfig)

    p = _verb(verbs, "train", common, "fine-tune ResNet18 with DDP on Ray Train",
              "Fine-tune ResNet18 (normal/abnormal) with DDP on N Ray Train workers: GPUs when the cluster has\n"
              "one per worker, CPUs otherwise. The best epoch (validation F1) is kept in RUN_DIR/model/\n"
              "(safetensors, metadata.json with the decision threshold, model_card.md), with the per-epoch\n"
              "history in RUN_DIR/metrics.{csv,json} and RUN_DIR/training_curves.png. Every epoch is\n"
              "checkpointed: the same command with the same RUN_DIR resumes after the last completed epoch.")
    add_config_options(p, C.TrainConfig)

    p = _verb(verbs, "evaluate", common, "MURA metrics with intervals, per body part, and plots",
              "Score a labelled split with a model and write, under --out: report.json and report.md (image-\n"
              "and study-level kappa, F1, precision, sensitivity, specificity, accuracy, AUROC; 95% bootstrap\n"
              "intervals; the same per body part), predictions.parquet, and PNGs: confusion matrices, ROC with\n"
              "the operating point, kappa per body part, the most confident false positives and negatives.")
    add_config_options(p, C.EvalConfig)

    p = _verb(verbs, "score", common, "score an archive to Parquet, incrementally (per image and per study)",
              """Score the images under --data with a model and write Parquet under --out.

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
    add_config_options(p, C.ScoreConfig)

    p = _verb(verbs, "demo", common, "sample -> train (2 workers) -> evaluate -> score, on this machine",
              "Write a synthetic archive, train with 2 DDP workers on CPU, evaluate and score the validation\n"
              "split, and print the metrics, the wall time of each step and where the outputs are.\n"
              "Running it again starts over.")
    add_config_options(p, C.DemoConfig)

    p = _verb(verbs, "doctor", common, "versions, CPU features, GPUs, the Ray cluster and storage access",
              "Print what mura-ray runs on: versions of mura-ray, Ray, torch, torchvision and pydicom; the\n"
              "CPU and the features that matter for speed (AVX2, AVX512, AVX512-BF16, AMX); the GPUs torch\n"
              "sees; the Ray cluster a command would use (RAY_ADDRESS, or a local one) and its resources;\n"
              "and, with --check, whether a path or s3:// prefix can be listed with the current credentials.\n"
              "Exit 0 when all is usable, 1 with the reason otherwise.")
    p.add_argument("--check", action="append", default=[], metavar="URI",
                   help="a local path or s3://bucket/prefix that must be listable (repeatable)")

    p = _verb(verbs, "bench", common, "benchmarks: scoring and training throughput",
              "Throughput benchmarks on synthetic images of MURA-like size. 'score' measures the model alone,\n"
              "decoding alone, the machine's limit, the notebook's DataLoader way and the mura-ray pipeline\n"
              "side by side; 'train' measures the data pipeline's first and later epochs and training with 1\n"
              "and 2 workers. Each prints the CPU's model and flags beside its figures.")
    kinds = p.add_subparsers(dest="bench", required=True, metavar="KIND")
    b = kinds.add_parser("score", help="scoring throughput (a)-(e) and peak memory at N and 4N", parents=[common])
    add_config_options(b, C.BenchScoreConfig)
    b = kinds.add_parser("train", help="data pipeline and training throughput", parents=[common])
    add_config_options(b, C.BenchTrainConfig)
    return parser


def _config(cls: type, args: argparse.Namespace) -> Any:
    names = {f.name for f in dataclasses.fields(cls) if f.metadata.get("cli", True)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})


def _sample(args: argparse.Namespace) -> int:
    from mura_ray.sample import write_sample

    cfg = _config(C.SampleConfig, args)
    plan = write_sample(cfg.out, studies=cfg.studies, seed=cfg.seed)
    print(f"wrote {len(plan)} images in {len({i.study_rel for i in plan})} studies to {cfg.out}/MURA-v1.1")
    return 0


def _train(args: argparse.Namespace) -> int:
    from mura_ray.train import run_training

    result = run_training(_config(C.TrainConfig, args))
    m, v = result["metrics"], result["validation"]["study"]
    print(
        f"best epoch {m['epoch']}: val F1 {m['val_f1']:.3f}, AUROC {m['val_auroc']:.3f}; threshold "
        f"{result['threshold']:.3f}: study kappa {v['kappa']:.3f} [{v['kappa_ci'][0]:.3f}, {v['kappa_ci'][1]:.3f}], "
        f"sensitivity {v['sensitivity']:.3f}, specificity {v['specificity']:.3f}; model in {result['model_dir']} "
        f"({result['wall_seconds']:.0f}s)"
    )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from mura_ray.evaluate import run_evaluation

    cfg = _config(C.EvalConfig, args)
    r = run_evaluation(cfg)
    for level in ("image", "study"):
        m = r[level]
        print(
            f"{level:5s} n={m['n']}  kappa {m['kappa']:.3f} [{m['kappa_ci'][0]:.3f}, {m['kappa_ci'][1]:.3f}]  "
            f"AUROC {m['auroc']:.3f} [{m['auroc_ci'][0]:.3f}, {m['auroc_ci'][1]:.3f}]  F1 {m['f1']:.3f}  "
            f"sensitivity {m['sensitivity']:.3f}  specificity {m['specificity']:.3f}"
        )
    print(f"threshold {r['threshold']:.3f}; report in {cfg.out}/report.md")
    return 0


def _score(args: argparse.Namespace) -> int:
    from mura_ray.score import run_scoring

    cfg = _config(C.ScoreConfig, args)
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


def _demo(args: argparse.Namespace) -> int:
    from mura_ray.demo import render_summary, run_demo

    print(render_summary(run_demo(_config(C.DemoConfig, args))))
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from mura_ray.doctor import run_doctor

    return run_doctor(checks=args.check)


def _bench(args: argparse.Namespace) -> int:
    from mura_ray import bench

    if args.bench == "score":
        cfg = _config(C.BenchScoreConfig, args)
        result = bench.bench_score(cfg.images, image_size=cfg.image_size, batch_size=cfg.batch_size)
        print(bench.score_table(result))
        if cfg.plot:
            bench.plot_score(result, cfg.plot)
    else:
        cfg = _config(C.BenchTrainConfig, args)
        result = bench.bench_train(studies=cfg.studies, image_size=cfg.image_size, batch_size=cfg.batch_size)
        print(bench.train_table(result))
    if cfg.json:
        bench.write_json(cfg.json, result)
    return 0


VERBS: dict[str, Callable[[argparse.Namespace], int]] = {
    "sample": _sample, "train": _train, "evaluate": _evaluate, "score": _score, "demo": _demo, "doctor": _doctor,
    "bench": _bench,
}


def _usage_error(exc: BaseException) -> UsageError | None:
    """The UsageError behind ``exc``, also when Ray wrapped it."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UsageError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _upgrade_argv(argv: list[str]) -> list[str]:
    """Earlier releases' spellings (``score --input/--output``, ``sample OUT``), with a note on stderr."""
    if not argv:
        return argv
    verb, rest = argv[0], list(argv[1:])
    for i, a in enumerate(rest):
        new = RENAMED.get((verb, a.split("=", 1)[0]))
        if new:
            print(f"mura-ray: note: {verb} {a.split('=', 1)[0]} is now {new}", file=sys.stderr)
            rest[i] = new + a[len(a.split("=", 1)[0]):]
    if verb == "sample" and rest and not rest[0].startswith("-"):
        rest = ["--out", *rest]
    return [verb, *rest]


def main(argv: Sequence[str] | None = None, *, own_process: bool = False) -> int:
    """Run one verb; ``own_process`` when this process is the command itself (the console script, a Ray Job)."""
    from mura_ray import console

    argv = _upgrade_argv(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    console.setup(verbose=args.verbose, quiet=args.quiet, own_process=own_process)
    try:
        return VERBS[args.verb](args)
    except KeyboardInterrupt:
        print("mura-ray: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        usage = _usage_error(exc)
        if usage is None:
            raise
        print(f"mura-ray: error: {usage}", file=sys.stderr)
        return 2


def entry() -> None:
    """The ``mura-ray`` console script."""
    sys.exit(main(own_process=True))


if __name__ == "__main__":
    entry()
