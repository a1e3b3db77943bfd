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
import inspect
import sys
from collections.abc import Callable, Sequence
from typing import Any

from mura_ray import config as C
from mura_ray import verbs as V
from mura_ray.errors import UsageError
from mura_ray.versions import version_line

DESCRIPTION = """Abnormality screening of musculoskeletal radiographs (MURA) on Ray.

Every path is a local path (relative to where you run the command), ~, file://
or s3://bucket/prefix. Commands start a local Ray cluster unless RAY_ADDRESS
names one (as inside a Ray Job). mura-ray prints its own progress; Ray's own
output goes to a log file that the command names (--verbose shows it)."""

# Flags of earlier releases, still accepted: (verb, old) -> new.
RENAMED = {("score", "--input"): "--data", ("score", "--output"): "--out"}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (and exit 2), not the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"mura-ray: error: {self.prog}: {message} (see {self.prog} --help)\n")


# verb -> (what it runs, its options: a config dataclass or a function that adds them, an example)
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
    b = kinds.add_parser(
        "recipe", help="crop vs pad and one model vs an ensemble of 3, on the hard sample", parents=[common]
    )
    C.add_options(b, C.BenchRecipeConfig)


def scores_options(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    b = actions.add_parser("history", help="the table's commits, newest first, and its runs", parents=[common])
    C.add_options(b, C.ScoresHistoryConfig)
    b = actions.add_parser(
        "retract", help="remove a run's rows in one commit; the next night scores those images again", parents=[common]
    )
    C.add_options(b, C.ScoresRetractConfig)
    b = actions.add_parser(
        "vacuum", help="delete files no current row needs, past the retention, and orphan heatmaps", parents=[common]
    )
    C.add_options(b, C.ScoresVacuumConfig)


VERBS: dict[str, tuple[Callable[[argparse.Namespace], int], Any, str]] = {
    "sample": (V.sample, C.SampleConfig, "mura-ray sample --out archive --studies 100"),
    "train": (
        V.train,
        C.TrainConfig,
        "mura-ray train --data archive --out runs/r1 --weights none --epochs 5 --image-size 64",
    ),
    "tune": (
        V.tune,
        C.TuneSearchConfig,
        "mura-ray tune --data archive --out runs/search --trials 6 --keep 3 --image-sizes 224,320 --use-gpu yes",
    ),
    "ensemble": (
        V.ensemble,
        C.EnsembleConfig,
        "mura-ray ensemble --models runs/r1/model runs/r2/model runs/r3/model --out runs/ensemble",
    ),
    "evaluate": (V.evaluate, C.EvalConfig, "mura-ray evaluate --model runs/r1/model --data archive --out eval"),
    "score": (V.score, C.ScoreConfig, "mura-ray score --model runs/r1/model --data /mnt/xrays --out scores"),
    "scores": (V.scores, scores_options, "mura-ray scores retract --out scores --run 20261201T020000Z-1a2b3c"),
    "monitor": (V.monitor, C.MonitorConfig, "mura-ray monitor --scores scores --model runs/r1/model"),
    "explain": (V.explain, C.ExplainConfig, "mura-ray explain --model runs/r1/model --data archive --out heatmaps"),
    "demo": (V.demo, C.DemoConfig, "mura-ray demo --out demo-out"),
    "doctor": (V.doctor, doctor_options, "mura-ray doctor --check s3://bucket/archive"),
    "bench": (V.bench, bench_options, "mura-ray bench score --images 500 --json bench.json --plot bench.png"),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``mura-ray`` parser: one sub-command per entry of ``VERBS``, help from each function's docstring."""
    parser = _Parser(prog="mura-ray", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=version_line())
    # -q and -v go before or after the verb; SUPPRESS keeps a verb's parser from resetting the global value.
    common = argparse.ArgumentParser(add_help=False)
    for p in (parser, common):
        default = False if p is parser else argparse.SUPPRESS
        p.add_argument(
            "-q", "--quiet", action="store_true", default=default, help="only warnings, errors and the result"
        )
        p.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            default=default,
            help="show Ray's own output here too, not only in its log file",
        )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, (run, options, example) in VERBS.items():
        short, _, description = inspect.getdoc(run).partition("\n\n")
        p = verbs.add_parser(
            name,
            help=short,
            description=description,
            parents=[common],
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog=f"example:\n  {example}",
        )
        if dataclasses.is_dataclass(options):
            C.add_options(p, options)
        else:
            options(p, common)
    return parser


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
            rest[i] = new + a[len(a.split("=", 1)[0]) :]
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
        return VERBS[args.verb][0](args)
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
