"""What the machine offers to the compute core: the CPU's model and speed-relevant features. No Ray here."""

from __future__ import annotations

import functools
import os
import platform
from typing import Any

SPEED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


@functools.cache
def cpu_info() -> dict[str, Any]:
    """The CPU's model, logical CPUs and which of ``SPEED_FLAGS`` it has (from /proc/cpuinfo on Linux)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "cpus": os.cpu_count(), "flags": [f for f in SPEED_FLAGS if f in flags]}


def cpu_line() -> str:
    info = cpu_info()
    flags = ", ".join(info["flags"]) or "none of " + ", ".join(SPEED_FLAGS)
    return f"CPU: {info['model']}, {info['cpus']} logical CPUs; features: {flags}"


def cpu_has_bf16() -> bool:
    """Whether the CPU computes bf16 natively (AVX512-BF16 or AMX), where bf16 inference is several times faster."""
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_info()["flags"]))
