"""s3fs with keys kept whole.

s3fs reads a path ``bucket/KEY?versionId=V`` as version V of ``KEY`` (and,
when it is not ``version_aware``, as ``KEY`` itself), so an object whose key
holds ``?versionId=`` is never the one read. Archive keys are names, not
requests: here a path's key is all of it, ``?`` and ``#`` included.
"""

from __future__ import annotations

import s3fs


class WholeKeyS3FileSystem(s3fs.S3FileSystem):
    """``s3fs.S3FileSystem`` whose ``split_path`` never takes a version out of a key."""

    def split_path(self, path: str) -> tuple[str, str, None]:
        trail = path[len(path.rstrip("/")) :]  # as s3fs: the slashes that _strip_protocol removes
        path = self._strip_protocol(path).lstrip("/")
        if "/" not in path:
            return path, "", None
        bucket, key = self._find_bucket_key(path)
        return bucket, key + trail, None
