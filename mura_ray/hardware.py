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


def gpu_bf16_native(capability: tuple[int, int]) -> bool:
    """Whether a GPU of this compute capability has bf16 tensor cores (Ampere, sm80, and newer).

    Older GPUs (T4 sm75, V100 sm70) only emulate bf16: cuDNN has no bf16
    convolutions there, so autocast to bf16 errors or runs slow kernels."""
    return tuple(capability) >= (8, 0)


def bf16_native(device: Any) -> bool:
    """Whether bf16 runs natively on ``device`` (a torch.device): a GPU of sm80 or newer, or a CPU with
    AVX512-BF16 or AMX."""
    if device.type == "cuda":
        import torch

        return gpu_bf16_native(torch.cuda.get_device_capability(device))
    return cpu_has_bf16()


def ieee_fp32() -> None:
    """Make fp32 mean IEEE fp32 on this process's GPUs: torch computes fp32 convolutions in TF32 on Ampere and
    newer by default, which would make the accuracy guard's reference and a row's "fp32" untrue."""
    import torch

    cudnn_conv = getattr(torch.backends.cudnn, "conv", None)
    if cudnn_conv is not None and hasattr(cudnn_conv, "fp32_precision"):
        cudnn_conv.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
    else:  # torch before 2.9
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def no_cuda_message(node: str) -> str:
    """What a process given a GPU says when torch sees no CUDA there (a CPU-only torch, or no driver)."""
    import torch

    return (
        f"node {node[:12]} gave this process a GPU, but torch {torch.__version__} sees no CUDA device there "
        f"(CUDA build: {torch.version.cuda or 'none'}): run the nodes from an image with a CUDA build of torch "
        "and the NVIDIA driver, or pass --use-gpu no"
    )


def cuda_report(node: str) -> dict[str, Any]:
    """What torch sees of the GPU this process was given: ``cuda`` (bool), ``name``, ``capability``, and a
    one-line ``message`` where there is no CUDA."""
    import torch

    if not torch.cuda.is_available():
        return {"node": node, "cuda": False, "name": "", "capability": None, "message": no_cuda_message(node)}
    capability = torch.cuda.get_device_capability(0)
    name = f"{torch.cuda.get_device_name(0)} (sm{capability[0]}{capability[1]})"
    return {"node": node, "cuda": True, "name": name, "capability": list(capability), "message": ""}
