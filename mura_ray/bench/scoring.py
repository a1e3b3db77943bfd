"""``mura-ray bench score``: scoring throughput, measured side by side in one run.

``bench_score`` measures on the same N synthetic images of MURA-like size:
(a) the model's forward pass alone on pre-decoded images, all cores, per
    inference engine installed here (``bench.engines``);
(b) decoding and preprocessing alone, all cores, and per core per format;
(c) the machine's limit for the whole job with each engine: (a) and (b)
    sharing the cores, 1 / (1/a + 1/b);
(d) the original notebook's way: one process, a torch DataLoader with
    workers decoding, fp32 forward;
(e) mura-ray's Ray pipeline end to end, Parquet written, with the engine
    ``--backend auto`` picked (compared with that engine's limit);
and the job's peak memory (driver and every process it started) at N and 4N.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import torch
from PIL import Image

from mura_ray import __version__
from mura_ray.archive.sample import encode_png, render_radiograph
from mura_ray.bench import engines
from mura_ray.bench.memory import PeakMemory
from mura_ray.hardware import cpu_info
from mura_ray.imaging.preprocess import IMAGENET_MEAN, IMAGENET_STD, EvalPreset, cache_side, load_square
from mura_ray.model.checkpoint import model_metadata, save_checkpoint
from mura_ray.model.resnet import build_model

log = logging.getLogger(__name__)

IMAGES_PER_STUDY = 3


def _render(i: int) -> tuple[int, bytes]:
    rng = np.random.default_rng(i)
    return i, encode_png(render_radiograph(i, bool(rng.random() < 0.4)), rgb=bool(rng.random() < 0.2))


def make_images(directory: str, n: int, start: int = 0) -> list[str]:
    """Write images ``start .. start+n-1`` as PNGs (sides 150-512) in study folders; return their paths."""
    paths = []
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        for i, data in pool.map(_render, range(start, start + n), chunksize=16):
            path = os.path.join(directory, f"study{i // IMAGES_PER_STUDY:06d}", f"image{i % IMAGES_PER_STUDY + 1}.png")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
            paths.append(path)
    return paths


def write_bench_model(directory: str, image_size: int) -> str:
    """A randomly initialised checkpoint: scoring speed does not depend on the weights' values."""
    torch.manual_seed(0)
    meta = {**model_metadata(image_size), "threshold": 0.5, "package_version": __version__}
    save_checkpoint(directory, build_model(), meta)
    return directory


# ---- (b) decode alone ----


def decode_and_crop(paths: list[str], image_size: int) -> np.ndarray:
    """Files -> (N, S, S) uint8 model inputs, as the pipeline prepares them."""
    squares = []
    for path in paths:
        with open(path, "rb") as f:
            squares.append(load_square(f.read(), cache_side(image_size)))
    return EvalPreset(size=image_size)({"pixels": np.stack(squares)})["pixels"]


def _decode_file(args: tuple[str, int]) -> int:
    path, image_size = args
    return len(decode_and_crop([path], image_size))


def decode_ips(paths: list[str], image_size: int, workers: int) -> float:
    jobs = [(p, image_size) for p in paths]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        list(pool.map(_decode_file, jobs[: workers * 4]))  # start the processes first
        t0 = time.perf_counter()
        list(pool.map(_decode_file, jobs, chunksize=32))
    return len(paths) / (time.perf_counter() - t0)


# ---- (d) the notebook's way ----


class NotebookDataset(torch.utils.data.Dataset):
    """As a notebook would: PIL open, torchvision Resize/CenterCrop/ToTensor/Normalize, gray to RGB."""

    def __init__(self, paths: list[str], image_size: int) -> None:
        from torchvision import transforms as T

        self.paths = paths
        self.transform = T.Compose(
            [
                T.Resize(cache_side(image_size)),
                T.CenterCrop(image_size),
                T.ToTensor(),
                T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with open(self.paths[i], "rb") as f:
            image = Image.open(io.BytesIO(f.read())).convert("RGB")
        return self.transform(image)


def naive_ips(paths: list[str], image_size: int, batch_size: int, workers: int) -> float:
    torch.set_num_threads(os.cpu_count() or 1)
    model = build_model().eval()
    loader = torch.utils.data.DataLoader(NotebookDataset(paths, image_size), batch_size=batch_size, num_workers=workers)
    t0 = time.perf_counter()
    seen = 0
    with torch.no_grad():
        for x in loader:
            model(x)
            seen += len(x)
    return seen / (time.perf_counter() - t0)


# ---- (e) the pipeline, with the memory of every process it uses ----


def pipeline_run(model_dir: str, input_dir: str, output_dir: str, batch_size: int) -> tuple[float, int, dict[str, Any]]:
    """(images/s, peak bytes, manifest) of one ``run_scoring`` on a started cluster."""
    from mura_ray.config import ScoreConfig
    from mura_ray.scoring.run import run_scoring

    with PeakMemory() as mem:
        t0 = time.perf_counter()
        manifest = run_scoring(ScoreConfig(model=model_dir, data=input_dir, out=output_dir, batch_size=batch_size))
        seconds = time.perf_counter() - t0
    return manifest["images"] / seconds, mem.peak, manifest


def bench_score(
    images: int, *, image_size: int = 224, batch_size: int = 64, workdir: str | None = None
) -> dict[str, Any]:
    """Run (a)-(e) and the memory check; returns the figures (see the module docstring)."""
    from mura_ray import cluster

    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        log.info("writing %d + %d synthetic images", images, 3 * images)
        first = os.path.join(tmp, "n")
        paths = make_images(first, images)
        model_dir = write_bench_model(os.path.join(tmp, "model"), image_size)

        log.info("(b) decode alone on %d processes, and per core per format; (a) forward per engine; (d)", cpus)
        b = decode_ips(paths, image_size, cpus)
        per_core = engines.decode_per_core(paths, image_size)
        sample = decode_and_crop(paths[:batch_size], image_size)
        a = engines.forward_ips(sample, images, batch_size, cpus)
        c = {name: 1.0 / (1.0 / ips + 1.0 / b) for name, ips in a.items()}
        d = naive_ips(paths, image_size, batch_size, cpus)

        log.info("(e) mura-ray pipeline at N and 4N, --backend auto --precision auto")
        cluster.connect()
        e, peak_n, manifest = pipeline_run(model_dir, first, os.path.join(tmp, "out-n"), batch_size)
        chosen = max(manifest["engines"], key=manifest["engines"].get)
        make_images(os.path.join(tmp, "n4"), 3 * images, start=images)
        # 4N: the first N plus 3N more, in one input tree.
        os.rename(first, os.path.join(tmp, "n4", "first"))
        e4, peak_4n, manifest = pipeline_run(
            model_dir, os.path.join(tmp, "n4"), os.path.join(tmp, "out-4n"), batch_size
        )
        if manifest["images"] != 4 * images:
            raise RuntimeError(f"4N run scored {manifest['images']} images, expected {4 * images}")
    return {
        "images": images,
        "cpus": cpus,
        "cpu": cpu_info(),
        "torch_threads": cpus,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": {
            "image_size": image_size,
            "batch_size": batch_size,
            "channels_last": True,
            "batch_norm_folded": True,
        },
        "forward_ips": a,
        "model_ips": a[chosen],
        "decode_ips": b,
        "decode_per_core_ips": per_core,
        "limit_by_engine_ips": c,
        "limit_ips": c[chosen],
        "naive_ips": d,
        "pipeline_ips": e,
        "pipeline_4n_ips": e4,
        "pipeline_engine": chosen,
        "ratio_limit": e / c[chosen],
        "ratio_naive": e / d,
        "peak_rss_n_bytes": peak_n,
        "peak_rss_4n_bytes": peak_4n,
    }


def score_table(r: dict[str, Any]) -> str:
    """The figures as a Markdown table."""
    chosen = r["pipeline_engine"]
    rows = [(f"(a) forward alone, pre-decoded: {name}", ips) for name, ips in r["forward_ips"].items()]
    rows.append((f"(b) decode + preprocess alone, {r['cpus']} processes (PNG)", r["decode_ips"]))
    rows += [
        (f"(b) decode + preprocess per core: {fmt}", ips)
        for fmt, ips in r["decode_per_core_ips"].items()
        if fmt != "mean_pixels"
    ]
    rows += [(f"(c) machine limit, (a) and (b) sharing cores: {n}", ips) for n, ips in r["limit_by_engine_ips"].items()]
    rows += [
        ("(d) notebook way: DataLoader + fp32 forward", r["naive_ips"]),
        (f"(e) mura-ray Ray pipeline, Parquet written (auto: {chosen})", r["pipeline_ips"]),
        (f"(e) the same at 4N ({4 * r['images']} images, engine exports cached)", r["pipeline_4n_ips"]),
    ]
    lines = [
        f"| stage ({r['images']} images, {r['cpus']} CPUs, {r['settings']['image_size']} px) | images/s |",
        "| --- | ---: |",
    ]
    lines += [f"| {name} | {value:.1f} |" for name, value in rows]
    lines += [
        f"| e / c ({chosen}) | {r['ratio_limit']:.2f} |",
        f"| e / d | {r['ratio_naive']:.2f} |",
        f"| peak memory at N / 4N | {r['peak_rss_n_bytes'] / 2**20:.0f} MiB / "
        f"{r['peak_rss_4n_bytes'] / 2**20:.0f} MiB |",
    ]
    return "\n".join(lines) + "\n\n" + cpu_text(r)


def cpu_text(r: dict[str, Any]) -> str:
    cpu = r.get("cpu") or {}
    flags = ", ".join(cpu.get("flags", [])) or "none of the speed-relevant ones"
    return f"CPU: {cpu.get('model', '?')}; features: {flags}"


def plot_score(r: dict[str, Any], path: str) -> None:
    """Bar chart of images/s per stage, as PNG (a local path or s3://)."""
    import matplotlib.pyplot as plt

    from mura_ray.reporting import plots

    chosen = r["pipeline_engine"]
    named = {f"(a) forward\n{n}": v for n, v in r["forward_ips"].items()}
    named[f"(b) decode\n{r['cpus']} procs"] = r["decode_ips"]
    named[f"(c) limit\n{chosen}"] = r["limit_ips"]
    named["(d) notebook\nDataLoader"] = r["naive_ips"]
    named[f"(e) mura-ray\n{chosen}"] = r["pipeline_ips"]
    names, values = list(named), list(named.values())
    colors = ["#8da0cb"] * (len(names) - 3) + ["#66c2a5", "#fc8d62", "#e78ac3"]
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(names)), 4.4))
    bars = ax.bar(names, values, color=colors)
    ax.tick_params(axis="x", labelsize=8)
    ax.bar_label(bars, fmt="%.0f")
    ax.set_yscale("log")
    ax.set_ylabel("images / s (log scale)")
    ax.set_title(
        f"Scoring throughput, {r['images']} images, {r['cpus']} CPUs, "
        f"{r['settings']['image_size']} px ({r['date'][:10]})"
    )
    fig.tight_layout()
    plots.save(fig, path)
