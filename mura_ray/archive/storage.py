"""One way to reach files, local or in object storage.

Every path argument of mura-ray is a local path or an ``s3://bucket/prefix``
URI. ``filesystem(uri)`` returns an fsspec filesystem and the path inside it;
the filesystem object pickles with its settings, so it can be handed to Ray
tasks and actors and reach the same storage there.

S3 settings come from the standard AWS sources (environment, shared config,
instance profile). ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) points
at an S3-compatible server such as MinIO. An S3 key is always the whole key:
one that holds ``?versionId=``, ``?`` or ``#`` names that object, never a
version of another.
"""

from __future__ import annotations

import io
import os
import posixpath
from typing import Any

import fsspec

from mura_ray.errors import UsageError


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def resolve(uri: str) -> str:
    """The absolute form of a user's path argument: ``s3://bucket/prefix`` or an absolute local path.

    Relative paths, ``~`` and ``file://`` are resolved here, in the process
    that parsed them; Ray workers and actors run in other working directories
    and must only ever see the result.
    """
    uri = str(uri).strip()
    if not uri:
        raise UsageError("empty path")
    if uri.startswith("s3://"):
        if not uri[len("s3://") :].strip("/"):
            raise UsageError(f"no bucket in {uri!r}: use s3://bucket/prefix")
        return uri.rstrip("/")
    if uri.startswith("models:/"):  # a model in the MLflow registry, resolved where it is read
        return uri
    if is_remote(uri):
        raise UsageError(f"unsupported storage scheme in {uri!r}: use a local path or s3://bucket/prefix")
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return os.path.abspath(os.path.expanduser(uri))


def _s3_options() -> dict[str, Any]:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    opts: dict[str, Any] = {}
    if endpoint:
        opts["endpoint_url"] = endpoint
    return opts


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(fs, path)`` for a local path or an s3:// URI."""
    if uri.startswith("s3://"):
        from mura_ray.archive.s3 import WholeKeyS3FileSystem

        fs = WholeKeyS3FileSystem(**_s3_options())
        return fs, uri[len("s3://") :].rstrip("/")
    if is_remote(uri):
        raise UsageError(f"unsupported storage scheme in {uri!r}: use a local path or s3://bucket/prefix")
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    fs = fsspec.filesystem("file")
    return fs, os.path.abspath(os.path.expanduser(uri))


def protocol(fs: fsspec.AbstractFileSystem) -> str:
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The user-facing URI of ``path`` inside ``fs`` (the inverse of ``filesystem``)."""
    if protocol(fs) in ("s3", "s3a"):
        return "s3://" + path
    return path


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *[p.strip("/") for p in parts]) if parts else base


def inside(base: str, *parts: str) -> str:
    """``join(base, *parts)``, refused (UsageError) unless it names ``base`` or a path under it: for every
    path built from names that came from outside (a manifest, an archive's keys)."""
    path = join(base, *parts)
    if any(c in ("..", ".") for p in parts for c in p.split("/")) or "\x00" in path:
        raise UsageError(f"{'/'.join(parts)!r} does not stay under {base!r}")
    return path


def safe_relative(rel: str) -> str:
    """``rel`` (leading ``/`` dropped) as a relative path that stays where it is joined: ``.`` and ``..``
    components (an S3 key may hold them; a local filesystem would follow them) become ``%2E``-escaped
    names, empty ones ``%``, and ``%`` itself ``%25``, so that two different keys never meet."""
    special = {"": "%", ".": "%2E", "..": "%2E%2E"}
    parts = rel.lstrip("/").split("/")
    return "/".join(special.get(c) or c.replace("%", "%25").replace("\x00", "%00") for c in parts)


def write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)


def parquet_bytes(table: Any) -> bytes:
    """A pyarrow table as the bytes of one Parquet file."""
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    return fs.cat_file(path)  # one GET on S3, never answered from a cached listing


def write_text(uri: str, text: str) -> None:
    fs, path = filesystem(uri)
    write_bytes(fs, path, text.encode("utf-8"))


def read_text(uri: str) -> str:
    fs, path = filesystem(uri)
    return read_bytes(fs, path).decode("utf-8")


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def source_tag(info: dict[str, Any]) -> str | None:
    """A change tag for a listed file: its ETag in object storage; locally its mtime, ctime and inode.

    A file rewritten with its mtime put back (``cp -p``, ``rsync -a``,
    ``tar x``) still gets a new ctime (which no user call can set) or inode."""
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return str(etag).strip('"')
    mtime = info.get("mtime") or info.get("LastModified")
    if mtime is None:
        return None
    tag = f"mtime:{mtime.timestamp() if hasattr(mtime, 'timestamp') else mtime}"
    if info.get("created") is not None and info.get("ino") is not None:
        tag += f";ctime:{info['created']};ino:{info['ino']}"
    return tag


def local_info(st: os.stat_result) -> dict[str, Any]:
    """The fields of a local file's listing info that ``source_tag`` and the size come from, as fsspec lists them."""
    return {
        "size": st.st_size,
        "mtime": st.st_mtime,
        "created": getattr(st, "st_birthtime", st.st_ctime),
        "ino": st.st_ino,
    }


class SourceChanged(OSError):
    """A file is no longer the one its listing saw: another size or change tag when it was read."""


async def _get_range(fs: Any, path: str, end: int) -> tuple[bytes, dict[str, Any]]:
    """One ranged GET of an object's first ``end`` bytes: the bytes and the response (ETag, ContentRange)."""
    bucket, key, _ = fs.split_path(path)
    resp = await fs._call_s3("get_object", Bucket=bucket, Key=key, Range=f"bytes=0-{end - 1}")
    try:
        return await resp["Body"].read(), resp
    finally:
        resp["Body"].close()


def _read_with_info(fs: fsspec.AbstractFileSystem, path: str, end: int) -> tuple[bytes, dict[str, Any] | None]:
    """The first ``end`` bytes of ``path`` and the listing info of the very file they were read from: locally
    the open file's own status; in S3 the object's ETag and size from the same GET (one request, no second
    look that another write could slip between). None where neither can be had."""
    if is_local(fs):
        with open(path, "rb") as f:
            data = f.read(end)
            return data, local_info(os.fstat(f.fileno()))
    if protocol(fs) in ("s3", "s3a"):
        from fsspec.asyn import sync

        data, resp = sync(fs.loop, _get_range, fs, path, end)
        total = str(resp.get("ContentRange", "")).rpartition("/")[2]
        size = int(total) if total.isdigit() else resp.get("ContentLength")
        return data, {"size": size, "ETag": resp.get("ETag")}
    return fs.cat_file(path, start=0, end=end), None


def read_listed(
    fs: fsspec.AbstractFileSystem, path: str, end: int, *, size: int | None = None, tag: str | None = None
) -> bytes:
    """The first ``end`` bytes of ``path`` (all of them when it is shorter), provided it is still the file its
    listing saw: ``SourceChanged`` when its size is not ``size`` or its change tag (``source_tag``) not
    ``tag`` any more (None: not compared), so that no bytes are scored under another file's fingerprint."""
    data, info = _read_with_info(fs, path, end)
    if info is None:
        return data
    now_size, now_tag = info.get("size"), source_tag(info)
    if size is not None and now_size is not None and int(now_size) != int(size):
        raise SourceChanged(f"changed since it was listed: {size} bytes then, {now_size} now")
    if tag is not None and now_tag is not None and now_tag != tag:
        raise SourceChanged(f"changed since it was listed: tag {tag} then, {now_tag} now")
    return data


def path_in(uri: str) -> str:
    """The path inside its filesystem of a URI made by ``to_uri``."""
    if uri.startswith("s3://"):
        return uri[len("s3://") :]
    return uri


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return protocol(fs) in ("file", "local")


STALE_SECONDS = 6 * 3600  # a temporary folder untouched this long belongs to a process that was killed


def private_temp_dir(parent: str, prefix: str) -> str:
    """A new folder only this user can enter (``tempfile.mkdtemp``: mode 0o700) in ``parent``, named
    ``prefix`` + random; first removes this prefix's folders that no one touched for ``STALE_SECONDS``
    (left by a process killed before it could clean up), never a live one of another process."""
    import shutil
    import tempfile
    import time

    os.makedirs(parent, exist_ok=True)
    now = time.time()
    for entry in os.scandir(parent):
        if entry.name.startswith(prefix) and entry.is_dir(follow_symlinks=False):
            try:
                if now - entry.stat(follow_symlinks=False).st_mtime > STALE_SECONDS:
                    shutil.rmtree(entry.path, ignore_errors=True)
            except FileNotFoundError:
                pass
    return tempfile.mkdtemp(prefix=prefix, dir=parent)


def fsync_dir(path: str) -> None:
    """Make a local folder's entries (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _local_temp(path: str, data: bytes) -> str:
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one step, durably: rename and fsync locally, one PUT in object storage."""
    if not is_local(fs):
        fs.pipe_file(path, data)
        return
    os.replace(_local_temp(path, data), path)
    fsync_dir(os.path.dirname(path))


def create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Create ``path`` with ``data`` only if nothing is there; ``FileExistsError`` otherwise.

    One creator wins however many try at once: a conditional PUT
    (``If-None-Match: *``) in object storage, a hard link locally (which
    fails when the name exists, and shows the file whole or not at all)."""
    if not is_local(fs):
        fs.pipe_file(path, data, mode="create")
        return
    tmp = _local_temp(path, data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: an exclusive create, then the bytes
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    finally:
        os.unlink(tmp)
    fsync_dir(os.path.dirname(path))
