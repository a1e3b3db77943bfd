"""Read an archive root into a catalog: one Arrow row per image.

Columns (``CATALOG_SCHEMA``): ``image_uri``, ``split``, ``body_part``,
``patient_id``, ``study_uri``, ``label`` (1 abnormal, 0 normal, null when
unknown), and ``source_size`` / ``source_etag`` from the listing.

Where labels come from, first match wins:
1. MURA's CSVs (``{split}_image_paths.csv`` and ``{split}_labeled_studies.csv``)
   in the root or in ``ROOT/MURA-v1.1``;
2. folder names (``XR_<PART>/patientNNNNN/studyK_{positive,negative}/``);
3. nothing: any tree of images is accepted, with null labels.

Every image file under the root is in the catalog once, also one the CSVs
do not list (it gets its labels from its folders), so a scoring run misses
nothing. Files that are not images (by extension: PNG, JPEG, DICOM, any
case) are left out and counted; so are files the CSVs list that are not
there, and symbolic links that lead nowhere.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import stat
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from mura_ray.archive import storage
from mura_ray.archive.sample import FINDINGS_CSV
from mura_ray.errors import UsageError

# Files the catalog and the scorer treat as images (compared lower-case).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


CATALOG_SCHEMA = pa.schema(
    [
        ("image_uri", pa.string()),
        ("split", pa.string()),
        ("body_part", pa.string()),
        ("patient_id", pa.string()),
        ("study_uri", pa.string()),
        ("label", pa.int8()),
        ("source_size", pa.int64()),
        ("source_etag", pa.string()),
    ]
)
SPLITS = ("train", "valid", "test")
_PART = re.compile(r"^XR_([A-Z]+)$", re.IGNORECASE)
_PATIENT = re.compile(r"^patient\d+$", re.IGNORECASE)
_STUDY = re.compile(r"^study\d+_(positive|negative)$", re.IGNORECASE)


@dataclass
class Listing:
    """Files under a root: image files with their listing info, the other files, links that lead nowhere."""

    images: dict[str, dict[str, Any]]  # path inside fs -> info
    others: list[str]
    broken_links: list[str] = field(default_factory=list)


def _follow(path: str) -> dict[str, Any] | None:
    """Listing info of the file a local symbolic link leads to; None for a folder, {} when it leads nowhere."""
    try:
        st = os.stat(path)
    except OSError:
        return {}
    if not stat.S_ISREG(st.st_mode):
        return None
    return {
        "name": path,
        "type": "file",
        "size": st.st_size,
        "mtime": st.st_mtime,
        "created": st.st_ctime,
        "ino": st.st_ino,
    }


def list_archive(fs, base: str) -> Listing:
    """One recursive listing of ``base``; image files are kept, other files counted.

    Local symbolic links to files are followed (the link's path is the
    image's URI, the target's size and times its fingerprint); links to
    folders are not, so a loop of them does no harm; links that lead
    nowhere are counted."""
    found = fs.find(base, detail=True)
    images: dict[str, dict[str, Any]] = {}
    others: list[str] = []
    broken: list[str] = []
    for path, info in found.items():
        if info.get("islink"):
            info = _follow(path)
            if info is None:
                continue
            if not info:
                broken.append(path)
                continue
        if info.get("type", "file") != "file":
            continue
        if is_image_name(path):
            images[path] = info
        else:
            others.append(path)
    return Listing(images=images, others=sorted(others), broken_links=sorted(broken))


def parse_parts(path: str, rel_path: str | None = None) -> dict[str, Any]:
    """Split, body part, patient and folder label from the folders of an image path.

    MURA's folders (``XR_<PART>``, ``patientNNNNN``, ``studyK_<label>``) are read
    from the whole path; the split is the folder just above ``XR_<PART>``, or
    else a ``train``/``valid``/``test`` folder inside the archive (``rel_path``).
    """
    out: dict[str, Any] = {"split": None, "body_part": None, "patient_id": None, "label": None}
    comps = path.split("/")[:-1]
    for i, comp in enumerate(comps):
        if m := _PART.match(comp):
            out["body_part"] = m.group(1).upper()
            if i and comps[i - 1].lower() in SPLITS:
                out["split"] = comps[i - 1].lower()
        elif _PATIENT.match(comp):
            out["patient_id"] = comp
        elif m := _STUDY.match(comp):
            out["label"] = 1 if m.group(1).lower() == "positive" else 0
    if out["split"] is None and rel_path is not None:
        out["split"] = next((c.lower() for c in rel_path.split("/")[:-1] if c.lower() in SPLITS), None)
    return out


def _csv_dir(fs, base: str, listing: Listing) -> str | None:
    """The folder holding MURA's CSVs: the root, or its ``MURA-v1.1`` folder (in any case)."""
    names = {f"{split}_image_paths.csv" for split in SPLITS}
    found = sorted(posixpath.dirname(p) for p in listing.others if posixpath.basename(p) in names)
    for d in found:
        if d == base:
            return d
    for d in found:
        if posixpath.dirname(d) == base and posixpath.basename(d).lower() == "mura-v1.1":
            return d
    return None


def _read_lines(fs, path: str) -> list[tuple[int, str]]:
    text = storage.read_bytes(fs, path).decode("utf-8-sig")
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def _csv_rows(fs, csv_dir: str, listing: Listing, missing: list[str]) -> list[dict[str, Any]]:
    """Rows from MURA's CSVs. Their paths start with the archive folder's name (``MURA-v1.1/...``),
    whatever case that folder has on disk. A listed file that is not there goes to ``missing``."""
    name = posixpath.basename(csv_dir)

    def resolve(rel: str) -> str:
        first, _, rest = rel.partition("/")
        return storage.join(csv_dir, rest) if first.lower() == name.lower() and rest else storage.join(csv_dir, rel)

    rows: list[dict[str, Any]] = []
    for split in SPLITS:
        paths_csv = storage.join(csv_dir, f"{split}_image_paths.csv")
        if not fs.exists(paths_csv):
            continue
        labels: dict[str, int] = {}
        studies_csv = storage.join(csv_dir, f"{split}_labeled_studies.csv")
        if fs.exists(studies_csv):
            for n, line in _read_lines(fs, studies_csv):
                study, sep, value = line.rpartition(",")
                if not sep or value.strip() not in ("0", "1"):
                    raise UsageError(
                        f"{storage.to_uri(fs, studies_csv)} line {n}: expected 'study_dir/,0|1', got {line[:120]!r}"
                    )
                labels[resolve(study.strip()).rstrip("/")] = int(value)
        for n, line in _read_lines(fs, paths_csv):
            if "," in line or not is_image_name(line):
                raise UsageError(
                    f"{storage.to_uri(fs, paths_csv)} line {n}: expected one image path (.png/.jpg/.dcm), "
                    f"got {line[:120]!r}"
                )
            path = resolve(line)
            info = listing.images.get(path)
            if info is None:
                missing.append(storage.to_uri(fs, path))
                continue
            study = posixpath.dirname(path)
            parts = parse_parts(path)
            label = labels.get(study, parts["label"])
            rows.append(
                dict(
                    image_uri=storage.to_uri(fs, path),
                    split=split,
                    body_part=parts["body_part"],
                    patient_id=parts["patient_id"],
                    study_uri=storage.to_uri(fs, study),
                    label=label,
                    source_size=info.get("size"),
                    source_etag=storage.source_tag(info),
                )
            )
    return rows


def _tree_rows(fs, base: str, listing: Listing) -> list[dict[str, Any]]:
    rows = []
    for path, info in listing.images.items():
        parts = parse_parts(path, posixpath.relpath(path, base))
        rows.append(
            dict(
                image_uri=storage.to_uri(fs, path),
                split=parts["split"],
                body_part=parts["body_part"],
                patient_id=parts["patient_id"],
                study_uri=storage.to_uri(fs, posixpath.dirname(path)),
                label=parts["label"],
                source_size=info.get("size"),
                source_etag=storage.source_tag(info),
            )
        )
    return rows


@dataclass
class Scan:
    """A catalog, the non-image files its listing skipped, the files the CSVs list that are not there,
    and the links that lead nowhere."""

    table: pa.Table
    ignored: list[str]
    missing: list[str] = field(default_factory=list)
    broken_links: list[str] = field(default_factory=list)


def build_catalog(root: str, *, split: str | None = None) -> pa.Table:
    """Catalog of the archive at ``root`` (path or s3:// URI), sorted by ``image_uri``.

    ``split`` keeps only that split. Raises ``UsageError`` naming what was
    found when the root holds no usable images.
    """
    return scan_archive(root, split=split).table


def scan_archive(root: str, *, split: str | None = None) -> Scan:
    """``build_catalog`` plus the URIs of the non-image files found (MURA's CSVs excepted)."""
    fs, base = storage.filesystem(root)
    if not fs.exists(base):
        raise UsageError(f"archive root not found: {root!r}")
    if not fs.isdir(base):
        raise UsageError(f"archive root is a file, not a folder: {root!r}")
    listing = list_archive(fs, base)
    csv_dir = _csv_dir(fs, base, listing)
    missing: list[str] = []
    rows = _csv_rows(fs, csv_dir, listing, missing) if csv_dir else []
    listed = {r["image_uri"] for r in rows}
    rows += [r for r in _tree_rows(fs, base, listing) if r["image_uri"] not in listed]
    if not rows:
        seen = ", ".join(posixpath.relpath(p, base) for p in listing.others[:5])
        what = f"{len(listing.others)} other file(s), e.g. {seen}" if listing.others else "nothing"
        raise UsageError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root!r}: found {what}")
    table = pa.Table.from_pylist(rows, schema=CATALOG_SCHEMA).sort_by("image_uri")
    if split is not None:
        table = table.filter(pc.equal(table["split"], split))
        if table.num_rows == 0:
            raise UsageError(f"no images in split {split!r} under {root!r}")
    csvs = re.compile(rf"(^|/)(({'|'.join(SPLITS)})_(image_paths|labeled_studies)\.csv|{re.escape(FINDINGS_CSV)})$")
    ignored = [storage.to_uri(fs, p) for p in listing.others if not csvs.search(p)]
    broken = [storage.to_uri(fs, p) for p in listing.broken_links]
    return Scan(table=table, ignored=ignored, missing=sorted(set(missing)), broken_links=broken)


def fingerprint(table: pa.Table) -> str:
    """A hash of what a catalog holds (paths, labels, sizes, tags), for model cards and run records."""
    h = hashlib.sha256()
    for col in ("image_uri", "label", "source_size", "source_etag"):
        h.update(col.encode())
        h.update(repr(table[col].to_pylist()).encode())
    return h.hexdigest()
