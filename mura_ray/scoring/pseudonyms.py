"""Keyed pseudonyms for scoring output: no image path, study path or patient id leaves the driver.

With ``score --pseudonymize KEY_FILE`` (or ``MURA_RAY_PSEUDONYM_KEY_FILE``)
every identifier a row, a log line or a file name would carry is replaced by
an HMAC-SHA256 of it under the key, cut to 128 bits (32 hex digits)::

    study_uri   S<hmac(key, "study", study_uri)>
    image_uri   <study_uri>/I<hmac(key, "image", image_uri)>   (the study's images share their folder)
    patient_id  P<hmac(key, "patient", patient_id)>

The same key gives the same pseudonyms every night, so the scores table's
"already scored" check (which keys on ``image_uri`` and the source
fingerprint) works on pseudonymized output as on plain output, and a
study's images still share its ``study_uri``. The driver keeps the
pseudonym -> path map in memory to read the files; it is written to disk
only where ``--pseudonym-map`` says. An output holds rows of one key only:
its run rows record the key's id (an HMAC of a constant, not the key).
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import os
import re
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from mura_ray.archive import storage
from mura_ray.errors import UsageError

ENV = "MURA_RAY_PSEUDONYM_KEY_FILE"
MIN_KEY_BYTES = 32
DIGITS = 32  # hex digits kept of each HMAC: 128 bits
REDACTED = "<path>"


def read_key(path: str, source: str) -> bytes:
    """The key held by ``path`` (trailing line ends dropped), or ``UsageError`` naming ``source`` when the file
    is missing, empty or shorter than ``MIN_KEY_BYTES``."""
    try:
        fs, p = storage.filesystem(path)
        key = storage.read_bytes(fs, p)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        reason = "is not readable" if isinstance(exc, PermissionError) else "does not exist"
        raise UsageError(f"{source}: key file {path!r} {reason}") from None
    key = key.rstrip(b"\r\n")
    if not key.strip():
        raise UsageError(f"{source}: key file {path!r} is empty")
    if len(key) < MIN_KEY_BYTES:
        raise UsageError(
            f"{source}: key file {path!r} holds {len(key)} bytes; a key needs at least {MIN_KEY_BYTES} "
            "(e.g. openssl rand -hex 32 > FILE)"
        )
    return key


def from_settings(key_file: str | None, map_file: str | None) -> Pseudonyms | None:
    """The run's pseudonyms from ``--pseudonymize`` or else ``MURA_RAY_PSEUDONYM_KEY_FILE``; None when neither."""
    source = "--pseudonymize"
    if not key_file and os.environ.get(ENV):
        key_file, source = storage.resolve(os.environ[ENV]), ENV
    if not key_file:
        if map_file:
            raise UsageError(f"--pseudonym-map {map_file!r}: needs --pseudonymize KEY_FILE (or {ENV})")
        return None
    return Pseudonyms(read_key(key_file, source))


SOURCE = "source_path"  # the catalog's column of real paths, in the driver only


@dataclass(frozen=True)
class Pseudonyms:
    """One key's pseudonyms of paths and patient ids."""

    key: bytes = field(repr=False)

    def _hmac(self, kind: str, value: str) -> str:
        return hmac.new(self.key, f"{kind}\0{value}".encode(), hashlib.sha256).hexdigest()[:DIGITS]

    @property
    def key_id(self) -> str:
        """Names the key in the runs' rows without revealing it."""
        return self._hmac("key-id", "mura-ray")[:16]

    def study(self, study_uri: str) -> str:
        return "S" + self._hmac("study", study_uri)

    def image(self, image_uri: str, study_uri: str) -> str:
        return f"{self.study(study_uri)}/I{self._hmac('image', image_uri)}"

    def patient(self, patient_id: str | None) -> str | None:
        return None if patient_id is None else "P" + self._hmac("patient", patient_id)

    def path(self, uri: str) -> str:
        """A file that is not an image of the catalog (a missing or ignored one, a broken link)."""
        return "F" + self._hmac("file", uri)

    def catalog(self, table: pa.Table) -> pa.Table:
        """The catalog with ``image_uri``, ``study_uri`` and ``patient_id`` replaced by their pseudonyms, sorted
        by them, and the real path in ``SOURCE`` (for the tasks that read the files)."""
        images, studies = table["image_uri"].to_pylist(), table["study_uri"].to_pylist()
        columns = {
            "image_uri": pa.array([self.image(i, s) for i, s in zip(images, studies)], pa.string()),
            "study_uri": pa.array([self.study(s) for s in studies], pa.string()),
            "patient_id": pa.array([self.patient(p) for p in table["patient_id"].to_pylist()], pa.string()),
        }
        named = table.append_column(SOURCE, table["image_uri"])
        for name, values in columns.items():
            named = named.set_column(named.schema.get_field_index(name), name, values)
        return named.sort_by("image_uri")

    def results(self, results: pa.Table, by_path: dict[str, str]) -> pa.Table:
        """The pipeline's results (``image_uri`` the paths read) with the pseudonyms, their errors scrubbed."""
        paths = results["image_uri"].to_pylist()
        errors = [None if e is None else scrub(e, p, by_path[p]) for e, p in zip(results["error"].to_pylist(), paths)]
        results = results.set_column(
            results.schema.get_field_index("image_uri"), "image_uri", pa.array([by_path[p] for p in paths], pa.string())
        )
        return results.set_column(results.schema.get_field_index("error"), "error", pa.array(errors, pa.string()))

    def mapping(self, catalog: pa.Table, files: list[str]) -> pa.Table:
        """Each pseudonym of ``catalog`` (the plain one) and of ``files``: ``kind`` (image, study, patient,
        file), ``pseudonym``, ``original``."""
        images, studies = catalog["image_uri"].to_pylist(), catalog["study_uri"].to_pylist()
        rows = {("image", self.image(i, s), i) for i, s in zip(images, studies)}
        rows |= {("study", self.study(s), s) for s in set(studies)}
        rows |= {("patient", self.patient(p), p) for p in set(catalog["patient_id"].to_pylist()) if p is not None}
        rows |= {("file", self.path(f), f) for f in files}
        ordered = sorted(rows)
        return pa.table({c: [r[i] for r in ordered] for i, c in enumerate(("kind", "pseudonym", "original"))})


def scrub(text: str, path: str, name: str) -> str:
    """A message about the file at ``path`` with the path replaced by ``name`` (its pseudonym), and each of
    its folders and its file name by ``REDACTED``."""
    text = text.replace(path, name)
    for part in sorted({p for p in path.split("/") if len(p) > 1}, key=len, reverse=True):
        text = re.sub(rf"(?<![\w.-]){re.escape(part)}(?![\w.-])", REDACTED, text)
    return text


def write_map(table: pa.Table, uri: str) -> None:
    """Write a ``mapping()`` as CSV at ``uri``, replaced whole."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(table.column_names)
    writer.writerows(zip(*(table[c].to_pylist() for c in table.column_names)))
    fs, path = storage.filesystem(uri)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    storage.write_atomic(fs, path, buf.getvalue().encode())


def check_one_key(manifests: list[dict[str, Any]], key_id: str | None, out: str) -> None:
    """An output holds rows of one key (or none): a run with another is refused, since its rows could not
    be matched with the earlier ones (each image would be scored again under a second name)."""
    for m in manifests:
        if m.get("status") != "committed":
            continue
        before = m.get("pseudonyms")
        if before != key_id:
            was = f"pseudonymized with key {before}" if before else "not pseudonymized"
            now = f"key {key_id}" if key_id else "no --pseudonymize"
            raise UsageError(
                f"{out!r} holds rows {was} (run {m.get('run_id')}); this run has {now}: use the same key, "
                "or a new --out"
            )
