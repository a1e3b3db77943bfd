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


def _epochs(ray_cluster, seed, rows, n=2):
    """The augmented pixels of each of ``n`` epochs of a fresh training view, by row (labels number the rows)."""
    from mura_ray.training.dataset import AugmentationDraws, train_view

    view = train_view(
        ray_cluster.data.from_items(rows), size=32, rotation=30, seed=seed, draws=AugmentationDraws.remote()
    )
    out = []
    for _ in range(n):
        batch = {"pixels": [], "label": []}
        for b in view.iter_batches(batch_size=16, batch_format="numpy"):
            batch["pixels"].append(b["pixels"])
            batch["label"].append(b["label"])
        order = np.argsort(np.concatenate(batch["label"]))
        out.append(np.concatenate(batch["pixels"])[order])
    return out


def test_two_runs_with_the_same_seed_see_the_same_augmented_images(ray_cluster):
    rng = np.random.default_rng(0)
    rows = [
        {
            "image_uri": f"/a/XR_HAND/p{i}/s1/image1.png",
            "pixels": rng.integers(0, 256, (40, 40), dtype=np.uint8),
            "label": i,
        }
        for i in range(48)
    ]
    first, again, other = _epochs(ray_cluster, 7, rows), _epochs(ray_cluster, 7, rows), _epochs(ray_cluster, 8, rows)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))  # epoch by epoch, image by image
    assert not np.array_equal(first[0], first[1])  # each epoch draws anew
    assert not np.array_equal(first[0], other[0])  # another seed, other augmentations
