"""sha256 of local source files (a model folder, a checkpoint), hashed once per batch.

A stage key holds the digest of the files the load stage reads, so planning reads them whole
(0.5 s per 400 MB). A batch plans every entry, often over one model folder: within
`memoized_digests(memo)` a set of files whose paths, inodes, sizes and times are those of a set
hashed before is not read again. ctime cannot be set back by a user, so a rewritten file is
hashed again.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

__all__ = ["hash_files", "memoized_digests"]

# Within `memoized_digests`: {the files' identities: their sha256}.
_MEMO: ContextVar[dict[tuple, str] | None] = ContextVar("hwq_file_digests", default=None)


@contextlib.contextmanager
def memoized_digests(memo: dict[tuple, str]) -> Iterator[None]:
    """Within the block, `hash_files` keeps what it hashes in `memo` and reuses it."""
    token = _MEMO.set(memo)
    try:
        yield
    finally:
        _MEMO.reset(token)


def hash_files(paths: list[Path]) -> str:
    """One sha256 of the files, in name order: each name, a NUL, then its bytes (hex)."""
    memo = _MEMO.get()
    if memo is None:
        return _hash_now(paths)
    ids = []
    for p in sorted(paths):
        st = os.stat(p)
        ids.append(
            (
                str(p.resolve()),
                p.name,
                st.st_dev,
                st.st_ino,
                st.st_size,
                st.st_mtime_ns,
                st.st_ctime_ns,
            )
        )
    key = tuple(ids)
    if key not in memo:
        memo[key] = _hash_now(paths)
    return memo[key]


def _hash_now(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()
