"""How a config field declares its command-line option, and the checks every config runs.

``option`` puts the help, check, choices and path-ness on a dataclass field;
``ConfigBase`` checks and resolves fields on construction; ``add_options``
turns a config dataclass into argparse options. The configs themselves are
in ``mura_ray.config``.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import MISSING, field
from typing import Any

from mura_ray.archive import storage
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
    many: bool = False,
) -> Any:
    """A config field with what the CLI and the checks need to know about it.

    ``path``: resolved to an absolute path or URI before anything reaches Ray.
    ``resumable``: a rerun of the same training RUN_DIR may change it.
    ``cli``: offered as a command-line flag.
    ``many``: a list of one or more values (``--models A B C``); checks and paths apply to each.
    """
    meta = dict(
        help=help, metavar=metavar, check=check, choices=choices, path=path, cli=cli, resumable=resumable, many=many
    )
    return field(default=default, metadata=meta)


class ConfigBase:
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
                resolved = [storage.resolve(v) for v in value] if f.metadata.get("many") else storage.resolve(value)
                setattr(self, f.name, resolved)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
        if meta.get("many"):
            kwargs["nargs"] = "+"
        if not required:
            kwargs["default"] = f.default
        parser.add_argument(flag, **kwargs)


def tta_option() -> Any:
    return option(
        "none",
        help="test-time augmentation: flip = the mean of each image's and its horizontal mirror's probability",
        choices=("none", "flip"),
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
        help="auto: bf16 where the CPU (AVX512-BF16, AMX) or GPU (sm80 and newer) computes it natively, fp16 on "
        "older GPUs, else fp32; or fp32 (IEEE, also on GPUs) | bf16 | fp16 (torch on GPUs)",
        choices=("auto", "fp32", "bf16", "fp16"),
    )


def use_gpu_option(resumable: bool = False) -> Any:
    """``--use-gpu``, the same in every verb that runs the model."""
    return option(
        "auto",
        choices=("auto", "yes", "no"),
        resumable=resumable,
        help="yes: run the model on GPUs, asking Ray (and its autoscaler) for GPU nodes even when none is up now; "
        "no: CPUs only; auto: GPUs when the cluster has them up or its autoscaler has node types with GPUs, "
        "CPUs otherwise (a laptop, a CPU cluster)",
    )


def gpus_option(per: str, resumable: bool = False) -> Any:
    """``--gpus-per-worker`` (training) or ``--gpus-per-actor`` (scoring; fractions share a GPU)."""
    from mura_ray.checks import positive_float

    if per == "actor":
        text = "GPUs each model actor holds when it runs on GPUs; a fraction such as 0.5 puts two actors on a GPU"
    else:
        text = "GPUs each training worker holds when it runs on GPUs"
    return option(1.0, metavar="G", check=positive_float, resumable=resumable, help=text)


def placement_of(cfg: Any) -> tuple[str, float, float]:
    """``(--use-gpu, --gpus-per-actor, --gpu-timeout)`` of a config that scores (score, evaluate, explain)."""
    return cfg.use_gpu, cfg.gpus_per_actor, cfg.gpu_timeout


def gpu_timeout_option(resumable: bool = False) -> Any:
    """``--gpu-timeout``: how long to wait for GPUs to be placed before giving up with one line."""
    from mura_ray.checks import positive_float

    return option(
        900.0,
        metavar="S",
        check=positive_float,
        resumable=resumable,
        help="seconds to wait for the GPUs asked for to be placed (the autoscaler starting nodes included); "
        "then exit 2",
    )
