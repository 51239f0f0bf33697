"""A cache of transcoded tensors: a .hwq file's packed indices and tables, kept on disk after
the first load so that the next load maps them instead of entropy-decoding the file again.

One cache file per .hwq file, named by the sha256 of what identifies the file's content: its
size, its prefix and stored header (which hold the CRC32 of every section), and this layout's
version. Whatever the file's path or URL, the same content finds the same entry, and a file
changed in place (another header, another size) finds none.

Layout of an entry ``<key>.lut`` (written to a temporary name and renamed, so an entry is
whole or absent)::

    MAGIC | array bytes, each at a 64-byte boundary | index JSON | uint64 index length | MAGIC

The index names every array's offset, dtype, shape and CRC32, the tensors it holds
(:class:`Packed` fields) and the tensors that were not servable (decoded dense on every load).
A hit maps the file copy-on-write (pages are read as the kernels touch them, shared with the
page cache) and checks every array's CRC32 first; any mismatch, a truncated file or a key
that does not match is a miss (one log line; the entry is removed and written again).

The folder is ``$HWQ_CACHE/runtime-lut`` (a private folder of this user), and it is kept under
``HWQ_LUT_CACHE_BYTES`` (default 16 GiB) by removing the least recently used entries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch

from .transcode import Packed

__all__ = ["LutCache", "cache_key", "default_folder", "entry_path"]

log = logging.getLogger(__name__)

MAGIC = b"HWQLUT01"
LAYOUT = 1  # bump when the packed layout (transcode.py) changes: old entries then miss
_ALIGN = 64
_TAIL = struct.Struct("<Q8s")
DEFAULT_LIMIT = 16 << 30
_FIELDS = ("idx", "tables", "tq", "ts")


def cache_key(reader) -> str:
    """The entry name of an open HwqReader's file (see the module docstring)."""
    h = hashlib.sha256(f"hwq-lut/{LAYOUT}/{reader.file_bytes}/".encode())
    h.update(reader.stored_header)
    return h.hexdigest()[:40]


def entry_path(reader, folder: str | os.PathLike | None = None) -> Path:
    """Where the entry of an open HwqReader's file lives (default: `default_folder()`)."""
    return (Path(folder) if folder is not None else default_folder()) / f"{cache_key(reader)}.lut"


def default_folder() -> Path:
    from pipeline.executor import private_subdir

    return private_subdir("runtime-lut")


def _limit() -> int:
    raw = os.environ.get("HWQ_LUT_CACHE_BYTES", "")
    try:
        return int(raw) if raw else DEFAULT_LIMIT
    except ValueError:
        raise ValueError(f"HWQ_LUT_CACHE_BYTES must be a number of bytes, not {raw!r}") from None


class LutCache:
    """The entry of one .hwq file: :meth:`get` on a hit, :meth:`put` / :meth:`commit` to
    write it on a miss."""

    def __init__(self, reader, folder: str | os.PathLike | None = None):
        self.path = entry_path(reader, folder)
        self.folder, self.key = self.path.parent, self.path.stem
        self.limit = _limit()
        self.hit = False
        self._index: dict = {}
        self._map: np.ndarray | None = None
        self._out = None  # the temporary file being written on a miss
        self._failed = False  # writing failed (a full disk, no folder): load without it
        self._written: dict = {"tensors": {}, "not_servable": []}
        self._open()

    # -- reading ------------------------------------------------------------------------

    def _open(self) -> None:
        if not self.path.is_file():
            return
        try:
            self._map, self._index = self._verified()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.info("hwq runtime: the cached tables %s are unusable (%s); transcoding again",
                     self.path, exc)
            self._map, self._index = None, {}
            self.path.unlink(missing_ok=True)
            return
        self.hit = True
        os.utime(self.path)  # most recently used

    def _verified(self) -> tuple[np.ndarray, dict]:
        size = self.path.stat().st_size
        if size < len(MAGIC) + _TAIL.size:
            raise ValueError("too short")
        m = np.memmap(self.path, dtype=np.uint8, mode="c")
        n, magic = _TAIL.unpack(bytes(m[size - _TAIL.size:]))
        if bytes(m[: len(MAGIC)]) != MAGIC or magic != MAGIC or n > size - _TAIL.size:
            raise ValueError("not a cache entry of this layout")
        index = json.loads(bytes(m[size - _TAIL.size - n: size - _TAIL.size]))
        if index.get("key") != self.key:
            raise ValueError("its key is another file's")
        end = size - _TAIL.size - n
        for t in index["tensors"].values():
            for off, dtype, shape, crc in t["arrays"].values():
                nbytes = _nbytes(dtype, shape)
                if not (len(MAGIC) <= off and off + nbytes <= end):
                    raise ValueError("an array lies outside the file")
                if zlib.crc32(memoryview(m[off: off + nbytes])) != crc:
                    raise ValueError("an array's checksum does not match")
        return m, index

    def not_servable(self, name: str) -> bool:
        """Whether the cached load found `name` not servable (it is decoded dense)."""
        return self.hit and name in self._index["not_servable"]

    def get(self, name: str) -> Packed | None:
        """The cached Packed of tensor `name` (its arrays map the cache file), or None."""
        t = self._index.get("tensors", {}).get(name) if self.hit else None
        if t is None:
            return None
        arrays = {}
        for field, (off, dtype, shape, _crc) in t["arrays"].items():
            a = self._map[off: off + _nbytes(dtype, shape)].view(dtype).reshape(shape)
            arrays[field] = torch.from_numpy(a)
        return Packed(t["rows"], t["cols"], t["bits"], t["group_size"], arrays["idx"],
                      arrays["tables"], arrays.get("tq"), arrays.get("ts"), levels=t["levels"])

    # -- writing ------------------------------------------------------------------------

    def _file(self):
        if self._out is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.key}-", suffix=".tmp", dir=self.folder)
            self._out = (os.fdopen(fd, "wb"), Path(tmp))
            self._out[0].write(MAGIC)
        return self._out[0]

    def put(self, name: str, p: Packed | None) -> None:
        """Add tensor `name` to the entry being written (None: it was not servable). A
        write that fails drops the entry (one log line); the load goes on without it."""
        if self.hit or self._failed:
            return
        try:
            self._put(name, p)
        except OSError as exc:
            self._failed = True
            self.abort()
            log.warning("hwq runtime: could not cache the transcoded tables in %s (%s)",
                        self.folder, exc)

    def _put(self, name: str, p: Packed | None) -> None:
        f = self._file()
        if p is None:
            self._written["not_servable"].append(name)
            return
        arrays = {}
        for field in _FIELDS:
            t = getattr(p, field)
            if t is None:
                continue
            a = np.ascontiguousarray(t.numpy())
            f.write(b"\0" * (-f.tell() % _ALIGN))
            arrays[field] = [f.tell(), a.dtype.str, list(a.shape), zlib.crc32(memoryview(a))]
            f.write(memoryview(a).cast("B"))
        self._written["tensors"][name] = {"rows": p.rows, "cols": p.cols, "bits": p.bits,
                                          "group_size": p.group_size, "levels": p.levels,
                                          "arrays": arrays}

    def commit(self) -> bool:
        """Finish the entry: index, tail, rename into place; then keep the folder under its
        limit. Whether an entry was written: a failure (a full disk) leaves none and is one
        log line, not an error (the model is loaded either way)."""
        if self.hit or self._failed or self._out is None:
            return False
        f, tmp = self._out
        self._out = None
        try:
            blob = json.dumps({"key": self.key, **self._written}).encode()
            f.write(blob)
            f.write(_TAIL.pack(len(blob), MAGIC))
            f.close()  # no fsync: an entry a crash cut short fails its checks and is a miss
            os.replace(tmp, self.path)
        except OSError as exc:
            f.close()
            tmp.unlink(missing_ok=True)
            log.warning("hwq runtime: could not cache the transcoded tables in %s (%s)",
                        self.folder, exc)
            return False
        _evict(self.folder, self.limit, keep=self.path)
        return True

    def abort(self) -> None:
        """Drop a partly written entry (the load failed)."""
        if self._out is not None:
            f, tmp = self._out
            self._out = None
            f.close()
            tmp.unlink(missing_ok=True)


def _nbytes(dtype: str, shape: list[int]) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def _evict(folder: Path, limit: int, keep: Path) -> None:
    """Remove the least recently used entries until the folder holds at most `limit` bytes
    (never `keep`, the entry just written)."""
    entries = []
    for p in folder.glob("*.lut"):
        try:
            st = p.stat()
        except OSError:
            continue
        entries.append((st.st_mtime, st.st_size, p))
    total = sum(s for _, s, _ in entries)
    for _, size, p in sorted(entries, key=lambda e: e[0]):
        if total <= limit:
            break
        if p != keep:
            p.unlink(missing_ok=True)
            total -= size
