"""Where a .hwq file's bytes go: fsspec paths and URLs, and the atomic publication of a
written file (local rename, completed object-store upload, or temporary + move)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from typing import Any

S3_PART_BYTES = 64 << 20  # object-store uploads: one part per this many bytes (S3: >= 5 MiB)


def _url_to_fs(path_or_url: str, storage_options: dict | None):
    from fsspec.core import url_to_fs

    return url_to_fs(path_or_url, **(storage_options or {}))


def _copy(src, write: Callable[[bytes], Any], bufsize: int = 8 << 20) -> None:
    while True:
        buf = src.read(bufsize)
        if not buf:
            return
        write(buf)


def _atomic_write(path_or_url: str, head: bytes, payload, storage_options: dict | None) -> None:
    """Publish `head` + the rest of the file object `payload` only once complete: a local
    temporary file renamed, an object-store upload (multipart past 64 MiB) completed only at
    the end and aborted on failure, or write-to-temporary + move on other filesystems. The
    payload is copied in pieces: the whole file never sits in memory."""
    from fsspec.implementations.local import LocalFileSystem

    fs, path = _url_to_fs(path_or_url, storage_options)
    if isinstance(fs, LocalFileSystem):
        d = os.path.dirname(path) or "."
        os.makedirs(d, exist_ok=True)
        tmp = os.path.join(d, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:
                f.write(head)
                _copy(payload, f.write)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        return
    protocols = fs.protocol if isinstance(fs.protocol, tuple | list) else (fs.protocol,)
    if set(protocols) & {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"}:
        # A completed upload is atomic: readers see the old object or the whole new one. On
        # failure the multipart upload is aborted, so no part of it is ever visible.
        f = fs.open(path, "wb", block_size=S3_PART_BYTES)
        try:
            f.write(head)
            _copy(payload, f.write)
        except BaseException:
            discard = getattr(f, "discard", None)
            if discard is not None:
                discard()
            f.closed = True  # nothing left to flush when it is collected
            raise
        f.close()
    else:
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with fs.open(tmp, "wb") as f:
                f.write(head)
                _copy(payload, f.write)
            fs.mv(tmp, path)
        except BaseException:
            if fs.exists(tmp):
                fs.rm(tmp)
            raise
    fs.invalidate_cache(path)
