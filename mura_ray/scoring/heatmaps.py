"""Grad-CAM overlays on Ray Data, for the images asked for only: keys -> decode -> heatmap actors -> PNG bytes.

Heatmaps need a backward pass through the plain (unfolded) model, so they
run in their own actors, never in the scoring engines: scoring is as fast
with heatmaps as without, and only the images asked for pay for them. Each
actor checks that the weights it is handed are the run's ``model_id``.
Shared by ``mura-ray explain`` and ``score --heatmaps flagged``.
"""

from __future__ import annotations

import posixpath
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch

from mura_ray import cluster
from mura_ray.archive import storage
from mura_ray.data import catalog_dataset
from mura_ray.hardware import no_cuda_message
from mura_ray.imaging.decode import MAX_BYTES, one_line
from mura_ray.imaging.preprocess import EvalPreset, fit_of, load_square, read_capped
from mura_ray.model.calibration import Calibration
from mura_ray.model.checkpoint import model_id_of
from mura_ray.model.ensemble import module_from
from mura_ray.model.heatmaps import HEATMAP_LAYER, display_square, grad_cam, overlay, peak, png_bytes
from mura_ray.scoring.schemas import INDEX_SCHEMA

DISPLAY = 256  # side of each half of an overlay, in pixels
SUFFIX = ".heatmap.png"


def heatmap_name(image_uri: str, root: str | None) -> str:
    """Where an image's overlay goes, relative to the heatmaps folder: its path under ``root`` plus ``SUFFIX``
    (``root`` None: ``image_uri`` is a relative name already, a pseudonym), with any ``..`` in it kept as a
    name (``storage.safe_relative``), so no overlay lands outside the folder."""
    if root is None:
        return storage.safe_relative(image_uri) + SUFFIX
    base = root.rstrip("/") + "/"
    rel = image_uri[len(base) :] if image_uri.startswith(base) else posixpath.basename(image_uri)
    return storage.safe_relative(rel) + SUFFIX


def read_for_heatmaps(
    batch: dict[str, np.ndarray], *, side: int, display: int, fs: Any, fit: str = "crop"
) -> dict[str, np.ndarray]:
    """Each image as the model sees it (its cached square, by the model's ``fit``) and as a person sees it
    (a larger square of the same geometry)."""
    n = len(batch["image_uri"])
    pixels = np.zeros((n, side, side), np.uint8)
    shown = np.zeros((n, display, display), np.uint8)
    errors = np.full(n, "", dtype=object)
    for i, uri in enumerate(batch["image_uri"]):
        try:
            data = read_capped(fs, uri, MAX_BYTES)
            pixels[i] = load_square(data, side, fit=fit, name=str(uri))
            shown[i] = load_square(data, display, fit=fit, name=str(uri))
        except Exception as exc:  # the row says why; other images go on
            errors[i] = one_line(f"{type(exc).__name__}: {exc}")
    return dict(batch, pixels=pixels, shown=shown, error=errors)


class HeatmapMaker:
    """Holds the plain model; turns batches of squares into overlay PNGs (radiograph | heatmap, with the score,
    and the batch's ``caption`` where it has one: never the image's path, which may name the patient)."""

    def __init__(self, weights: list[ray.ObjectRef], meta: dict[str, Any], layer: str, threads: int, use_gpu: bool):
        torch.set_num_threads(threads)
        data = ray.get(weights[0])
        if model_id_of(data) != meta["model_id"]:
            raise RuntimeError(f"the weights handed to this actor are not model {meta['model_id'][:12]}")
        if use_gpu and not torch.cuda.is_available():
            raise RuntimeError(no_cuda_message(ray.get_runtime_context().get_node_id()))
        device = torch.device("cuda" if use_gpu else "cpu")
        self.model = module_from(data, meta).to(device).eval()
        self.meta, self.layer = meta, layer
        self.crop = EvalPreset(size=int(meta["image_size"]))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["image_uri"])
        ok = batch["error"] == ""
        out = {k: np.full(n, np.nan, np.float32) for k in ("heatmap_prob", "peak_x", "peak_y")}
        out["png"] = np.full(n, b"", dtype=object)
        if ok.any():
            pixels = self.crop({"pixels": batch["pixels"][ok]})["pixels"]
            maps, probs = grad_cam(self.model, pixels, layer=self.layer, calibration=Calibration.of(self.meta))
            given = batch["prob_abnormal"][ok] if "prob_abnormal" in batch else np.full(len(probs), np.nan)
            shown = np.where(np.isnan(given.astype(np.float32)), probs, given)  # the score the run recorded
            size, side = int(self.meta["image_size"]), int(self.meta["cache_side"])
            for j, i in enumerate(np.flatnonzero(ok)):
                display = display_square(batch["shown"][i], size, side, side=DISPLAY)
                caption = str(batch["caption"][i]) if "caption" in batch else ""
                out["png"][i] = png_bytes(overlay(display, maps[j], float(shown[j]), caption))
                x, y = peak(maps[j])
                out["heatmap_prob"][i], out["peak_x"][i], out["peak_y"][i] = shown[j], x / size, y / size
        return {"image_uri": batch["image_uri"], "error": batch["error"], **out}


def heatmap_dataset(
    keys: pa.Table,
    weights: bytes,
    meta: dict[str, Any],
    data: str,
    layer: str = HEATMAP_LAYER,
    batch_size: int = 16,
    *,
    placement: tuple[str, float, float],
) -> ray.data.Dataset:
    """``image_uri`` rows (and ``prob_abnormal`` when known, and a ``caption``, both shown on the overlay) ->
    ``png`` bytes per image, with the map's peak and the score, or ``error``. ``placement``: ``--use-gpu``,
    ``--gpus-per-actor`` and ``--gpu-timeout``."""
    cluster.require_connected("heatmap_dataset")
    use_gpu, gpus, timeout = placement
    plan = cluster.place_scoring_actors(None, use_gpu, None, gpus, timeout)
    fs, _ = storage.filesystem(data)
    columns = [c for c in ("image_uri", "prob_abnormal", "caption") if c in keys.column_names]
    side = int(meta["cache_side"])
    display = round(DISPLAY * side / int(meta["image_size"]))  # the shown square, before its centre crop
    ds = catalog_dataset(keys.select(columns)).map_batches(
        read_for_heatmaps,
        fn_kwargs={"side": side, "display": display, "fs": fs, "fit": fit_of(meta)},
        batch_size=16,
        num_cpus=0.5,
    )
    return ds.map_batches(
        HeatmapMaker,
        fn_constructor_kwargs={
            "weights": [ray.put(weights)],
            "meta": meta,
            "layer": layer,
            "threads": plan.threads,
            "use_gpu": plan.use_gpu,
        },
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=plan.min_actors, max_size=plan.max_actors),
        num_cpus=plan.cpus,
        num_gpus=plan.gpus,
    )


def index_rows(
    batch: dict[str, np.ndarray],
    study_of: dict[str, str],
    root: str | None,
    meta: dict[str, Any],
    layer: str,
    prefix: str = "",
) -> pa.Table:
    """A batch of ``heatmap_dataset``'s output as rows of the heatmaps' index (``INDEX_SCHEMA``); ``heatmap`` is
    the PNG's path under ``prefix``."""
    uris = [str(u) for u in batch["image_uri"]]
    errors = [str(e) or None for e in batch["error"]]
    return pa.table(
        {
            "image_uri": uris,
            "study_uri": [study_of.get(u) for u in uris],
            "heatmap": [
                storage.join(prefix, heatmap_name(u, root)) if e is None else None for u, e in zip(uris, errors)
            ],
            "prob_abnormal": pa.array(batch["heatmap_prob"], pa.float32(), mask=np.isnan(batch["heatmap_prob"])),
            "peak_x": pa.array(batch["peak_x"], pa.float32(), mask=np.isnan(batch["peak_x"])),
            "peak_y": pa.array(batch["peak_y"], pa.float32(), mask=np.isnan(batch["peak_y"])),
            "layer": [layer] * len(uris),
            "model_id": [meta["model_id"]] * len(uris),
            "error": errors,
        },
        schema=INDEX_SCHEMA,
    )
