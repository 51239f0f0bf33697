"""Decoding a tensor's streams into its codes and kept positions: the part of `HwqReader`
that runs the chunk decoders (in process, or through a map_fn in bounded batches)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from ..bitio import DecodeError
from ..coders import decode_job, mask_geometry
from ..huffman import symbol_dtype
from ..limits import batches, chunk_rows
from .header import _Stream, _Tensor

_BLOCK = 1 << 20
"""Elements per block when turning gap symbols into positions and scattering codebook values:
the int64 temporaries stay ~10 MB whatever the tensor or stream size."""


class _StreamDecoding:
    """Methods of `HwqReader` that decode streams. The reader supplies ``_h`` (the parsed
    header), ``_levels`` (level counts of ragged codebooks), ``_fail`` and ``_table``."""

    def _rows_in_order(self, t: _Tensor, codes: np.ndarray,
                       positions: np.ndarray | None = None) -> np.ndarray:
        """Level-ordered codes (rows grouped by level count, ascending) back in row order.
        A pruned tensor's rows each keep n_kept / rows weights (its positions checked)."""
        levels = self._levels.get(t.codebook)
        if levels is None:
            self._fail(f"tensor {t.name!r}: level-ordered indices without level counts")
        rows = levels.shape[0]
        per_row = (t.numel if positions is None else t.n_kept) // max(rows, 1)
        if positions is not None and rows:
            _, cols, _ = mask_geometry(t.shape)
            counts = np.bincount(positions // max(cols, 1), minlength=rows)
            if counts.shape[0] != rows or (counts != per_row).any():
                self._fail(f"tensor {t.name!r}: level-ordered indices, but its rows do not "
                           f"keep {per_row} weights each")
        order = np.argsort(levels, kind="stable")
        # One-level rows (first in the order) are stored without codes (all 0); files of
        # writers before that store them too, and either count is exact.
        one = int((levels <= 1).sum())
        if codes.shape[0] == (rows - one) * per_row:
            order = order[one:]
        elif codes.shape[0] != rows * per_row:
            self._fail(f"tensor {t.name!r}: {codes.shape[0]} codes for {rows} rows of {per_row}"
                       f" ({rows - one} of them with more than one level)")
        out = np.zeros((rows, per_row), codes.dtype)
        out[order] = codes.reshape(-1, per_row)
        if rows and int(np.max(out.max(axis=1, initial=0) - (levels - 1).astype(np.int64))) > 0:
            self._fail(f"tensor {t.name!r}: a code beyond its row's levels")
        return out.reshape(-1)

    def _stream_parts(self, st: _Stream, data, map_fn, extra=None) -> Iterable[np.ndarray]:
        """The decoded chunks of a stream, in order, lazily: in-process one chunk at a time
        (its table looked up or built when it is decoded), through a map_fn in batches of
        bounded symbols and tables (limits.batches). A prefix-coded chunk holds at most 8
        symbols per byte, an rANS or context chunk at most what its tensor bounds (both
        checked in the header).

        extra: for context-coded streams, (kind, args) where args(j) gives chunk j's decode
        job arguments after (data, n) (mask: cols, group; index: k, the chunk's rows)."""
        if not st.chunks:
            return iter(())
        per_chunk = st.chunk_tables or [st.table] * len(st.chunks)

        def job(j: int) -> tuple:
            s, n = st.chunks[j]
            # Workers of a distributed map_fn need picklable bytes, not memoryviews.
            b = bytes(data[id(s)]) if map_fn else data[id(s)]
            if st.coder == "context":
                kind = "mask" if extra and extra[0] == "mask" else "index"
                return (kind, b, n, *extra[1](j))
            return ("table", b, n, self._table(per_chunk[j], data))

        jobs = (job(j) for j in range(len(st.chunks)))
        if map_fn is None:
            return (self._decode_one(j) for j in jobs)
        return self._mapped(map_fn, jobs)

    def _mapped(self, map_fn, jobs: Iterable[tuple]) -> Iterable[np.ndarray]:
        """Decoded chunks through map_fn, one bounded batch at a time."""
        def size(j: tuple) -> int:
            return int(j[2]) * (int(j[3]) if j[0] == "mask" else 1)

        try:
            for group in batches(jobs, size, lambda j: j[3:4] if j[0] == "table" else ()):
                parts = list(map_fn(decode_job, group))[::-1]
                del group
                while parts:  # each part released once the caller has taken it
                    yield parts.pop()
        except DecodeError as exc:
            self._fail(f"corrupt stream: {exc}")

    def _decode_one(self, job: tuple[Any, ...]) -> np.ndarray:
        try:
            return decode_job(job)
        except DecodeError as exc:
            self._fail(f"corrupt stream: {exc}")

    def _decode_stream(self, st: _Stream, data, map_fn, dtype, extra=None) -> np.ndarray:
        """The stream's symbols [n_symbols] of ``dtype``, filled chunk by chunk (no list of
        decoded chunks next to their concatenation)."""
        out = np.empty(st.n_symbols, dtype)
        at = 0
        for part in self._stream_parts(st, data, map_fn, extra):
            part = part.reshape(-1)
            if at + part.shape[0] > out.shape[0]:
                self._fail(f"{st.chunks[0][0].what}: more symbols than the stream declares")
            out[at : at + part.shape[0]] = part
            at += part.shape[0]
        if at != out.shape[0]:
            self._fail(f"{st.chunks[0][0].what}: {at} symbols, not {out.shape[0]}")
        return out

    def _positions(self, t: _Tensor, data, map_fn) -> np.ndarray:
        """Kept flat positions int64 [n_kept] of a pruned tensor, from its gap symbols.

        Block by block with a running cursor, so escape symbols (which emit nothing) cost no
        memory beyond their decoded chunk, and too many positions are refused as they appear.
        """
        st = t.positions
        if st.coder == "context":
            return self._context_positions(t, data, map_fn)
        m = st.max_gap or 1
        out = np.empty(t.n_kept, np.int64)
        n_out = 0
        cursor = -1
        for part in self._stream_parts(st, data, map_fn):
            for b in range(0, part.shape[0], _BLOCK):
                s = part[b : b + _BLOCK].astype(np.int64)
                kept = s != 0
                s[~kept] = m
                np.cumsum(s, out=s)
                s += cursor
                cursor = int(s[-1])
                p = s[kept]
                if n_out + p.shape[0] > t.n_kept:
                    self._fail(f"tensor {t.name!r}: positions give more than {t.n_kept} kept")
                out[n_out : n_out + p.shape[0]] = p
                n_out += p.shape[0]
        if n_out != t.n_kept:
            self._fail(f"tensor {t.name!r}: positions give {n_out} kept weights")
        if n_out and int(out[-1]) >= t.numel:
            self._fail(f"tensor {t.name!r}: a kept position lies beyond {t.numel} elements")
        return out

    def _context_positions(self, t: _Tensor, data, map_fn) -> np.ndarray:
        """Kept flat positions from context-coded mask rows (chunks of whole rows)."""
        rows, cols, group = mask_geometry(t.shape)
        out = np.empty(t.n_kept, np.int64)
        n_out = 0
        row = 0
        extra = ("mask", lambda j: (cols, group))
        for part in self._stream_parts(t.positions, data, map_fn, extra):
            p = np.flatnonzero(part.reshape(-1))
            p += row * cols
            if n_out + p.shape[0] > t.n_kept:
                self._fail(f"tensor {t.name!r}: the mask keeps more than {t.n_kept}")
            out[n_out : n_out + p.shape[0]] = p
            n_out += p.shape[0]
            row += part.shape[0]
        if n_out != t.n_kept:
            self._fail(f"tensor {t.name!r}: the mask keeps {n_out} weights, not {t.n_kept}")
        return out

    def _codes(self, t: _Tensor, data, map_fn, positions: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray | None]:
        """(codes, kept positions or None); positions already decoded may be passed in."""
        if positions is None and t.positions is not None:
            positions = self._positions(t, data, map_fn)
        k = self._h.codebooks[t.codebook][0][-1]
        dtype = symbol_dtype(k)
        if t.indices.coder == "context":
            _, cols, _ = mask_geometry(t.shape)
            starts = np.cumsum([0] + [n for _, n in t.indices.chunks]).tolist()

            def rows(j: int) -> tuple:
                # Built when chunk j is decoded: narrow, and one chunk's at a time.
                n = t.indices.chunks[j][1]
                return k, chunk_rows(positions, starts[j], n, cols)

            codes = self._decode_stream(t.indices, data, map_fn, dtype, ("index", rows))
        else:
            codes = self._decode_stream(t.indices, data, map_fn, dtype)
        if t.indices.order == "levels":
            codes = self._rows_in_order(t, codes, positions)
        if codes.size and int(codes.max()) >= k:
            self._fail(f"tensor {t.name!r}: code out of range of its {k}-entry codebook")
        return codes, positions
