"""`HwqReader` and the functions on it (`read_hwq`, `hwq_accounting`, `inspect_hwq`): random
access to an untrusted .hwq file, every problem and every limit an `HwqFormatError` raised
before the memory is allocated."""

from __future__ import annotations

import json
import os
import time
import zlib
from collections.abc import Iterable
from typing import Any

import numpy as np

from ..ans_table import AnsTable
from ..bitio import DecodeError
from ..codebooks import count_dtype, decode_codebook
from ..huffman import CodeTable, entropy_bits, fixed_lengths, symbol_dtype, unpack_lengths
from ..inspection import inspect_rows
from ..limits import TableCache, codebook_work, not_a_file
from ..positions import gap_histogram
from ..rotation import inverse as _inverse_rotation
from .accounting import _accounting, _gap_entropy_total
from .header import (
    _PREFIX,
    DEFAULT_MAX_HEADER_BYTES,
    DEFAULT_MAX_OUTPUT_BYTES,
    DEFAULT_MAX_OUTPUT_RATIO,
    FLAG_HEADER_ZLIB,
    MAGIC,
    MAX_CODED_EXPANSION,
    OUTPUT_FLOOR_BYTES,
    PREFIX_BYTES,
    READ_VERSIONS,
    HwqFormatError,
    MapFn,
    _np_dtype,
    _parse_header,
    _payload_start,
    _Section,
    _Stream,
    _Tensor,
)
from .storage import _url_to_fs
from .streams import _BLOCK, _StreamDecoding


class UnknownTensorError(KeyError, ValueError):
    """A tensor name the file does not hold. A KeyError for lookups, a ValueError (a user
    error, one line in the CLI); the message suggests close names."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 [...] -> uint16 [...] bfloat16 bit patterns, round to nearest even."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    quiet_nan = (u >> 16) | 0x0040
    return np.where(np.isnan(x), quiet_nan, rounded).astype(np.uint16)


def _cast_codebook(cb: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return _f32_to_bf16_bits(cb)
    return cb.astype(dtype)


def _unrotate(rows: np.ndarray, seed: int, dtype: str) -> np.ndarray:
    """Float32 rows looked up in a rotated basis, rotated back (`rotation.inverse`) and cast
    to the tensor's dtype as the reader returns it (bfloat16 as uint16 bits)."""
    w = _inverse_rotation(rows, seed)
    if dtype == "bfloat16":
        return _f32_to_bf16_bits(w)
    return w.astype(_np_dtype(dtype))


def _unknown_name(name: str, names: list[str]) -> str:
    """'no tensor named X; did you mean ...? (N tensors: a, b, ...)' in one line."""
    import difflib

    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    return f"no tensor named {name!r}{hint} (the file has {len(names)}: {shown})"


class HwqReader(_StreamDecoding):
    """Random access to a .hwq file: reads the header on open, then only what is asked for.

    The file is untrusted: every problem, and every limit a read would pass, is an
    HwqFormatError raised before the memory is allocated (docs/FORMAT.md, section 6).

    Args:
        path_or_url: local path or fsspec URL.
        storage_options: fsspec options for URLs.
        max_output_bytes: most bytes of dense tensors one :meth:`read` may return, all
            tensors together. None (default): min(8 GiB, max(64 MiB, 4096 × the file size)),
            which refuses decompression bombs; an int, for a file you trust, is the only cap.
        max_header_bytes: largest header, as stored and inflated (default 16 MiB).
        max_tensor_bytes: optional cap on one decoded tensor (None: only the total applies).

    Attributes:
        path: the path or URL.
        file_bytes: size of the file.
        header: the validated JSON header (dict).
        names: tensor names in file order.
        metadata: the writer's metadata dict.
        bytes_read: bytes fetched from storage so far (prefix and header included).
        stored_header: the prefix and header as stored (they hold every section's CRC32:
            what identifies the file's content, e.g. for the runtime's cache).
    """

    def __init__(
        self,
        path_or_url: str | os.PathLike,
        *,
        storage_options: dict | None = None,
        max_output_bytes: int | None = None,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        max_tensor_bytes: int | None = None,
    ):
        self.path = str(path_or_url)
        self.max_output_bytes = max_output_bytes
        self.max_header_bytes = int(max_header_bytes)
        self.max_tensor_bytes = max_tensor_bytes
        self.bytes_read = 0
        self._fs, self._fpath = _url_to_fs(self.path, storage_options)
        if (why := not_a_file(self._fs, self._fpath)) is not None:
            self._fail(f"{why}; give the path of a .hwq file")  # (a FIFO would hang a read)
        self._tables = TableCache()  # decoded tables, shared by content, bounded in bytes
        self._table_keys: dict[int, tuple] = {}  # table index -> its content key
        self._codebooks: dict[str, np.ndarray] = {}
        self._levels: dict[str, np.ndarray] = {}  # level counts of ragged codebooks
        self.file_bytes = int(self._fs.size(self._fpath))
        if self.file_bytes < PREFIX_BYTES:
            self._fail(f"{self.file_bytes} bytes is too short for an hwq file")
        prefix = self._read(0, PREFIX_BYTES)
        magic, version, flags, hlen, hcrc, reserved = _PREFIX.unpack(prefix)
        if magic != MAGIC:
            self._fail(f"bad magic {magic!r}, not an hwq file")
        if version not in READ_VERSIONS:
            self._fail(f"format version {version}: this reader supports versions "
                       f"{', '.join(map(str, READ_VERSIONS))}; a newer hwq wrote it (upgrade "
                       "hwq to read it)")
        self.version = version
        if flags & ~FLAG_HEADER_ZLIB or reserved:
            self._fail("reserved prefix fields are not zero")
        if _payload_start(hlen) > self.file_bytes:
            self._fail(f"header length {hlen} runs past the end of the {self.file_bytes}-byte file")
        if hlen > self.max_header_bytes:
            self._header_limit(f"the header is {hlen:,} bytes, above", hlen)
        self.payload_start = _payload_start(hlen)
        blob = self._read(PREFIX_BYTES, self.payload_start)
        hjson, pad = blob[:hlen], blob[hlen:]
        self.stored_header = bytes(prefix) + bytes(blob)
        if zlib.crc32(hjson) != hcrc:
            self._fail("header checksum mismatch")
        if any(pad):
            self._fail("header padding is not zero")
        if flags & FLAG_HEADER_ZLIB:
            # Bounded inflate: stop one byte past the limit instead of inflating a bomb whole
            # (a 1 MB deflate stream can inflate to 1 GB).
            inflater = zlib.decompressobj()
            try:
                hjson = inflater.decompress(hjson, self.max_header_bytes + 1)
            except zlib.error as exc:
                self._fail(f"compressed header does not inflate: {exc}")
            if len(hjson) > self.max_header_bytes:
                self._header_limit(f"the compressed header ({hlen:,} bytes) inflates past")
            if not inflater.eof or inflater.unconsumed_tail or inflater.unused_data:
                self._fail("compressed header is truncated or has trailing bytes")
        try:
            obj = json.loads(hjson.decode("utf-8"), parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            self._fail(f"header is not valid JSON: {exc}")
        self._h = _parse_header(self.path, obj, self.file_bytes)
        if self._h.version != version:
            self._fail(f"the prefix says version {version}, the header {self._h.version}")
        if self.payload_start + self._h.payload_bytes != self.file_bytes:
            self._fail(
                f"file has {self.file_bytes} bytes, header declares "
                f"{self.payload_start + self._h.payload_bytes}"
            )
        self.header = obj
        self.names = list(self._h.tensors)
        self.metadata = obj["metadata"]

    def _fail(self, problem: str):
        raise HwqFormatError(self.path, problem)

    def dtype(self, name: str) -> str:
        """The stored dtype of tensor `name` (what `read` decodes it to; bfloat16 as bits)."""
        return self._h.tensors[name].dtype

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor `name` (header only)."""
        return tuple(self._h.tensors[name].shape)

    def rotation(self, name: str) -> int | None:
        """The seed of a quantized tensor's input-side rotation (version 3), else None."""
        (name,) = self._check_names([name])
        return self._h.tensors[name].rotate

    def quantized(self, name: str) -> bool:
        """Whether tensor `name` is stored as codes and a codebook (else raw)."""
        return self._h.tensors[name].kind == "quantized"

    def _header_limit(self, what: str, need: int | None = None):
        """Refuse a header past max_header_bytes: ``what`` ends where the limit is named."""
        n = self.max_header_bytes
        how = f"{need}" if need else "BYTES"
        self._fail(f"{what} the {n:,}-byte header limit; if you trust this file, raise it: "
                   f"max_header_bytes={how} (hwq decode/inspect --max-header-bytes {how})")

    def decoded_bytes(self, names: Iterable[str] | str | None = None) -> int:
        """Bytes of the dense tensors :meth:`read` would return (header only, no decoding)."""
        return sum(self._out_bytes(self._h.tensors[n]) for n in self._check_names(names))

    @staticmethod
    def _out_bytes(t: _Tensor) -> int:
        return t.numel * _np_dtype(t.dtype).itemsize

    def output_limit(self) -> tuple[int, str]:
        """(most bytes one :meth:`read` may return, what sets that limit) for this file."""
        if self.max_output_bytes is not None:
            return int(self.max_output_bytes), "max_output_bytes"
        by_ratio = max(OUTPUT_FLOOR_BYTES, DEFAULT_MAX_OUTPUT_RATIO * self.file_bytes)
        if by_ratio < DEFAULT_MAX_OUTPUT_BYTES:
            return by_ratio, (
                f"the default limit for untrusted files: {DEFAULT_MAX_OUTPUT_RATIO}× the file "
                f"size of {self.file_bytes:,} bytes, at least 64 MiB; stored data expands at "
                f"most {MAX_CODED_EXPANSION}×, so the rest would be zeros of pruned tensors"
            )
        return DEFAULT_MAX_OUTPUT_BYTES, "the default limit of 8 GiB"

    def _check_output(self, names: list[str]) -> None:
        """Refuse, before anything is fetched or allocated, a read past the output limits."""
        cap = self.max_tensor_bytes
        if cap is not None:
            for n in names:
                nbytes = self._out_bytes(self._h.tensors[n])
                if nbytes > cap:
                    self._fail(
                        f"tensor {n!r} decodes to {nbytes:,} bytes, above the {cap:,}-byte cap "
                        f"(max_tensor_bytes); if you trust this file, raise it"
                    )
        total = self.decoded_bytes(names)
        limit, why = self.output_limit()
        if total > limit:
            what = "the file" if len(names) == len(self.names) else f"{len(names)} tensor(s)"
            self._fail(
                f"decoding {what} would produce {total:,} bytes, above the {limit:,}-byte cap "
                f"({why}); if you trust this file, raise it: max_output_bytes={total} "
                f"(hwq decode --max-output-bytes {total})"
            )

    def _read(self, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        data = self._fs.cat_file(self._fpath, start=start, end=end)
        self.bytes_read += len(data)
        if len(data) != end - start:
            self._fail(f"short read: {len(data)} of {end - start} bytes at {start}")
        return data

    def _fetch(self, sections: list[_Section]) -> dict[int, bytes]:
        """Fetch sections (coalescing adjacent ones); verify each CRC. Keyed by id(section)."""
        secs = sorted({id(s): s for s in sections if s.length}.values(), key=lambda s: s.offset)
        ranges: list[list] = []
        for s in secs:
            if ranges and ranges[-1][1] == s.offset:
                ranges[-1][1] = s.offset + s.length
                ranges[-1][2].append(s)
            else:
                ranges.append([s.offset, s.offset + s.length, [s]])
        base = self.payload_start
        if len(ranges) > 1:
            blobs = self._fs.cat_ranges(
                [self._fpath] * len(ranges), [base + r[0] for r in ranges],
                [base + r[1] for r in ranges],
            )  # fmt: skip
        else:
            blobs = [
                self._fs.cat_file(self._fpath, start=base + r[0], end=base + r[1]) for r in ranges
            ]
        out: dict[int, bytes] = {id(s): b"" for s in sections}
        for (start, end, members), blob in zip(ranges, blobs, strict=True):
            if isinstance(blob, Exception):
                raise blob
            self.bytes_read += len(blob)
            if len(blob) != end - start:
                self._fail(f"short read: {len(blob)} of {end - start} payload bytes at {start}")
            mv = memoryview(blob)
            for s in members:
                data = mv[s.offset - start : s.offset - start + s.length]
                if zlib.crc32(data) != s.crc32:
                    self._fail(f"checksum mismatch in {s.what}")
                out[id(s)] = data
        for s in sections:
            if not s.length and s.crc32 != 0:
                self._fail(f"checksum mismatch in {s.what}")
        return out

    def _table(self, i: int, data: dict[int, bytes]):
        """Code table i, built when a chunk needs it; identical tables are built once, and
        at most limits.TABLE_CACHE_BYTES of them are kept (docs/FORMAT.md, section 6)."""
        t = self._h.tables[i]
        key = self._table_keys.get(i)
        if key is None:  # the table's bytes (CRC-checked, so fixed for the file) name it
            raw = bytes(data[id(t.section)]) if t.section.length else b""
            key = self._table_keys[i] = (t.kind, t.alphabet, t.width, raw)
        raw = key[3]

        def build():
            try:
                if t.kind == "fixed":
                    return CodeTable(fixed_lengths(t.alphabet), fixed=True)
                if t.kind == "rans":
                    return AnsTable.unpack(raw, t.alphabet)
                return CodeTable(unpack_lengths(raw, t.alphabet, t.width))
            except DecodeError as exc:
                self._fail(f"invalid code_tables[{i}]: {exc}")

        return self._tables.get(key, build)

    def _needed(self, t: _Tensor) -> list[_Section]:
        if t.kind == "raw":
            return [t.raw]
        secs = [self._h.codebooks[t.codebook][1]]
        for st in (t.indices, t.positions):
            if st is None:
                continue
            secs += [s for s, _ in st.chunks]
            secs += [self._h.tables[i].section for i in dict.fromkeys(st.tables())]
        return secs

    def _check_names(self, names: Iterable[str] | None) -> list[str]:
        if names is None:
            return list(self.names)
        names = [names] if isinstance(names, str) else list(names)
        for n in names:
            if n not in self._h.tensors:
                raise UnknownTensorError(f"{self.path}: {_unknown_name(n, self.names)}")
        return names

    def _load(self, names: list[str]) -> dict[int, bytes]:
        tensors = [self._h.tensors[n] for n in names]
        if len(names) == len(self.names):
            # Everything: one read of the whole payload, verifying every section's checksum.
            secs = [s for t in self._h.tensors.values() for s in self._needed(t)]
            secs += [c[1] for c in self._h.codebooks.values()]
            secs += [t.section for t in self._h.tables]
        else:
            secs = [s for t in tensors for s in self._needed(t)]
        # Codebooks are decoded per call (not kept for the reader's life), and their dense
        # form, which a ragged one's few bytes can make large, is bounded first.
        self._codebooks.clear()
        self._levels.clear()
        ids = {id(s) for s in secs}
        need = sum(codebook_work(c[0]) for c in self._h.codebooks.values() if id(c[1]) in ids)
        limit, why = self.output_limit()
        if need > max(limit, OUTPUT_FLOOR_BYTES):
            self._fail(f"its codebooks would take {need:,} bytes to decode, above the "
                       f"{max(limit, OUTPUT_FLOOR_BYTES):,}-byte cap ({why}); if you trust "
                       f"this file, raise it: max_output_bytes={need} "
                       f"(hwq decode --max-output-bytes {need})")
        data = self._fetch(secs)
        for i, t in enumerate(self._h.tables):
            if id(t.section) in data:
                self._table(i, data)
        for name, (shape, sec, dtype, ragged) in self._h.codebooks.items():
            if id(sec) in data and name not in self._codebooks:
                try:
                    self._codebooks[name] = decode_codebook(bytes(data[id(sec)]), shape, dtype,
                                                            ragged, f"codebook {name!r}")
                except ValueError as e:
                    self._fail(str(e))
                if ragged:
                    cd = np.dtype(count_dtype(shape[1]))
                    self._levels[name] = np.frombuffer(
                        bytes(data[id(sec)])[: shape[0] * cd.itemsize], cd).astype(np.int64)
        return data

    def read(
        self, names: Iterable[str] | str | None = None, *, map_fn: MapFn | None = None
    ) -> dict[str, np.ndarray]:
        """Dense decoded tensors {name: array of its shape and dtype} (bfloat16 as uint16 bits).

        Quantized: codebook[codes] (per-channel: codebook[row, codes]) scattered into zeros
        at the kept positions. Reads only the byte ranges these tensors need. Refuses (before
        fetching or allocating) a read past the output limits; see :meth:`output_limit`.
        """
        names = self._check_names(names)
        self._check_output(names)
        data = self._load(names)
        out = {}
        for n in names:
            t = self._h.tensors[n]
            if t.kind == "raw":
                a = np.frombuffer(data[id(t.raw)], _np_dtype(t.dtype)).reshape(t.shape)
                if t.dtype == "bool" and a.view(np.uint8).max(initial=0) > 1:
                    self._fail(f"tensor {n!r}: bool bytes other than 0 and 1")
                out[n] = a.astype(a.dtype.newbyteorder("="))
                continue
            codes, positions = self._codes(t, data, map_fn)
            # a rotated tensor is looked up in float32, rotated back, then cast
            cb = _cast_codebook(self._codebooks[t.codebook],
                                "float32" if t.rotate is not None else t.dtype)
            dense = np.zeros(t.numel, cb.dtype)
            # Codebook row of flat element i: i // per_row (channel: a row of the tensor;
            # group: g consecutive elements of a row).
            per_row = max(t.numel // cb.shape[0], 1) if cb.ndim == 2 and cb.shape[0] else 1
            # In blocks: no [n_kept] row-index or value temporaries next to the output.
            for b in range(0, codes.shape[0], _BLOCK):
                c = codes[b : b + _BLOCK]
                where = (
                    slice(b, b + c.shape[0]) if positions is None else positions[b : b + _BLOCK]
                )
                if cb.ndim == 2:
                    rows = np.arange(b, b + c.shape[0]) if positions is None else where
                    dense[where] = cb[rows // per_row, c]
                else:
                    dense[where] = cb[c]
            if t.rotate is not None:
                dense = _unrotate(dense.reshape(t.shape[0], -1), t.rotate, t.dtype)
            out[n] = dense.reshape(t.shape)
        return out

    def read_codes(self, name: str) -> dict[str, Any]:
        """The compressed form of one quantized tensor.

        Returns {"codes": [n_kept] uint, "positions": int64 [n_kept] flat kept positions or
        None (dense), "codebook": float32 [k] or [rows, k], "shape", "dtype"}.
        """
        (name,) = self._check_names([name])
        t = self._h.tensors[name]
        if t.kind != "quantized":
            raise ValueError(f"{self.path}: tensor {name!r} is raw, not quantized")
        data = self._load([name])
        codes, positions = self._codes(t, data, None)
        return {
            "codes": codes, "positions": positions, "codebook": self._codebooks[t.codebook],
            "shape": t.shape, "dtype": t.dtype, "rotate": t.rotate,
        }  # fmt: skip

    def accounting(self, *, map_fn: MapFn | None = None) -> dict:
        """The accounting dict write_hwq returned; decodes every stream (for the entropies)."""
        data = self._load(list(self.names))
        hist: list[np.ndarray] = [np.zeros(t.alphabet, np.int64) for t in self._h.tables]
        ctx_hist: dict[str, np.ndarray] = {}
        gaps: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        network = self._h.raw["code_sharing"] == "network"
        for t in self._h.tensors.values():
            for st in (t.indices, t.positions):
                if st is not None and st.chunks and st.coder == "table":
                    per_chunk = st.chunk_tables or [st.table] * len(st.chunks)
                    one = _Stream(None, [], 0)
                    for ch, i in zip(st.chunks, per_chunk, strict=True):
                        one.table, one.chunks, one.n_symbols = i, [ch], ch[1]
                        sym = self._decode_stream(one, data, map_fn,
                                                  symbol_dtype(self._h.tables[i].alphabet))
                        hist[i] += np.bincount(sym, minlength=hist[i].size)
            if t.kind != "quantized":
                continue
            # Each stream decoded once more at most: positions for the gap entropy, and the
            # context-coded indices (which need them) for theirs.
            pos = None if t.positions is None else self._positions(t, data, map_fn)
            if t.indices.coder == "context":
                codes, _ = self._codes(t, data, map_fn, pos)
                key = t.codebook if network else t.name
                k = self._h.codebooks[t.codebook][0][-1]
                ctx_hist[key] = ctx_hist.get(key, 0) + np.bincount(codes, minlength=k)
            if pos is not None:
                gaps.setdefault("" if network else t.name, []).append(
                    gap_histogram(np.diff(pos, prepend=-1)))
        ctx_entropy = sum(entropy_bits(h) * float(h.sum()) for h in ctx_hist.values())
        gap_entropy = sum(_gap_entropy_total(np.concatenate([v for v, _ in g]),
                                             np.concatenate([c for _, c in g]))
                          for g in gaps.values())
        return _accounting(self._h, hist, self.payload_start, ctx_entropy, gap_entropy)

    def inspect(self) -> list[dict]:
        """Per-item rows from the header alone (see :func:`inspect_hwq`)."""
        return inspect_rows(self._h, self.payload_start, self.file_bytes, self._out_bytes)


def _reject_constant(name: str):
    raise ValueError(f"non-finite number {name} in header")


def read_hwq(
    path_or_url: str | os.PathLike,
    names: Iterable[str] | str | None = None,
    *,
    storage_options: dict | None = None,
    max_output_bytes: int | None = None,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    max_tensor_bytes: int | None = None,
    map_fn: MapFn | None = None,
) -> dict[str, np.ndarray]:
    """Decode tensors (all, or ``names``) from a .hwq file into dense arrays.

    The limits (see :class:`HwqReader`): by default at most min(8 GiB, max(64 MiB, 4096 × the
    file size)) decoded bytes in all; pass ``max_output_bytes`` for a file you trust.
    """
    reader = HwqReader(
        path_or_url, storage_options=storage_options, max_output_bytes=max_output_bytes,
        max_header_bytes=max_header_bytes, max_tensor_bytes=max_tensor_bytes,
    )  # fmt: skip
    return reader.read(names, map_fn=map_fn)


def hwq_accounting(
    path_or_url: str | os.PathLike,
    *,
    storage_options: dict | None = None,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
) -> dict:
    """Bit accounting of a file (reads and decodes it all). Keys:

    - ``file_bytes``; ``bits``: {indices, positions, codebooks, code_tables, raw_tensors,
      header}, summing exactly to 8 * file_bytes (chunk padding counts with its stream;
      header = prefix + JSON + alignment padding);
    - ``n_weights`` (elements of quantized tensors), ``n_kept``, ``n_raw_elements``;
    - ``index_entropy_bits``: empirical entropy of the indices, bits per kept weight, of the
      histograms the code tables were built from (pooled per table, then averaged);
    - ``position_entropy_bits``: entropy of the gap-symbol streams, per kept weight;
    - ``index_bits_per_weight``, ``position_bits_per_weight``: coded bits per kept weight;
    - ``fixed_length_index_bits``: sum of n_kept * max(1, ceil(log2 k)) over tensors;
      ``ratio_fixed_length_bits``: that divided by the coded index bits (None if none);
    - ``compression_ratio``: (32 bits per quantized weight + raw tensor bits) / file bits.

    Decodes symbol streams but no dense tensor: memory is bounded by the payload size.
    """
    reader = HwqReader(
        path_or_url, storage_options=storage_options, max_header_bytes=max_header_bytes
    )
    return reader.accounting()


def inspect_hwq(
    path_or_url: str | os.PathLike,
    *,
    storage_options: dict | None = None,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
) -> list[dict]:
    """One row per item of the file, from its header alone (no payload read).

    Rows: the header; each codebook; each code table; each tensor with kind, shape, dtype,
    numel, n_kept, kept_fraction, index/position bytes, bits_per_weight (its stream bytes
    * 8 / numel), ``decoded_bytes`` (of its dense form), and ``share`` (its bytes / file
    bytes). The rows' bytes sum to the file size.
    """
    reader = HwqReader(
        path_or_url, storage_options=storage_options, max_header_bytes=max_header_bytes
    )
    return reader.inspect()


def one_tensor_decode(url: str, name: str, storage_options: dict | None = None) -> dict:
    """Decode one tensor of a .hwq file by range reads, and count the bytes read beside what
    that tensor needs: the header, its index and position sections, its codebook and the code
    tables its chunks use. Returns {"tensor", "shape", "seconds", "bytes_read",
    "header_bytes", "tensor_section_bytes", "file_bytes"}."""
    t0 = time.perf_counter()
    r = HwqReader(url, storage_options=storage_options)
    header_bytes = r.bytes_read
    d = next(x for x in r.header["tensors"] if x["name"] == name)
    sections = [d[s] for s in ("indices", "positions") if d.get(s)]
    own = sum(c[1] for s in sections for c in s["chunks"])
    cb = next(c for c in r.header["codebooks"] if c["name"] == d.get("codebook"))
    tables = {c[4] if len(c) > 4 else s.get("code_table") for s in sections for c in s["chunks"]}
    table_bytes = sum(r.header["code_tables"][i]["length"] for i in tables if i is not None)
    a = r.read([name])[name]
    return {"tensor": name, "shape": list(a.shape), "seconds": time.perf_counter() - t0,
            "bytes_read": r.bytes_read, "header_bytes": header_bytes,
            "tensor_section_bytes": own + cb["length"] + table_bytes,
            "file_bytes": r.file_bytes}
