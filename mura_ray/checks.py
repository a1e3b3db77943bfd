"""Checks of option values: each takes the text (or the value) and returns the value, or raises
argparse's ``ArgumentTypeError`` with the rule it breaks."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from typing import Any


def _bounded(name: str, cast: Callable[[Any], Any], ok: Callable[[Any], bool], rule: str) -> Callable[[Any], Any]:
    """A check that casts its input and refuses values outside ``rule``; ``name`` shows in argparse's errors."""

    def check(text: Any) -> Any:
        value = cast(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    check.__name__ = name
    return check


positive_int = _bounded("positive_int", int, lambda v: v >= 1, ">= 1")
non_negative_int = _bounded("non_negative_int", int, lambda v: v >= 0, ">= 0")
non_negative_float = _bounded("non_negative_float", float, lambda v: v >= 0, ">= 0")
positive_float = _bounded("positive_float", float, lambda v: v > 0, "> 0")
fraction = _bounded("fraction", float, lambda v: 0.0 <= v <= 1.0, "between 0 and 1")
open_fraction = _bounded("open_fraction", float, lambda v: 0.0 < v < 1.0, "between 0 and 1 (exclusive)")
image_size = _bounded("image_size", int, lambda v: 32 <= v <= 1024, "between 32 and 1024 pixels")


def run_name(text: Any) -> str:
    value = str(text)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", value):
        raise argparse.ArgumentTypeError(
            f"must be 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit, got {text!r}"
        )
    return value


def modality_list(text: Any) -> str:
    values = [v.strip().upper() for v in str(text).split(",") if v.strip()]
    if not values or not all(re.fullmatch(r"[A-Z0-9]{1,16}", v) for v in values):
        raise argparse.ArgumentTypeError(f"must be DICOM modality codes separated by commas (e.g. CR,DX), got {text!r}")
    return ",".join(values)


def int_list(text: Any) -> tuple[int, ...]:
    if isinstance(text, tuple) and text and all(isinstance(v, int) and v >= 1 for v in text):
        return text
    try:
        values = tuple(int(v.replace("_", "")) for v in str(text).split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"must be positive whole numbers separated by commas, got {text!r}")
    return values
