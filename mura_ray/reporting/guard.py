"""The accuracy guard: does an inference engine score a labelled split as torch fp32 does? No Ray here.

Three figures against torch fp32 on the same images: the largest
difference in P(abnormal), the share of images whose decision at the
threshold agrees, and the change in study-level Cohen's kappa. An engine
passes when all three are within ``LIMITS``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch
from torch import nn

from mura_ray.errors import UsageError
from mura_ray.model import backends
from mura_ray.model.calibration import IDENTITY, Calibration
from mura_ray.reporting.metrics import kappa_rows, study_scores

# The engine's own check at start-up (backends.GUARD_MAX_ABS) and this guard on a labelled split agree.
LIMITS = {"max_abs_diff": backends.GUARD_MAX_ABS, "decision_agreement": 0.995, "study_kappa_diff": 0.01}


def figures(
    probs: np.ndarray, reference: np.ndarray, labels: np.ndarray, studies: np.ndarray, threshold: float
) -> dict[str, float]:
    """The guard's three figures for ``probs`` against ``reference`` (both per image), and whether they pass."""
    decisions, ref_decisions = probs >= threshold, reference >= threshold
    _, study_probs, study_labels = study_scores(studies, probs, labels)
    _, study_ref, _ = study_scores(studies, reference, labels)
    kappa = float(kappa_rows(study_labels, study_probs >= threshold))
    kappa_ref = float(kappa_rows(study_labels, study_ref >= threshold))
    out = {
        "max_abs_diff": float(np.max(np.abs(probs - reference))) if len(probs) else 0.0,
        "decision_agreement": float(np.mean(decisions == ref_decisions)) if len(probs) else 1.0,
        "study_kappa": float(kappa),
        "study_kappa_fp32": float(kappa_ref),
        "study_kappa_diff": float(abs(kappa - kappa_ref)),
    }
    out["passes"] = (
        out["max_abs_diff"] <= LIMITS["max_abs_diff"]
        and out["decision_agreement"] >= LIMITS["decision_agreement"]
        and out["study_kappa_diff"] <= LIMITS["study_kappa_diff"]
    )
    return out


def check_engines(
    model: nn.Module,
    model_id: str,
    squares: np.ndarray,
    labels: np.ndarray,
    studies: np.ndarray,
    threshold: float,
    batch_size: int = 64,
    calibration: Calibration = IDENTITY,
) -> dict[str, dict[str, Any]]:
    """The guard's figures for every engine installed here, on ``squares`` (centre-cropped uint8 model inputs).

    ``model`` is the folded model; decisions are taken on probabilities calibrated with ``calibration``, as
    scoring takes them. Keys are engine names ("openvino bf16")."""
    device = torch.device("cpu")
    graph = backends.ProbabilityOf(model).eval()
    side = squares.shape[-1]
    engine = backends.build_torch(graph, "fp32", device, side, model_id)
    reference = calibration.apply(_probs(engine, squares, batch_size))
    results = {}
    for name, precision in backends.all_engines(device):
        engine = backends.BUILDERS[name](graph, precision, device, side, model_id)
        probs = calibration.apply(_probs(engine, squares, batch_size))
        results[engine.name] = figures(probs, reference, labels, studies, threshold)
    return results


def check_sample(
    weights: bytes, meta: dict[str, Any], squares: np.ndarray, labels: np.ndarray, studies: np.ndarray
) -> dict[str, Any]:
    """The guard's record for a model's metadata: figures per engine on ``squares`` (cached squares of the
    validation split) at the model's threshold, and the CPU they were measured on."""
    from mura_ray.hardware import cpu_line
    from mura_ray.imaging.preprocess import EvalPreset
    from mura_ray.model.ensemble import module_from
    from mura_ray.model.resnet import for_inference

    model = module_from(weights, meta)
    pixels = EvalPreset(size=int(meta["image_size"]))({"pixels": squares})["pixels"]
    engines = check_engines(
        for_inference(model),
        meta["model_id"],
        pixels,
        labels,
        studies,
        float(meta["threshold"]),
        calibration=Calibration.of(meta),
    )
    return {"split": "valid", "images": len(pixels), "device": "cpu", "measured_on": cpu_line(), "engines": engines}


def check_model(model_dir: str, data: str, split: str = "valid") -> dict[str, Any]:
    """The guard's figures for every engine, for the model in ``model_dir`` on the labelled ``split`` of ``data``."""
    from mura_ray.archive import storage
    from mura_ray.archive.catalog import build_catalog
    from mura_ray.imaging.preprocess import EvalPreset, fit_of, load_square
    from mura_ray.model.checkpoint import read_checkpoint
    from mura_ray.model.ensemble import module_from
    from mura_ray.model.registry import resolve_model_dir
    from mura_ray.model.resnet import for_inference

    weights, meta = read_checkpoint(resolve_model_dir(model_dir))
    model = module_from(weights, meta)
    catalog = build_catalog(data, split=split)
    catalog = catalog.filter(pc.is_valid(catalog["label"])).to_pylist()
    fs, _ = storage.filesystem(data)
    side = int(meta["cache_side"])
    squares, kept = [], []
    for row in catalog:
        try:
            uri = row["image_uri"]
            squares.append(load_square(storage.read_bytes(fs, uri), side, fit=fit_of(meta), name=uri))
            kept.append(row)
        except Exception:  # unreadable images are the scorer's error rows, not part of the comparison
            continue
    if not kept:
        raise UsageError(f"no readable labelled images in split {split!r} under {data!r}")
    pixels = EvalPreset(size=int(meta["image_size"]))({"pixels": np.stack(squares)})["pixels"]
    labels = np.array([r["label"] for r in kept])
    studies = np.array([r["study_uri"] for r in kept], dtype=object)
    threshold = float(meta.get("threshold", 0.5))
    engines = check_engines(
        for_inference(model), meta["model_id"], pixels, labels, studies, threshold, calibration=Calibration.of(meta)
    )
    return {"model_id": meta["model_id"], "images": len(kept), "threshold": threshold, "engines": engines}


def engine_rows(engines: dict[str, dict[str, Any]]) -> list[str]:
    """The guard's figures per engine as Markdown table lines."""
    lines = [
        "| engine | max abs. diff in P vs torch fp32 | decisions agreeing | study kappa (fp32) | passes |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for name, f in engines.items():
        lines.append(
            f"| {name} | {f['max_abs_diff']:.1e} | {f['decision_agreement']:.2%} | "
            f"{f['study_kappa']:.4f} ({f['study_kappa_fp32']:.4f}) | {'yes' if f['passes'] else 'NO'} |"
        )
    return lines


def guard_table(r: dict[str, Any]) -> str:
    head = f"accuracy guard: model {r['model_id'][:12]}, {r['images']} images, threshold {r['threshold']:.3f}"
    return "\n".join([head, *engine_rows(r["engines"])])


def _probs(engine: backends.Engine, squares: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([engine(squares[i : i + batch_size]) for i in range(0, len(squares), batch_size)])
