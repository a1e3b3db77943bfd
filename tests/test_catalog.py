import collections
import os
import shutil

import pytest

from mura_ray.archive.catalog import CATALOG_SCHEMA, build_catalog, parse_parts
from mura_ray.errors import UsageError


def _counts(rows):
    return collections.Counter((r["split"], r["body_part"], r["label"]) for r in rows)


def test_counts_by_split_part_and_label_match_the_generator(small_archive):
    root, plan = small_archive
    table = build_catalog(root)
    assert table.schema == CATALOG_SCHEMA
    rows = table.to_pylist()
    assert len(rows) == len(plan)
    assert _counts(rows) == collections.Counter((i.split, i.body_part, i.label) for i in plan)
    by_uri = {r["image_uri"]: r for r in rows}
    for item in plan:
        row = by_uri[os.path.join(root, item.rel_path)]
        assert row["patient_id"] == item.patient_id
        assert row["study_uri"] == os.path.join(root, item.study_rel).rstrip("/")
        assert row["source_size"] == os.path.getsize(row["image_uri"])
    assert [r["image_uri"] for r in rows] == sorted(by_uri)


def test_root_may_be_the_mura_folder_itself_and_split_filters(small_archive):
    root, plan = small_archive
    valid = build_catalog(os.path.join(root, "MURA-v1.1"), split="valid")
    assert valid.num_rows == sum(i.split == "valid" for i in plan)


def test_labels_from_folder_names_when_csvs_are_absent(small_archive, tmp_path):
    root, plan = small_archive
    shutil.copytree(os.path.join(root, "MURA-v1.1", "train"), tmp_path / "MURA-v1.1" / "train")
    rows = build_catalog(str(tmp_path)).to_pylist()
    expected = collections.Counter((i.split, i.body_part, i.label) for i in plan if i.split == "train")
    assert _counts(rows) == expected


def test_plain_tree_without_labels(tmp_path, small_archive):
    root, plan = small_archive
    (tmp_path / "night 1").mkdir()
    src = os.path.join(root, plan[0].rel_path)
    shutil.copy(src, tmp_path / "night 1" / "a.PNG")
    shutil.copy(src, tmp_path / "b.png")
    (tmp_path / "notes.txt").write_text("not an image")
    rows = build_catalog(str(tmp_path)).to_pylist()
    assert len(rows) == 2
    assert all(r["label"] is None and r["split"] is None for r in rows)


def test_csv_line_with_trailing_slash_and_label():
    parts = parse_parts("/d/MURA-v1.1/valid/XR_WRIST/patient11185/study1_positive/image1.png")
    assert parts == {"split": "valid", "body_part": "WRIST", "patient_id": "patient11185", "label": 1}


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: None, "no images"),
        (lambda p: (p / "x.txt").write_text("hi"), "found 1 other file"),
        (lambda p: (p / "valid_image_paths.csv").write_text("MURA-v1.1/valid/XR_HAND/p/s/image1.png,1\n"), "line 1"),
        (
            lambda p: (
                (p / "train_image_paths.csv").write_text(
                    "MURA-v1.1/train/XR_HAND/patient1/study1_positive/image1.png\n"
                ),
                (p / "train_labeled_studies.csv").write_text("MURA-v1.1/train/XR_HAND/patient1/study1_positive/;yes\n"),
            ),
            "train_labeled_studies.csv line 1",
        ),
    ],
)
def test_unusable_roots_fail_with_one_clear_line(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(UsageError, match=message) as info:
        build_catalog(str(tmp_path))
    assert "\n" not in str(info.value)


def test_missing_root(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        build_catalog(str(tmp_path / "nope"))
