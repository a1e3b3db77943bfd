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

What a real archive holds beside its images is counted, never fatal, and
each kind is one line of the log (``Scan.notices``): CSV rows that are
malformed or list a file listed before (the file gets one row), CSVs that
are not UTF-8 (read as cp1252, else Latin-1), folders that cannot be
listed, and links not followed. Local folders are walked one at a time from
a stack, so a tree of any depth is listed. ``follow_links`` says which
symbolic links to files are followed: ``inside`` (the default) those whose
target, every link on the way resolved, is inside the archive root;
``all``; ``none``. Links to folders are never followed, so a loop of them
does no harm.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import os
import posixpath
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from mura_ray.archive import storage
from mura_ray.archive.sample import FINDINGS_CSV
from mura_ray.errors import UsageError

log = logging.getLogger(__name__)

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
# --follow-links: which local symbolic links to files are followed (links to folders never are).
FOLLOW_LINKS = ("inside", "all", "none")
# A CSV that is not UTF-8 is read as the first of these that decodes it (Latin-1 decodes anything).
CSV_ENCODINGS = ("utf-8-sig", "cp1252", "latin-1")


@dataclass
class Listing:
    """Files under a root: image files with their listing info, the other files, links that lead nowhere,
    links the ``follow_links`` setting does not follow, and the folders that could not be listed (with why)."""

    images: dict[str, dict[str, Any]]  # path inside fs -> info
    others: list[str]
    broken_links: list[str] = field(default_factory=list)
    links_not_followed: list[str] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)  # folder -> reason


def _follow(path: str) -> dict[str, Any] | None:
    """Listing info of the file a local symbolic link leads to; None for a folder, {} when it leads nowhere."""
    try:
        st = os.stat(path)
    except OSError:
        return {}
    if not stat.S_ISREG(st.st_mode):
        return None
    return dict(storage.local_info(st), name=path, type="file")


def _walk(fs, base: str) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Every entry under ``base`` but folders (path -> listing info), and the folders that could not be listed
    (path -> reason). Object storage is listed flat; a local tree one folder at a time from a stack, so its
    depth is not bounded by Python's recursion limit, and a folder that cannot be listed is named, not
    skipped in silence (as ``fs.find`` does)."""
    if not storage.is_local(fs):
        return fs.find(base, detail=True), {}
    found: dict[str, dict[str, Any]] = {}
    unreadable: dict[str, str] = {}
    stack = [base]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as exc:  # no permission; or removed since its parent was listed
            unreadable[folder] = f"{type(exc).__name__}: {exc.strerror or exc}"
            continue
        files: dict[str, dict[str, Any]] = {}
        folders: list[str] = []
        try:
            for entry in entries:
                path = entry.path
                try:
                    if entry.is_symlink():  # followed or not by list_archive; a link to a folder never
                        files[path] = {"name": path, "type": "other", "islink": True}
                    elif entry.is_dir(follow_symlinks=False):
                        folders.append(path)
                    else:
                        st = entry.stat(follow_symlinks=False)
                        kind = "file" if stat.S_ISREG(st.st_mode) else "other"
                        files[path] = dict(storage.local_info(st), name=path, type=kind)
                except FileNotFoundError:  # removed since its folder was listed
                    continue
        except OSError as exc:  # names readable but not the entries (a folder with r but not x permission)
            unreadable[folder] = f"{type(exc).__name__}: {exc.strerror or exc}"
            continue
        found.update(files)
        stack.extend(folders)
    return found, unreadable


def _inside(path: str, real_base: str) -> bool:
    """Whether the file a link at ``path`` leads to, every link on the way resolved, is under ``real_base``."""
    return os.path.commonpath([os.path.realpath(path), real_base]) == real_base


def list_archive(fs, base: str, follow_links: str = "inside") -> Listing:
    """One listing of ``base``; image files are kept, other files counted.

    Local symbolic links to files are followed as ``follow_links`` says
    (``FOLLOW_LINKS``): the link's path is the image's URI, the target's
    size and times its fingerprint. Links to folders are not followed, so a
    loop of them does no harm; links that lead nowhere are counted, and so
    are those not followed."""
    if follow_links not in FOLLOW_LINKS:
        raise ValueError(f"follow_links must be one of {', '.join(FOLLOW_LINKS)}, got {follow_links!r}")
    found, unreadable = _walk(fs, base)
    real_base = os.path.realpath(base) if storage.is_local(fs) else base
    images: dict[str, dict[str, Any]] = {}
    others: list[str] = []
    broken: list[str] = []
    not_followed: list[str] = []
    for path, info in found.items():
        if info.get("islink"):
            info = _follow(path)
            if info is None:
                continue
            if not info:
                broken.append(path)
                continue
            if follow_links == "none" or (follow_links == "inside" and not _inside(path, real_base)):
                not_followed.append(path)
                continue
        if info.get("type", "file") != "file":
            continue
        if is_image_name(path):
            images[path] = info
        else:
            others.append(path)
    return Listing(
        images=images,
        others=sorted(others),
        broken_links=sorted(broken),
        links_not_followed=sorted(not_followed),
        unreadable=dict(sorted(unreadable.items())),
    )


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


@dataclass
class CsvFindings:
    """What reading MURA's CSVs found besides rows: files the CSVs list that are not there, rows that are
    malformed or list a file listed before (``URI line N: ...``), and the CSVs that are not UTF-8 (URI ->
    the encoding they were read with)."""

    missing: list[str] = field(default_factory=list)
    bad_rows: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    encodings: dict[str, str] = field(default_factory=dict)


def _read_lines(fs, path: str, found: CsvFindings) -> list[tuple[int, str]]:
    """The non-empty lines of a CSV with their numbers, decoded as the first of ``CSV_ENCODINGS`` that fits."""
    data = storage.read_bytes(fs, path)
    for encoding in CSV_ENCODINGS:
        try:
            text = data.decode(encoding)
            break
        except UnicodeDecodeError:
            continue
    if encoding != CSV_ENCODINGS[0]:
        found.encodings[storage.to_uri(fs, path)] = encoding
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def _study_labels(fs, studies_csv: str, resolve: Any, found: CsvFindings) -> dict[str, int]:
    """Study folder -> label from a ``*_labeled_studies.csv``; malformed rows go to ``found.bad_rows``."""
    labels: dict[str, int] = {}
    for n, line in _read_lines(fs, studies_csv, found):
        study, sep, value = line.rpartition(",")
        if not sep or value.strip() not in ("0", "1"):
            found.bad_rows.append(
                f"{storage.to_uri(fs, studies_csv)} line {n}: expected 'study_dir/,0|1', got {line[:120]!r}"
            )
            continue
        labels[resolve(study.strip()).rstrip("/")] = int(value)
    return labels


def _csv_rows(fs, csv_dir: str, listing: Listing, found: CsvFindings) -> list[dict[str, Any]]:
    """Rows from MURA's CSVs, one per file however often they list it. Their paths start with the archive
    folder's name (``MURA-v1.1/...``), whatever case that folder has on disk. A listed file that is not there,
    a malformed row and a row that lists a file listed before (in any split's CSV) go to ``found``."""
    name = posixpath.basename(csv_dir)

    def resolve(rel: str) -> str:
        first, _, rest = rel.partition("/")
        return storage.join(csv_dir, rest) if first.lower() == name.lower() and rest else storage.join(csv_dir, rel)

    rows: list[dict[str, Any]] = []
    first_seen: dict[str, str] = {}  # path -> "CSV line N" where it was first listed
    for split in SPLITS:
        paths_csv = storage.join(csv_dir, f"{split}_image_paths.csv")
        if not fs.exists(paths_csv):
            continue
        studies_csv = storage.join(csv_dir, f"{split}_labeled_studies.csv")
        labels = _study_labels(fs, studies_csv, resolve, found) if fs.exists(studies_csv) else {}
        csv_uri = storage.to_uri(fs, paths_csv)
        for n, line in _read_lines(fs, paths_csv, found):
            if "," in line or not is_image_name(line):
                found.bad_rows.append(
                    f"{csv_uri} line {n}: expected one image path (.png/.jpg/.dcm), got {line[:120]!r}"
                )
                continue
            path = resolve(line)
            if path in first_seen:
                found.duplicates.append(f"{csv_uri} line {n}: {line[:120]!r} is listed before, at {first_seen[path]}")
                continue
            first_seen[path] = f"{posixpath.basename(paths_csv)} line {n}"
            info = listing.images.get(path)
            if info is None:
                found.missing.append(storage.to_uri(fs, path))
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
    """A row per listed image, its labels from its folders (parsed once per folder)."""
    rows = []
    folders: dict[str, tuple[dict[str, Any], str]] = {}  # folder -> (its parse_parts, its URI)
    prefix = base.rstrip("/") + "/"
    for path, info in listing.images.items():
        folder = path.rpartition("/")[0]
        known = folders.get(folder)
        if known is None:
            rel = path[len(prefix) :] if path.startswith(prefix) else posixpath.relpath(path, base)
            known = folders[folder] = (parse_parts(path, rel), storage.to_uri(fs, folder))
        parts, study_uri = known
        rows.append(
            dict(
                image_uri=storage.to_uri(fs, path),
                split=parts["split"],
                body_part=parts["body_part"],
                patient_id=parts["patient_id"],
                study_uri=study_uri,
                label=parts["label"],
                source_size=info.get("size"),
                source_etag=storage.source_tag(info),
            )
        )
    return rows


@dataclass
class Scan:
    """A catalog, the non-image files its listing skipped, the files the CSVs list that are not there, the
    links that lead nowhere, and what else the listing and the CSVs found (see the module's docstring);
    ``notices`` says each kind found in one line."""

    table: pa.Table
    ignored: list[str]
    missing: list[str] = field(default_factory=list)
    broken_links: list[str] = field(default_factory=list)
    links_not_followed: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    bad_csv_rows: list[str] = field(default_factory=list)
    duplicate_csv_rows: list[str] = field(default_factory=list)
    csv_encodings: dict[str, str] = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """The counts a run records in its manifest."""
        return {
            "unreadable_folders": len(self.unreadable),
            "links_not_followed": len(self.links_not_followed),
            "bad_csv_rows": len(self.bad_csv_rows),
            "duplicate_csv_rows": len(self.duplicate_csv_rows),
            "csvs_not_utf8": len(self.csv_encodings),
        }


def build_catalog(root: str, *, split: str | None = None, follow_links: str = "inside") -> pa.Table:
    """Catalog of the archive at ``root`` (path or s3:// URI), sorted by ``image_uri``.

    ``split`` keeps only that split; ``follow_links`` (``FOLLOW_LINKS``)
    which symbolic links to files are followed. Raises ``UsageError``
    naming what was found when the root holds no usable images.
    """
    return scan_archive(root, split=split, follow_links=follow_links).table


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block (reference counting still frees everything)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def scan_archive(root: str, *, split: str | None = None, follow_links: str = "inside") -> Scan:
    """``build_catalog`` plus the URIs of the non-image files found (MURA's CSVs excepted) and what else the
    listing and the CSVs found, each kind logged as one line."""
    fs, base = storage.filesystem(root)
    if not fs.exists(base):
        raise UsageError(f"archive root not found: {root!r}")
    if not fs.isdir(base):
        raise UsageError(f"archive root is a file, not a folder: {root!r}")
    with _collector_paused():  # a million small acyclic dicts: the cyclic collector's passes would be wasted
        listing = list_archive(fs, base, follow_links)
        csv_dir = _csv_dir(fs, base, listing)
        found = CsvFindings()
        rows = _csv_rows(fs, csv_dir, listing, found) if csv_dir else []
        listed = {r["image_uri"] for r in rows}
        rows += [r for r in _tree_rows(fs, base, listing) if r["image_uri"] not in listed]
    if not rows:
        raise UsageError(_no_images(root, base, listing, found))
    table = pa.Table.from_pylist(rows, schema=CATALOG_SCHEMA).sort_by("image_uri")
    if split is not None:
        table = table.filter(pc.equal(table["split"], split))
        if table.num_rows == 0:
            raise UsageError(f"no images in split {split!r} under {root!r}")
    csvs = re.compile(rf"(^|/)(({'|'.join(SPLITS)})_(image_paths|labeled_studies)\.csv|{re.escape(FINDINGS_CSV)})$")
    scan = Scan(
        table=table,
        ignored=[storage.to_uri(fs, p) for p in listing.others if not csvs.search(p)],
        missing=sorted(set(found.missing)),
        broken_links=[storage.to_uri(fs, p) for p in listing.broken_links],
        links_not_followed=[storage.to_uri(fs, p) for p in listing.links_not_followed],
        unreadable=[storage.to_uri(fs, p) for p in listing.unreadable],
        bad_csv_rows=found.bad_rows,
        duplicate_csv_rows=found.duplicates,
        csv_encodings=found.encodings,
    )
    scan.notices = _notices(scan, listing, follow_links)
    for line in scan.notices:
        log.warning("%s", line)
    return scan


def _no_images(root: str, base: str, listing: Listing, found: CsvFindings) -> str:
    """The one line of a root without usable images: what it holds instead, and what could not be read."""
    seen = ", ".join(posixpath.relpath(p, base) for p in listing.others[:5])
    what = f"{len(listing.others)} other file(s), e.g. {seen}" if listing.others else "nothing"
    text = f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root!r}: found {what}"
    if found.bad_rows:
        text += f"; {len(found.bad_rows)} bad CSV row(s), e.g. {found.bad_rows[0]}"
    if listing.unreadable:
        folder, reason = next(iter(listing.unreadable.items()))
        text += f"; {len(listing.unreadable)} folder(s) could not be listed, e.g. {folder!r} ({reason})"
    return text


def _notices(scan: Scan, listing: Listing, follow_links: str) -> list[str]:
    """One line for each kind of thing the scan found that is not in the catalog, or not as listed."""
    lines = [f"{uri} is not UTF-8: read as {encoding}" for uri, encoding in scan.csv_encodings.items()]
    if scan.bad_csv_rows:
        lines.append(f"bad CSV rows: {len(scan.bad_csv_rows)} skipped, e.g. {scan.bad_csv_rows[0]}")
    if scan.duplicate_csv_rows:
        lines.append(
            f"duplicate CSV rows: {len(scan.duplicate_csv_rows)} list a file listed before (it has one row), "
            f"e.g. {scan.duplicate_csv_rows[0]}"
        )
    if scan.unreadable:
        reason = next(iter(listing.unreadable.values()))
        lines.append(
            f"unreadable folders: {len(scan.unreadable)} could not be listed, their files are left out, "
            f"e.g. {scan.unreadable[0]} ({reason})"
        )
    if scan.links_not_followed:
        which = "lead outside the archive" if follow_links == "inside" else "lead to files"
        lines.append(
            f"links not followed (--follow-links {follow_links}): {len(scan.links_not_followed)} {which}, "
            f"e.g. {scan.links_not_followed[0]}"
        )
    return lines


def fingerprint(table: pa.Table) -> str:
    """A hash of what a catalog holds (paths, labels, sizes, tags), for model cards and run records."""
    h = hashlib.sha256()
    for col in ("image_uri", "label", "source_size", "source_etag"):
        h.update(col.encode())
        h.update(repr(table[col].to_pylist()).encode())
    return h.hexdigest()
