"""The predictions a model folder keeps: scores, labels and opaque keys, no image path or patient id.

A model folder travels: it is logged to MLflow, registered, and copied into
every registry cache. Its ``tune_predictions.parquet`` and
``valid_predictions.parquet`` (what ``ensemble`` and ``monitor`` read)
therefore name images, studies and patients by their rank among the split's
sorted paths and ids (``image`` i0…, ``study`` s0…, ``patient`` p0…): enough to
group images into studies and resample patients, and the same in every
model trained on the same images, but nothing that says whose they are. The
split's set of paths is named by one hash over all of them
(``mura_ray.images_sha256`` in the Parquet metadata), so an ensemble can
check its members saw the same images. ``train --keep-predictions`` keeps
the paths and ids in the model folder too; the run directory always has
them.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

IDENTIFIERS = ("image_uri", "study_uri", "patient_id")
KEYS = ("image", "study", "patient")
DIGEST = b"mura_ray.images_sha256"


def _ranks(values: list[str | None], prefix: str) -> pa.Array:
    """Each value as ``prefix`` + its rank among the sorted distinct values, zero-padded so that the names
    sort as the values do; None stays None."""
    distinct = sorted({v for v in values if v is not None})
    width = len(str(max(len(distinct) - 1, 0)))
    rank = {v: f"{prefix}{k:0{width}d}" for k, v in enumerate(distinct)}
    return pa.array([None if v is None else rank[v] for v in values], pa.string())


def images_digest(image_uris: list[str]) -> str:
    """One sha256 over a split's sorted image paths."""
    return hashlib.sha256("\n".join(sorted(image_uris)).encode()).hexdigest()


def keyed(predictions: pa.Table, *, keep_identifiers: bool = False) -> pa.Table:
    """``predictions`` (``image_uri``, ``study_uri``, ``patient_id``, ``body_part``, ``label``, scores) sorted
    by image, with ``image``, ``study`` and ``patient`` keys in front and the paths and ids dropped (kept
    after the keys with ``keep_identifiers``). A table that is keyed already is returned as it is."""
    if "image_uri" not in predictions.column_names:
        return predictions
    table = predictions.sort_by("image_uri")
    keys = {key: _ranks(table[name].to_pylist(), key[0]) for key, name in zip(KEYS, IDENTIFIERS)}
    rest = [c for c in table.column_names if c not in IDENTIFIERS]
    columns = {**keys, **{c: table[c] for c in rest}}
    if keep_identifiers:
        columns.update({c: table[c] for c in IDENTIFIERS})
    digest = images_digest(table["image_uri"].to_pylist())
    return pa.table(columns).replace_schema_metadata({DIGEST: digest.encode()})


def digest_of(table: pa.Table) -> str | None:
    return ((table.schema.metadata or {}).get(DIGEST) or b"").decode() or None


def same_images(tables: list[pa.Table]) -> bool:
    """Whether keyed predictions hold the same images with the same labels, in the same order."""
    first = tables[0]
    return all(
        digest_of(t) == digest_of(first)
        and np.array_equal(t["label"].to_numpy(), first["label"].to_numpy())
        and t["study"].equals(first["study"])
        for t in tables[1:]
    )
