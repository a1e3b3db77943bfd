"""Inference engines for scoring: torch, OpenVINO and ONNX Runtime, in fp32 or bf16. No Ray here.

Every engine takes what the scorer has, a (B, S, S) uint8 batch of
centre-cropped squares, and returns (B,) float32 probabilities of abnormal.
They are all built from the same folded module (``for_inference``), with the
normalisation inside the exported graph, so the engines differ only in how
they run it. Exports are cached on local disk per model_id and backend
(``MURA_RAY_CACHE``, default ``~/.cache/mura-ray``); nothing is downloaded.
The cache is trusted only as far as this user wrote it: its folders are
private (mode 0o700), and an export is loaded only when its manifest names
the full model_id, the versions of mura-ray, torch and the engine, and the
SHA-256 of every file in it; otherwise it is exported again.

``auto`` tries, in order, the engines that are fastest on this node
(measured by ``mura-ray bench score``): on a GPU torch bf16 where the GPU
computes it natively (sm80 and newer), else torch fp16; on a CPU with
AVX512-BF16 or AMX, OpenVINO bf16 then torch bf16; on other CPUs OpenVINO
fp32 then ONNX Runtime fp32; torch fp32 (IEEE, also on GPUs) last. The
first one that builds and passes the accuracy guard on the run's first batch
is kept (``select``). OpenVINO and ONNX Runtime run on CPUs only: they are
never candidates on a GPU.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import stat
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import mura_ray
from mura_ray.archive import storage
from mura_ray.errors import UsageError
from mura_ray.hardware import bf16_native, ieee_fp32
from mura_ray.imaging.tensors import to_input

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "openvino", "onnxruntime")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CPU_ONLY = ("openvino", "onnxruntime")
INSTALL = {"openvino": "openvino", "onnxruntime": "mura-ray[onnxruntime]"}
GUARD_MAX_ABS = 0.01  # the largest |P - P_fp32| an engine may show on the guard batch
MANIFEST = "manifest.json"  # in each export folder: what it was exported for, and its files' hashes


@dataclass
class Engine:
    """A built engine: ``engine(pixels)`` -> probabilities, and what it is, for the output's columns."""

    backend: str
    precision: str
    run: Callable[[np.ndarray], np.ndarray]
    device: str = "cpu"  # the device type it runs on: the same engine name on another device is another engine

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return np.asarray(self.run(np.ascontiguousarray(pixels, dtype=np.uint8)), dtype=np.float32).reshape(-1)

    @property
    def name(self) -> str:
        return f"{self.backend} {self.precision}"

    @property
    def label(self) -> str:
        return f"{self.name} on {self.device}"


class ProbabilityOf(nn.Module):
    """uint8 squares -> P(abnormal): the graph every backend runs, normalisation included."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(to_input(pixels)).float(), dim=1)[:, 1]


def installed(backend: str) -> bool:
    return backend == "torch" or importlib.util.find_spec(backend) is not None


def check_choice(backend: str, precision: str) -> None:
    """Exit 2 (before any work) for an engine that cannot run: an uninstalled backend, ONNX Runtime in bf16."""
    if backend not in BACKENDS or precision not in PRECISIONS:
        raise UsageError(f"--backend takes {'|'.join(BACKENDS)} and --precision {'|'.join(PRECISIONS)}")
    if backend == "onnxruntime" and precision == "bf16":
        raise UsageError("--backend onnxruntime runs fp32 only on CPUs; use openvino or torch for bf16")
    if backend in CPU_ONLY and precision == "fp16":
        raise UsageError(f"--precision fp16 is for torch on GPUs without bf16; --backend {backend} runs fp32 or bf16")
    if backend != "auto" and not installed(backend):
        raise UsageError(f"--backend {backend} needs its runtime: pip install '{INSTALL[backend]}'")


def candidates(backend: str, precision: str, device: torch.device) -> list[tuple[str, str]]:
    """The (backend, precision) pairs to try, best first, for the settings asked for on ``device``."""
    bf16 = bf16_native(device)
    if device.type != "cpu":
        if backend in CPU_ONLY:
            raise UsageError(f"--backend {backend} runs on CPUs only, not on {device.type}: use --use-gpu no")
        order = [("torch", "bf16" if bf16 else "fp16")]
    elif bf16:
        order = [("openvino", "bf16"), ("torch", "bf16"), ("openvino", "fp32"), ("onnxruntime", "fp32")]
    else:
        order = [("openvino", "fp32"), ("onnxruntime", "fp32")]
    order.append(("torch", "fp32"))
    if backend != "auto":
        order = [(b, p) for b, p in order if b == backend] or [(backend, "fp32")]
    if precision != "auto":
        order = [(b, p) for b, p in order if p == precision] or [(order[0][0], precision)]
    return [(b, p) for b, p in order if installed(b)]


def all_engines(device: torch.device) -> list[tuple[str, str]]:
    """Every (backend, precision) installed here that runs natively on ``device``, torch fp32 last."""
    bf16 = bf16_native(device)
    if device.type != "cpu":
        return [("torch", "bf16" if bf16 else "fp16"), ("torch", "fp32")]
    pairs = [("torch", "bf16")] if bf16 else []
    pairs += [("openvino", "fp32"), ("onnxruntime", "fp32")] + ([("openvino", "bf16")] if bf16 else [])
    return [(b, p) for b, p in pairs if installed(b)] + [("torch", "fp32")]


def failed_guard(meta: dict[str, Any], device: str = "cpu") -> list[str]:
    """Engines the accuracy guard recorded at training (``engine_guard`` in the metadata) found not to score
    the validation split as torch fp32 does on ``device`` (a device type): ``--backend auto`` does not use
    them for this model there. The record was measured on the training driver's CPU, so it refuses nothing
    on a GPU, where each actor checks its engine on its whole first batch instead."""
    record = meta.get("engine_guard") or {}
    if record.get("device", "cpu") != device:
        return []
    return sorted(name for name, figures in record.get("engines", {}).items() if not figures["passes"])


def cache_root() -> Path:
    return Path(os.environ.get("MURA_RAY_CACHE") or Path.home() / ".cache" / "mura-ray")


def cache_dir(model_id: str) -> Path:
    return cache_root() / "engines" / model_id[:32]


def _not_private(path: Path) -> str | None:
    """Why another user could have written in ``path``, or None where it is this user's folder and only theirs."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        return "not a folder"
    if st.st_uid != os.getuid():
        return f"owned by uid {st.st_uid}"
    if st.st_mode & 0o022:
        return f"writable by others (mode {st.st_mode & 0o777:o})"
    return None


def _discard(path: Path) -> None:
    """Move ``path`` aside, then remove it: a reader sees it whole or not at all."""
    aside = path.with_name(f".{path.name}.old-{os.getpid()}-{os.urandom(3).hex()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:  # not there, or another actor discarded it first
        return
    if aside.is_symlink():
        aside.unlink()
    else:
        shutil.rmtree(aside, ignore_errors=True)


def _private_folder(path: Path) -> None:
    """Make ``path`` a folder only this user can write. One that others could write (or own), where anyone
    could have planted an export with a manifest to match, is discarded and made again."""
    path.mkdir(mode=0o700, exist_ok=True)
    why = _not_private(path)
    if why is None:
        return
    log.warning("engine cache %s is %s: not trusted, made again", path, why)
    try:
        _discard(path)
    except OSError as exc:
        raise RuntimeError(f"engine cache {path} is {why} and cannot be replaced ({exc}): remove it") from None
    path.mkdir(mode=0o700, exist_ok=True)
    if (why := _not_private(path)) is not None:
        raise RuntimeError(f"engine cache {path} is {why} after making it again")


def export_folder(model_id: str, name: str) -> Path:
    """``MURA_RAY_CACHE/engines/<model_id[:32]>/<name>``, every folder above the export private to this user.

    The cache root itself is never replaced (it holds registry downloads too): one that others can write is
    refused, and the scorer goes on without a cached engine."""
    root = cache_root()
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    if (why := _not_private(root)) is not None:
        raise RuntimeError(f"MURA_RAY_CACHE {root} is {why}: set MURA_RAY_CACHE to a folder only you can write")
    for folder in (root / "engines", cache_dir(model_id)):
        _private_folder(folder)
    return cache_dir(model_id) / name


def export_key(model_id: str, side: int, engine: str, engine_version: str) -> dict[str, Any]:
    """What an export is valid for: the whole model_id, the input side and the versions that made it."""
    versions = {"mura-ray": mura_ray.__version__, "torch": str(torch.__version__), engine: str(engine_version)}
    return {"model_id": model_id, "side": side, "versions": versions}


def _file_hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every file in ``folder`` but the manifest; a link or a folder in it hashes to "" (never valid)."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else ""
        for p in sorted(folder.iterdir())
        if p.name != MANIFEST
    }


def _verified(folder: Path, key: dict[str, Any]) -> bool:
    """Whether ``folder`` holds an export made for ``key``: private, its manifest names ``key``, and its
    files are those the manifest lists, with those hashes."""
    try:
        if _not_private(folder) is not None:
            return False
        manifest = json.loads((folder / MANIFEST).read_text())
        return manifest["key"] == key and manifest["files"] == _file_hashes(folder)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _publish(folder: Path, key: dict[str, Any], write: Callable[[Path], None]) -> Path:
    """``folder`` holding a verified export for ``key``, exported by ``write`` unless it already does.

    The export and its manifest are written in a private folder beside its place and renamed in, so
    concurrent actors never read half an export; whatever was there before is discarded."""
    if _verified(folder, key):
        return folder
    if folder.exists() or folder.is_symlink():
        log.warning(
            "engine export %s is not one this user made for this model and these versions: exporting again", folder
        )
    tmp = Path(storage.private_temp_dir(str(folder.parent), f".{folder.name}."))  # mode 0o700
    try:
        write(tmp)
        manifest = {"key": key, "files": _file_hashes(tmp)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        if not _verified(folder, key):  # else another actor published one while this one exported
            _discard(folder)  # a folder cannot replace a folder in one rename
            try:
                os.rename(tmp, folder)
            except OSError:  # another actor renamed its export in first
                pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not _verified(folder, key):
        raise RuntimeError(f"engine export {folder} does not match its manifest right after it was written")
    return folder


def _example(side: int) -> torch.Tensor:
    return torch.zeros((2, side, side), dtype=torch.uint8)


def build_torch(graph: nn.Module, precision: str, device: torch.device, side: int, model_id: str) -> Engine:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    ieee_fp32()  # fp32 is IEEE fp32 on GPUs too, as the guard's reference and the rows' "fp32" say

    @torch.inference_mode()
    def run(pixels: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(pixels).to(device)
        if dtype is None:
            return graph(x).cpu().numpy()
        with torch.autocast(device.type, dtype=dtype):
            return graph(x).float().cpu().numpy()

    return Engine("torch", precision, run, device.type)


def build_openvino(graph: nn.Module, precision: str, device: torch.device, side: int, model_id: str) -> Engine:
    import openvino as ov

    def export(folder: Path) -> None:
        with warnings.catch_warnings():  # tracing notes the normalisation's constants, which are constants
            warnings.simplefilter("ignore")
            ir = ov.convert_model(copy.deepcopy(graph).cpu(), example_input=_example(side))
        ov.save_model(ir, str(folder / "model.xml"), compress_to_fp16=False)

    key = export_key(model_id, side, "openvino", ov.__version__)
    xml = _publish(export_folder(model_id, f"openvino-{side}"), key, export) / "model.xml"
    core = ov.Core()
    threads = torch.get_num_threads()
    hint = "bf16" if precision == "bf16" else "f32"
    compiled = core.compile_model(
        core.read_model(str(xml)), "CPU", {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads}
    )
    actual = str(compiled.get_property("INFERENCE_PRECISION_HINT")).lower()  # "<type: 'bfloat16'>"
    request = compiled.create_infer_request()
    return Engine(
        "openvino",
        "bf16" if "bfloat16" in actual or "bf16" in actual else "fp32",
        lambda p: request.infer([p])[0].copy(),
    )


def build_onnxruntime(graph: nn.Module, precision: str, device: torch.device, side: int, model_id: str) -> Engine:
    import onnxruntime as ort

    def export(folder: Path) -> None:
        # The TorchScript exporter: the torch.export one needs onnxscript, one more dependency for the same graph.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                copy.deepcopy(graph).cpu(),
                (_example(side),),
                str(folder / "model.onnx"),
                input_names=["pixels"],
                output_names=["prob_abnormal"],
                dynamic_axes={"pixels": {0: "batch"}},
                dynamo=False,
            )

    key = export_key(model_id, side, "onnxruntime", ort.__version__)
    path = _publish(export_folder(model_id, f"onnx-{side}"), key, export) / "model.onnx"
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Engine("onnxruntime", "fp32", lambda p: session.run(None, {"pixels": p})[0])


BUILDERS = {"torch": build_torch, "openvino": build_openvino, "onnxruntime": build_onnxruntime}


def guard_failure(engine: Engine, reference: Engine, pixels: np.ndarray) -> str | None:
    """Why ``engine`` fails the accuracy guard against ``reference`` (torch fp32) on ``pixels``, or None.

    Within 0.01 of fp32, a decision can differ only for an image that close to the threshold."""
    got, want = engine(pixels), reference(pixels)
    worst = float(np.max(np.abs(got - want))) if len(got) else 0.0
    if not np.isfinite(got).all() or worst > GUARD_MAX_ABS:
        return f"max |P - P_fp32| = {worst:.4f} > {GUARD_MAX_ABS}"
    return None


def select(
    model: nn.Module,
    backend: str,
    precision: str,
    device: torch.device,
    side: int,
    model_id: str,
    guard_pixels: np.ndarray,
    refused: tuple[str, ...] = (),
) -> Engine:
    """The first engine of ``candidates`` that builds and passes the guard on ``guard_pixels``.

    ``model`` is the folded model (``for_inference``). An engine asked for
    by name that fails to build or fails the guard is an error; under
    ``auto`` the next candidate is tried, down to torch fp32, and engines
    named in ``refused`` (``failed_guard``) are not tried."""
    graph = ProbabilityOf(model).eval()
    reference = build_torch(graph, "fp32", device, side, model_id)
    named = backend != "auto" and precision != "auto"
    for name, prec in candidates(backend, precision, device):
        if (name, prec) == ("torch", "fp32"):
            return reference
        if not named and f"{name} {prec}" in refused:
            log.info("engine %s %s failed this model's recorded accuracy guard; not used", name, prec)
            continue
        try:
            # Building and the first run both count: a GPU that lacks kernels for a precision fails in its
            # first forward pass, not when the engine is built.
            engine = BUILDERS[name](graph, prec, device, side, model_id)
            failure = guard_failure(engine, reference, guard_pixels)
        except Exception as exc:  # a runtime that cannot build or run this graph here: try the next one
            if named:
                raise
            log.warning("engine %s %s on %s failed (%s); trying the next", name, prec, device.type, exc)
            continue
        if failure is None:
            return engine
        if named:
            raise RuntimeError(f"engine {engine.label} fails the accuracy guard: {failure}")
        log.warning("engine %s fails the accuracy guard (%s); trying the next", engine.label, failure)
    return reference
