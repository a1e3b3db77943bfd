import collections
import os
import shutil

import pytest

from mura_ray.archive.catalog import CATALOG_SCHEMA, build_catalog, parse_parts, scan_archive
from mura_ray.archive.sample import write_sample
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


# Edge cases of real archives: CSVs that list a file twice, hold a malformed row or are not UTF-8; folders
# that cannot be read; trees deeper than Python's recursion limit; links that lead out of the archive.


def _mura_csv(root, split="valid", name="image_paths"):
    return os.path.join(root, "MURA-v1.1", f"{split}_{name}.csv")


def test_a_path_listed_twice_in_a_csv_is_one_row_and_counted(tmp_path):
    root = str(tmp_path / "archive")
    write_sample(root, studies=6, seed=3)
    before = scan_archive(root).table
    with open(_mura_csv(root)) as f:
        first = f.readline()
    with open(_mura_csv(root), "a") as f:
        f.write(first)  # the same line again
        f.write(first.replace("MURA-v1.1/", "mura-v1.1/", 1))  # and the same file as the CSVs' other spelling
    scan = scan_archive(root)
    uris = scan.table["image_uri"].to_pylist()
    assert len(uris) == len(set(uris)) == before.num_rows
    assert scan.table["label"].to_pylist() == before["label"].to_pylist()
    assert len(scan.duplicate_csv_rows) == 2
    assert all("valid_image_paths.csv line" in d for d in scan.duplicate_csv_rows)


def test_malformed_csv_rows_are_counted_and_the_rest_catalogued(tmp_path):
    root = str(tmp_path / "archive")
    write_sample(root, studies=6, seed=3)
    before = scan_archive(root).table
    with open(_mura_csv(root), "a") as f:
        f.write("MURA-v1.1/valid/XR_HAND/patient1/study1_positive/image1.png,1,extra\n")
    with open(_mura_csv(root, name="labeled_studies"), "a") as f:
        f.write("MURA-v1.1/valid/XR_HAND/patient1/study1_positive/;yes\n")
    scan = scan_archive(root)
    assert scan.table.num_rows == before.num_rows
    assert scan.table["label"].to_pylist() == before["label"].to_pylist()
    assert len(scan.bad_csv_rows) == 2
    assert any("valid_image_paths.csv line" in b and "extra" in b for b in scan.bad_csv_rows)
    assert any("valid_labeled_studies.csv line" in b and "yes" in b for b in scan.bad_csv_rows)


def test_a_latin1_csv_is_read_with_a_fallback_and_a_line_naming_it(tmp_path, small_archive, caplog):
    root, plan = small_archive
    study = tmp_path / "MURA-v1.1" / "valid" / "XR_HAND" / "patient00001" / "study1_positive"
    study.mkdir(parents=True)
    shutil.copy(os.path.join(root, plan[0].rel_path), study / "radiografía1.png")  # named in UTF-8 on disk
    rel = "MURA-v1.1/valid/XR_HAND/patient00001/study1_positive/"
    (tmp_path / "MURA-v1.1" / "valid_image_paths.csv").write_bytes(f"{rel}radiografía1.png\n".encode("latin-1"))
    (tmp_path / "MURA-v1.1" / "valid_labeled_studies.csv").write_text(f"{rel},0\n")  # the CSV, not the folder
    with caplog.at_level("INFO", logger="mura_ray"):
        scan = scan_archive(str(tmp_path))
    rows = scan.table.to_pylist()
    assert [r["image_uri"] for r in rows] == [str(study / "radiografía1.png")]
    assert rows[0]["label"] == 0 and rows[0]["split"] == "valid"
    csv_uri = str(tmp_path / "MURA-v1.1" / "valid_image_paths.csv")
    assert scan.csv_encodings == {csv_uri: "cp1252"}
    assert [r.getMessage() for r in caplog.records if csv_uri in r.getMessage()] == [
        f"{csv_uri} is not UTF-8: read as cp1252"
    ]


# Run in a child process without the capabilities that let root read any folder (CAP_DAC_OVERRIDE,
# CAP_DAC_READ_SEARCH: dropped from its bounding set before it starts, so its root user is held to the
# folders' modes); as another user it needs nothing dropped.
_LIST_IN_CHILD = """
import json, os, sys
from mura_ray.archive.catalog import scan_archive
locked = sys.argv[2]
try:
    os.listdir(locked)
    readable = True
except PermissionError:
    readable = False
scan = scan_archive(sys.argv[1])
print(json.dumps({"readable": readable, "uris": scan.table["image_uri"].to_pylist(),
                  "unreadable": getattr(scan, "unreadable", None)}))
"""


def _without_read_override():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP; fails harmlessly where the process has neither


@pytest.mark.parametrize("mode", [0o000, 0o444], ids=["no permission", "names readable, entries not"])
def test_an_unreadable_folder_is_counted_and_named(tmp_path, small_archive, mode):
    import json
    import subprocess
    import sys

    root, plan = small_archive
    for name in ("open", "locked"):
        (tmp_path / name).mkdir()
        shutil.copy(os.path.join(root, plan[0].rel_path), tmp_path / name / "x.png")
    locked = tmp_path / "locked"
    locked.chmod(mode)
    try:
        child = subprocess.run(
            [sys.executable, "-c", _LIST_IN_CHILD, str(tmp_path), str(locked)],
            capture_output=True,
            text=True,
            timeout=120,
            preexec_fn=_without_read_override,
        )
    finally:
        locked.chmod(0o755)
    assert child.returncode == 0, child.stderr[-3000:]
    out = json.loads(child.stdout.splitlines()[-1])
    # The folder really cannot be listed by the process that scans it; or, without search permission, its
    # names can be listed but not its files' sizes and times.
    assert out["readable"] is (mode == 0o444)
    assert out["uris"] == [str(tmp_path / "open" / "x.png")]
    assert out["unreadable"] == [str(locked)]


def test_a_tree_deeper_than_the_recursion_limit_is_listed(tmp_path, small_archive):
    import sys

    root, plan = small_archive
    depth = 1100  # about 2,200 characters more of path: deeper than Python's default recursion limit, under PATH_MAX
    deep = str(tmp_path)
    for _ in range(depth):  # one at a time: os.makedirs recurses too
        deep = os.path.join(deep, "d")
        os.mkdir(deep)
    try:
        shutil.copy(os.path.join(root, plan[0].rel_path), os.path.join(deep, "x.png"))
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(1000)  # as Python starts, whatever an earlier test raised it to
        try:
            listed = scan_archive(str(tmp_path)).table["image_uri"].to_pylist()
        finally:
            sys.setrecursionlimit(limit)
        assert listed == [os.path.join(deep, "x.png")]
    finally:
        _remove_deep(str(tmp_path / "d"), depth)


def _remove_deep(top, depth):
    """Remove a chain of ``depth`` folders ``top/d/d/...`` from the bottom up (``shutil.rmtree`` recurses)."""
    path = os.path.join(top, *["d"] * (depth - 1))
    for name in os.listdir(path):
        os.unlink(os.path.join(path, name))
    for _ in range(depth):
        os.rmdir(path)
        path = os.path.dirname(path)


def test_links_out_of_the_root_are_skipped_and_counted_unless_asked_for(tmp_path):
    root, outside = tmp_path / "archive", tmp_path / "elsewhere"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    outside.mkdir()
    (root / "a" / "x.png").write_bytes(b"inside")
    (outside / "secret.png").write_bytes(b"outside the archive")
    os.symlink("../a/x.png", root / "b" / "in.png")
    os.symlink(outside / "secret.png", root / "b" / "out.png")
    os.symlink("in.png", root / "b" / "in-to-in.png")  # a link to a link inside: inside
    os.symlink(os.path.join("..", "..", "elsewhere", "secret.png"), root / "a" / "up.png")  # relative, outside
    inside = sorted(str(root / p) for p in ("a/x.png", "b/in.png", "b/in-to-in.png"))
    outs = sorted(str(root / p) for p in ("a/up.png", "b/out.png"))

    default = scan_archive(str(root))
    assert default.table["image_uri"].to_pylist() == inside
    assert default.links_not_followed == outs
    followed = scan_archive(str(root), follow_links="all")
    assert followed.table["image_uri"].to_pylist() == sorted(inside + outs) and followed.links_not_followed == []
    none = scan_archive(str(root), follow_links="none")
    assert none.table["image_uri"].to_pylist() == [str(root / "a" / "x.png")]
    assert none.links_not_followed == sorted(inside[1:] + outs)
    # The root itself may be a link: what is inside is judged from where it leads.
    os.symlink(root, tmp_path / "via-link")
    via = scan_archive(str(tmp_path / "via-link"))
    assert via.table.num_rows == 3 and len(via.links_not_followed) == 2


@pytest.mark.parametrize("verb", ["score", "evaluate", "explain", "train"])
def test_follow_links_is_an_option_of_every_verb_that_lists_an_archive(verb, capsys):
    from mura_ray.cli import main

    with pytest.raises(SystemExit):
        main([verb, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--follow-links {inside,all,none}" in text and "(default inside)" in text
