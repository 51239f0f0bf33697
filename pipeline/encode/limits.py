"""Bounds on the .hwq reader's working memory (docs/FORMAT.md, section 6, "Working memory").

A header can name many code tables and few symbols; without a bound, a reader that builds
every table's decoder and keeps it for its lifetime spends memory in proportion to the
tables' declared precision, not to what the file can honestly need. This module holds the
pieces the reader uses to keep every allocation a header can cause within

    peak <= file bytes + output + W + TABLE_CACHE_BYTES + 32 MiB of block temporaries

(W: the working memory of the largest quantized tensor read, about 12 bytes a kept weight
plus its largest chunk's; see :func:`working_bound`).

- :class:`TableCache`: decoded code tables shared by content and kept within a byte budget
  (least recently used first out), built lazily when a chunk needs them;
- :func:`chunk_rows`: the relative row of each code of a context-coded index chunk, in the
  narrowest unsigned dtype (not int64 per symbol);
- :func:`batches`: jobs for a distributed ``map_fn`` in groups of bounded symbols and
  table bytes, so its results and tables are never all held at once;
- :func:`not_a_file`, :func:`read_small_file`: a folder, FIFO or device where a file is
  expected is one clear error, never a hang or a traceback.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any

import numpy as np

from .ans_table import AnsTable
from .huffman import LUT_BITS, CodeTable

__all__ = [
    "BATCH_SYMBOLS",
    "TABLE_CACHE_BYTES",
    "TableCache",
    "batches",
    "chunk_rows",
    "codebook_work",
    "not_a_file",
    "read_small_file",
    "table_bytes",
    "working_bound",
]

TABLE_CACHE_BYTES = 64 << 20
"""Most bytes of decoded code tables a reader holds at once (beyond the one in use). An
honest file's tables take far less: one per codebook or level count, each at most
2**16 slots × 5 bytes (rANS at the writer's precision) or a 2**LUT_BITS lookup table."""
BATCH_SYMBOLS = 1 << 24
"""Most symbols one call of a distributed map_fn decodes (4 default chunks of 4 M; or one
larger chunk): its results arrive together, so this bounds them (at most 2 bytes a symbol)
and the row arrays its context-coded jobs carry (4 bytes a symbol): 128 MiB at most."""


def codebook_work(shape: tuple[int, ...]) -> int:
    """Most bytes decoding a codebook of ``shape`` takes at once: 10 per value while a ragged
    one is expanded (float32 values, two bool masks, the gathered fill), then 4 kept and up
    to 8 of a cast copy per tensor read: 16 a value. (A ragged codebook stores only the
    levels its rows use, so a few bytes can declare [rows, 2**24].)"""
    return 16 * math.prod(shape)


def table_bytes(table: Any) -> int:
    """Bytes a decoded table holds while in use: an rANS table's frequencies and 2**prob_bits
    slots; a prefix table's lengths, codewords, sorted symbols and lookup table."""
    if isinstance(table, AnsTable):
        return table.decoder_bytes()
    if isinstance(table, CodeTable):
        return 24 * table.alphabet + 4 * (1 << LUT_BITS) + 1024
    raise TypeError(f"not a code table: {type(table).__name__}")


class TableCache:
    """Decoded tables by content key, at most ``budget`` bytes of them (:func:`table_bytes`),
    least recently used evicted first; the newest is always kept, whatever its size (one
    table is bounded by its alphabet: rANS at most ~4 MiB, see ans_table.max_prob_bits).

    Identical tables (the same kind, alphabet and bytes) are built once; a table evicted and
    needed again is rebuilt from its bytes, which the reader holds anyway.
    """

    def __init__(self, budget: int = TABLE_CACHE_BYTES):
        self.budget = int(budget)
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self.held = 0
        self.peak = 0  # most bytes held at once (tests)
        self.built = 0  # tables built (tests)

    def get(self, key: Hashable, build: Callable[[], Any]) -> Any:
        hit = self._items.get(key)
        if hit is not None:
            self._items.move_to_end(key)
            return hit[0]
        table = build()
        cost = table_bytes(table)
        self.built += 1
        while self._items and self.held + cost > self.budget:
            _, (_, c) = self._items.popitem(last=False)
            self.held -= c
        self._items[key] = (table, cost)
        self.held += cost
        self.peak = max(self.peak, self.held)
        return table

    def __len__(self) -> int:
        return len(self._items)


def chunk_rows(positions: np.ndarray | None, start: int, n: int, cols: int) -> np.ndarray:
    """Row of each of the n codes of a context-coded index chunk, relative to its first code's
    row: ``flat // cols - first`` where flat is ``positions[start:start+n]`` (a pruned
    tensor's kept positions) or ``start + arange(n)`` (a dense one).

    Returns uint32 (int64 only for a span of 2**32 rows or more), computed in blocks: no
    int64 array of n elements. (Two dtypes only: each is one compiled decoder.)
    """
    cols = max(int(cols), 1)
    if n == 0:
        return np.zeros(0, np.uint8)
    first = (int(positions[start]) if positions is not None else start) // cols
    last = (int(positions[start + n - 1]) if positions is not None else start + n - 1) // cols
    # Kept positions increase, so the span is last - first; anything else is caught by the
    # decoder as a corrupt stream (the rows only select statistics).
    span = max(last - first, 0)
    dtype = np.uint32 if span < 1 << 32 else np.int64
    out = np.empty(n, dtype)
    block = 1 << 20
    for b in range(0, n, block):
        e = min(n, b + block)
        at = (
            positions[start + b : start + e]
            if positions is not None
            else np.arange(start + b, start + e, dtype=np.int64)
        )
        r = at // cols
        r -= first
        out[b:e] = r
    return out


def batches(
    jobs: Iterable[tuple],
    symbols: Callable[[tuple], int],
    tables: Callable[[tuple], Iterable[Any]],
    max_symbols: int = BATCH_SYMBOLS,
    max_table_bytes: int = TABLE_CACHE_BYTES,
) -> Iterator[list[tuple]]:
    """Consecutive groups of jobs, each within max_symbols decoded symbols and max_table_bytes
    of distinct tables (by identity), and at least one job."""
    group: list[tuple] = []
    n = 0
    seen: dict[int, int] = {}
    for job in jobs:
        s = symbols(job)
        new = {id(t): table_bytes(t) for t in tables(job) if id(t) not in seen}
        if group and (
            n + s > max_symbols or sum(seen.values()) + sum(new.values()) > max_table_bytes
        ):
            yield group
            group, n, seen = [], 0, {}
            new = {id(t): table_bytes(t) for t in tables(job)}
        group.append(job)
        n += s
        seen.update(new)
    if group:
        yield group


def working_bound(tensors: Iterable[Any], file_bytes: int, output_bytes: int) -> int:
    """The documented bound (docs/FORMAT.md, section 6) on the memory one read allocates,
    in bytes, from the header alone: the payload it holds, the dense output, the table
    cache, 32 MiB of block temporaries, and the largest of the tensors' own working memory
    (tensors decode one at a time; their buffers are freed before the next):

        4·n_kept (codes, up to 2 bytes each, and their row-ordered copy)
        + 8·n_kept when pruned (the kept positions, int64)
        + the largest chunk's temporaries: 8 bytes a symbol of a context-coded index chunk
          (2 + 1 bytes of codes, 4 of rows), rows·cols + 16·kept of a mask chunk (its bits,
          their positions), 2 bytes a symbol of a table-coded chunk.

    ``tensors``: the reader's parsed tensors (container.header._Tensor) being read."""
    work = 0
    for t in tensors:
        if t.kind != "quantized":
            continue
        k = t.n_kept
        w = 4 * k + (8 * k if t.positions is not None else 0)
        chunk = 0
        for st in (t.indices, t.positions):
            if st is None:
                continue
            for _, n in st.chunks:
                if st.coder == "context" and st is t.positions:
                    cols = t.numel // max(t.shape[0], 1) if len(t.shape) >= 2 else t.numel
                    chunk = max(chunk, n * cols + 16 * min(k, n * cols))
                else:
                    chunk = max(chunk, (8 if st.coder == "context" else 2) * n)
        work = max(work, w + chunk)
    return int(file_bytes) + int(output_bytes) + work + TABLE_CACHE_BYTES + (32 << 20)


# ---------------------------------------------------------------------------------------------
# untrusted paths: a folder or a FIFO where a file is expected must not hang or trace back


def _local(fs: Any) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def _kind(mode: int) -> str:
    import stat

    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def not_a_file(fs: Any, path: str) -> str | None:
    """Why a local ``path`` cannot be read as a file ("is a folder", ...), None when it is a
    regular file (through symlinks), missing (the read says so), or not local (an object
    store has no FIFOs; its folders fail as missing keys)."""
    import os
    import stat

    if not _local(fs):
        return None
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return None if stat.S_ISREG(mode) else f"is {_kind(mode)}, not a file"


def read_small_file(fs: Any, path: str, max_bytes: int) -> bytes:
    """The bytes of a small file; ValueError (one line) for a folder, FIFO or device, or one
    larger than max_bytes. Locally it is opened non-blocking (a FIFO without a writer would
    block an ordinary open forever) and checked to be a regular file before it is read."""
    import os
    import stat

    if not _local(fs):
        if fs.isdir(path):
            raise ValueError(f"{path} is a folder, not a file")
        with fs.open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    else:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise ValueError(f"{path} is {_kind(mode)}, not a file")
            with os.fdopen(fd, "rb", closefd=False) as f:
                data = f.read(max_bytes + 1)
        finally:
            os.close(fd)
    if len(data) > max_bytes:
        raise ValueError(f"{path} is larger than {max_bytes >> 20} MiB; not a model file")
    return data
