"""What a training batch holds: rows permuted before they become blocks mix patients and body parts."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc

from mura_ray.archive.catalog import build_catalog
from mura_ray.training.dataset import shuffled_rows

BATCH = 32


def _mix(table, column):
    """Mean distinct values of ``column`` per batch of consecutive rows."""
    values = table[column].to_pylist()
    return np.mean([len(set(values[i : i + BATCH])) for i in range(0, len(values) - BATCH + 1, BATCH)])


def test_shuffled_rows_mix_patients_and_body_parts_in_every_batch(learn_archive):
    root, _ = learn_archive
    catalog = build_catalog(root)
    train = catalog.filter(pc.equal(catalog["split"], "train"))  # sorted by path, as the catalog is
    shuffled = shuffled_rows(train, seed=0)
    assert sorted(shuffled["image_uri"].to_pylist()) == sorted(train["image_uri"].to_pylist())
    assert shuffled_rows(train, seed=0).equals(shuffled) and not shuffled_rows(train, seed=1).equals(shuffled)
    sorted_mix = {c: _mix(train, c) for c in ("patient_id", "body_part")}
    mixed = {c: _mix(shuffled, c) for c in ("patient_id", "body_part")}
    print(f"distinct per batch of {BATCH}: sorted by path {sorted_mix}, shuffled {mixed}")
    assert mixed["patient_id"] >= 2 * sorted_mix["patient_id"]
    assert mixed["body_part"] >= 2 * sorted_mix["body_part"]
