"""``mura-ray scores``: the scores table's history, retracting a run, vacuuming files no row needs."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from mura_ray.archive import storage
from mura_ray.errors import UsageError
from mura_ray.scoring.delta import ScoreStore
from mura_ray.scoring.schemas import HEATMAPS

log = logging.getLogger(__name__)

MIN_RETENTION_HOURS = 168


def _store(out: str) -> ScoreStore:
    store = ScoreStore(out)
    if store.table() is None:
        raise UsageError(f"{out!r} holds no scores table ({store.uri} has no Delta log): nothing was scored there")
    return store


def history_lines(out: str, limit: int) -> list[str]:
    """The last ``limit`` commits, newest first, then every run with its totals."""
    store = _store(out)
    lines = [f"{store.uri}: version {store.table().version()}"]
    for c in store.history(limit):
        when = dt.datetime.fromtimestamp(c.get("timestamp", 0) / 1000, dt.timezone.utc).isoformat(timespec="seconds")
        what = c.get("operation", "?")
        if "mura_ray.retracted_run" in c:
            what = f"retracted run {c['mura_ray.retracted_run']}"
        elif "mura_ray.run_id" in c:
            what = f"run {c['mura_ray.run_id']} chunk {c.get('mura_ray.chunk')} ({what})"
        lines.append(f"  version {c.get('version', '?'):>5}  {when}  {what}")
    lines.append("runs (oldest first):")
    for r in store.runs():
        t = r["totals"]
        run = t.get("run", {})
        state = "finished" if r["final"] else f"stopped after {r['chunks']} chunk(s)"
        images = run.get("images", "?") if r["final"] else "?"
        lines.append(
            f"  {r['run_id']:<30} model {r['model_id'][:12]}  {state:<24} images {images}  "
            f"errors {run.get('errors', '?') if r['final'] else '?'}  started {t.get('started_at', '?')}"
        )
    return lines


def retract(out: str, run_id: str) -> dict[str, Any]:
    """Remove every row ``run_id`` wrote, in one commit."""
    store = _store(out)
    images = store.current("image")
    n_images = int(sum(1 for r in images["run_id"].to_pylist() if r == run_id))
    known = run_id in {r["run_id"] for r in store.runs()} or n_images
    if not known:
        raise UsageError(f"run {run_id!r} has no rows in {store.uri}; see: mura-ray scores history --out {out}")
    rows = store.retract(run_id)
    log.info("retracted run %s: %d rows", run_id, rows)
    return {"rows": rows, "images": n_images, "version": store.table().version()}


def orphan_heatmaps(store: ScoreStore, out: str, older_than: float) -> list[str]:
    """PNGs under ``OUT/heatmaps`` that no current heatmap row names, last modified before ``older_than``
    (a POSIX time): a killed run's overlays, or those of retracted or redrawn rows."""
    fs, base = storage.filesystem(out)
    folder = storage.join(base, HEATMAPS)
    if not fs.exists(folder):
        return []
    named = {storage.join(base, p) for p in store.current("heatmap")["heatmap"].to_pylist() if p}
    orphans = []
    for path, info in fs.find(folder, detail=True).items():
        if path in named or not path.endswith(".png"):
            continue
        mtime = _mtime(info)
        if mtime is not None and mtime < older_than:
            orphans.append(path)
    return sorted(orphans)


def _mtime(info: dict[str, Any]) -> float | None:
    for key in ("mtime", "LastModified", "last_modified", "created"):
        value = info.get(key)
        if isinstance(value, dt.datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
    return None


def vacuum_line(r: dict[str, Any], retention_hours: int, *, dry_run: bool = False) -> str:
    """What ``vacuum`` did (``r``), in one line."""
    verb = "would delete" if dry_run else "deleted"
    return (
        f"{verb} {r['data_files']} data files of the table and {r['orphan_heatmaps']} orphan heatmaps "
        f"(older than {retention_hours} h)"
    )


def vacuum(out: str, retention_hours: int, *, dry_run: bool = False) -> dict[str, Any]:
    """Delta vacuum (files no current version needs, replaced more than ``retention_hours`` ago, and files no
    commit named), then the orphan heatmaps older than that."""
    if retention_hours < MIN_RETENTION_HOURS:
        raise UsageError(
            f"--retention-hours {retention_hours} is under {MIN_RETENTION_HOURS} (7 days): a run still at work "
            "could lose the files of the commit it is about to make"
        )
    store = _store(out)
    files = store.vacuum(retention_hours, dry_run=dry_run)
    cutoff = dt.datetime.now(dt.timezone.utc).timestamp() - retention_hours * 3600
    orphans = orphan_heatmaps(store, out, cutoff)
    if not dry_run and orphans:
        fs, _ = storage.filesystem(out)
        fs.rm(orphans)
    return {"data_files": len(files), "orphan_heatmaps": len(orphans), "files": files, "orphans": orphans}
