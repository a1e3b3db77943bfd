"""``mura-ray bench nightly``: a night's fixed cost at archive scale, against the nights behind it.

For each archive size (zero-byte ``.png`` files in study folders: listing
and planning never read pixels) and each history (1 or K committed nights
behind it, the same images in all), the bench times real ``run_scoring``
nights that find ``new`` new (real, small PNG) images: wall time, its
listing, planning and commits, and the driver's peak resident memory. The
history is written through the nights' own commit path (``RunWriter``, one
chunk per night, a MERGE into the scores table each), without a model: its
scores are placeholders.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow as pa

from mura_ray.archive.catalog import scan_archive
from mura_ray.bench.memory import PeakMemory
from mura_ray.bench.scoring import make_images, write_bench_model
from mura_ray.hardware import cpu_info
from mura_ray.model.checkpoint import read_checkpoint, scoring_id_of
from mura_ray.scoring.delta import ScoreStore
from mura_ray.scoring.writer import RunWriter

log = logging.getLogger(__name__)

IMAGES_PER_STUDY = 4
STUDIES_PER_FOLDER = 1000


def make_empty_archive(root: str, n: int) -> None:
    """``n`` zero-byte images in ``root/partNNN/studyNNNNNNN/imageK.png``."""
    for s in range((n + IMAGES_PER_STUDY - 1) // IMAGES_PER_STUDY):
        folder = os.path.join(root, f"part{s // STUDIES_PER_FOLDER:04d}", f"study{s:07d}")
        os.makedirs(folder)
        for k in range(min(IMAGES_PER_STUDY, n - s * IMAGES_PER_STUDY)):
            os.close(os.open(os.path.join(folder, f"image{k + 1}.png"), os.O_CREAT | os.O_WRONLY, 0o644))


def write_history(out: str, data: str, meta: dict[str, Any], nights: int) -> None:
    """Commit the archive's images as ``nights`` runs (the first takes what the others leave, each other
    takes 1/(10 x nights) of it) of the model ``meta`` describes, each one commit to the scores table
    through ``RunWriter``: what a night of ``run_scoring`` with that model finds."""
    model_id, scoring_id = meta["model_id"], scoring_id_of(meta)
    catalog = scan_archive(data).table
    n = catalog.num_rows
    later = n // (10 * nights) if nights > 1 else 0
    bounds = [0, n - later * (nights - 1)] + [n - later * (nights - 1 - i) for i in range(1, nights)]
    store = ScoreStore(out)
    day = dt.date(2026, 1, 1)
    for i, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        run_id = f"history-{i:04d}"
        part = catalog.slice(lo, hi - lo)
        day_i = str(day + dt.timedelta(i))
        writer = RunWriter(store, part, run_id, model_id, 0.5, day_i, scoring_id)
        probs = np.random.default_rng(i).random(part.num_rows).astype(np.float32)
        writer.add(
            pa.table(
                {
                    "image_uri": part["image_uri"],
                    "prob_abnormal": pa.array(probs),
                    "error": pa.nulls(part.num_rows, pa.string()),
                    "modality": pa.array([""] * part.num_rows),
                    "backend": pa.array(["torch"] * part.num_rows),
                    "precision": pa.array(["fp32"] * part.num_rows),
                }
            )
        )
        writer.commit({"final": True, "started_at": f"{day_i}T00:00:00+00:00"})


PHASES = ("seconds", "plan_seconds", "list_seconds", "commit_seconds")


def timed_night(model_dir: str, data: str, out: str) -> dict[str, Any]:
    """One real ``run_scoring`` of ``data`` into ``out``: its wall time, the phases its manifest records
    (listing; listing and planning; its commits) and the driver's peak memory."""
    from mura_ray.config import ScoreConfig
    from mura_ray.scoring.run import run_scoring

    with PeakMemory(tree=False) as mem:
        t0 = time.perf_counter()
        manifest = run_scoring(ScoreConfig(model=model_dir, data=data, out=out, run_id="tonight"))
        seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "plan_seconds": manifest["plan_seconds"],
        "list_seconds": manifest["list_seconds"],
        "commit_seconds": manifest["commit_seconds"],
        "driver_peak_bytes": mem.peak,
        "scored": manifest["images"],
    }


def bench_nightly(
    sizes: tuple[int, ...], nights: tuple[int, ...], new: int, repeats: int = 3, workdir: str | None = None
) -> dict[str, Any]:
    """Time a night finding ``new`` images, per archive size and per number of nights behind it.

    At each size every history is written first; then, after one night not
    counted (it warms the page cache and Ray's workers), the nights are
    timed ``repeats`` times, the histories taken in turn (forwards, then
    backwards), each time on a fresh copy of its table, so that what drifts
    on the machine (page cache, a busy neighbour) falls on every history
    alike. A row holds the median of each phase and every try's wall
    time."""
    from mura_ray import cluster

    cluster.connect()
    rows = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        model_dir = write_bench_model(os.path.join(tmp, "model"), image_size=64)
        meta = read_checkpoint(model_dir)[1]
        fresh = os.path.join(tmp, "fresh")
        make_images(fresh, new)
        for size in sizes:
            data = os.path.join(tmp, f"archive-{size}")
            t0 = time.perf_counter()
            make_empty_archive(data, size)
            log.info("archive of %d empty files written in %.0fs", size, time.perf_counter() - t0)
            histories = {}
            for k in nights:
                histories[k] = os.path.join(tmp, f"history-{size}-{k}")
                t0 = time.perf_counter()
                write_history(histories[k], data, meta, k)
                log.info("%d night(s) of history over %d images written in %.0fs", k, size, time.perf_counter() - t0)
            shutil.copytree(fresh, os.path.join(data, "tonight"))
            samples: dict[int, list[dict[str, Any]]] = {k: [] for k in nights}
            for r in range(-1, repeats):  # try -1 warms the page cache and Ray's workers, and is not counted
                for k in nights if r % 2 == 0 else nights[::-1]:
                    out = os.path.join(tmp, "tonight-out")
                    shutil.copytree(histories[k], out)
                    night = timed_night(model_dir, data, out)
                    shutil.rmtree(out)
                    label = f"try {r + 1}" if r >= 0 else "warm-up (not counted)"
                    log.info("%d files, %d night(s) behind, %s: %s", size, k, label, night)
                    if r >= 0:
                        samples[k].append(night)
                    else:
                        break
            for k in nights:
                rows.append({"archive_files": size, "nights_behind": k, "new_files": new, **summary(samples[k])})
                shutil.rmtree(histories[k])
            shutil.rmtree(data)
    return {
        "cpu": cpu_info(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "repeats": repeats,
        "rows": rows,
        **ratios(rows),
    }


def summary(tries: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each phase over ``tries``, the wall times of them all, the highest driver peak."""
    out: dict[str, Any] = {key: float(np.median([t[key] for t in tries])) for key in PHASES}
    out["tries_seconds"] = [round(t["seconds"], 2) for t in tries]
    out["driver_peak_bytes"] = max(t["driver_peak_bytes"] for t in tries)
    out["scored"] = tries[-1]["scored"]
    return out


def ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Most nights / one night at each size; largest / smallest size at each history (medians)."""
    out: dict[str, Any] = {}
    for key in PHASES:
        by = {(r["archive_files"], r["nights_behind"]): r[key] for r in rows}
        sizes, nights = sorted({s for s, _ in by}), sorted({k for _, k in by})
        prefix = "" if key == "seconds" else key.removesuffix("seconds")
        out[prefix + "nights_ratio"] = {str(s): by[s, nights[-1]] / by[s, nights[0]] for s in sizes if len(nights) > 1}
        out[prefix + "size_ratio"] = {str(k): by[sizes[-1], k] / by[sizes[0], k] for k in nights if len(sizes) > 1}
    out["size_factor"] = sizes[-1] / sizes[0] if rows else 1
    return out


def nightly_table(r: dict[str, Any]) -> str:
    lines = [
        f"medians of {r['repeats']} tries each",
        "",
        "| archive files | nights behind | new files | night's wall time (s) | tries (s) | listing (s) "
        "| listing + planning (s) | commits (s) | driver peak memory (MiB) |",
        "| ---: | ---: | ---: | ---: | :--- | ---: | ---: | ---: | ---: |",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['archive_files']:,} | {row['nights_behind']} | {row['new_files']:,} | {row['seconds']:.1f} | "
            f"{', '.join(f'{t:.1f}' for t in row['tries_seconds'])} | {row['list_seconds']:.1f} | "
            f"{row['plan_seconds']:.1f} | {row['commit_seconds']:.1f} | {row['driver_peak_bytes'] / 2**20:.0f} |"
        )
    lines.append("")
    for size, ratio in r["nights_ratio"].items():
        plan = r["plan_nights_ratio"][size]
        lines.append(f"at {int(size):,} files: most nights / one night = {ratio:.2f} (listing + planning {plan:.2f})")
    for k, ratio in r["size_ratio"].items():
        listing = r["list_size_ratio"][k]
        lines.append(
            f"with {k} night(s) behind: largest / smallest archive = {ratio:.2f}, listing alone {listing:.2f} "
            f"(files x{r['size_factor']:g})"
        )
    cpu = r["cpu"]
    return "\n".join(lines) + f"\n\nCPU: {cpu['model']}; features: {', '.join(cpu['flags']) or 'none'}"
