"""The .hwq container: one file holding a quantized network (see docs/FORMAT.md).

Layout: a 24-byte prefix (magic, version, header length, header CRC), a JSON header, zero
padding to a multiple of 8, then the payload: codebooks, code tables, and per tensor its
index chunks and position chunks (or its raw bytes). Every payload byte belongs to exactly
one section with its own CRC-32, so a reader can fetch the header and then only the byte
ranges of the tensors it wants (local files and object stores alike, through fsspec).
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
import uuid
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .ans import AnsTable
from .bitio import MAX_CODE_LENGTH, DecodeError
from .codebooks import count_dtype, decode_codebook, encode_codebook, level_classes, row_levels
from .coders import decode_job, encode_job, make_table, mask_geometry, table_kind
from .context import max_decisions
from .huffman import (
    CodeTable,
    entropy_bits,
    fixed_lengths,
    pack_lengths,
    symbol_dtype,
    unpack_lengths,
)
from .positions import (
    MAX_GAP_LIMIT,
    choose_max_gap,
    gap_histogram,
    gap_symbol_counts,
    gaps_from_mask,
    gaps_to_symbols,
)

__all__ = [
    "DEFAULT_MAX_HEADER_BYTES",
    "DEFAULT_MAX_OUTPUT_BYTES",
    "DEFAULT_MAX_OUTPUT_RATIO",
    "FORMAT_VERSION",
    "MAGIC",
    "HwqFormatError",
    "HwqReader",
    "TensorEntry",
    "UnknownTensorError",
    "format_inspect",
    "hwq_accounting",
    "inspect_hwq",
    "read_hwq",
    "write_hwq",
]

MAGIC = b"HWQ1"
FORMAT_VERSION = 2
"""Version 2 adds rANS code tables and context-coded positions and indices. A file that uses
none of them is written as version 1, byte for byte what earlier writers produced; readers of
version 1 refuse version 2 files by their version number."""
READ_VERSIONS = (1, 2)
_PREFIX = struct.Struct("<4sHHQII")  # magic, version, flags, header_len, header_crc32, reserved
PREFIX_BYTES = _PREFIX.size  # 24
_ALIGN = 8  # payload starts 8-byte aligned so raw float64 tensors can be viewed in place
# Prefix flag: the header is zlib-compressed JSON (its field names repeat per tensor, so it
# shrinks ~3×; on a pruned LeNet-5 that is ~3.5% of the whole file).
FLAG_HEADER_ZLIB = 1

# Limits the reader enforces on untrusted files (docs/FORMAT.md, "Limits the decoder
# enforces"). Each refusal names the limit and the keyword that raises it.
DEFAULT_MAX_HEADER_BYTES = 16 << 20
"""Largest header, stored and inflated (16 MiB). An honest header grows with tensors and chunks
(~300 bytes per tensor, ~45 per chunk: a 70B-parameter model's is ~2 MB with the default
chunk size); parsing costs up to ~35 bytes of memory and ~70 ns per header byte, so 16 MiB
parses in about a second at worst. Raise with ``max_header_bytes``."""
DEFAULT_MAX_OUTPUT_BYTES = 8 << 30
"""Absolute default cap on the dense bytes one read decodes, all tensors together (8 GiB:
2G float32 weights, beyond any model this pipeline trains, and below a 16 GB machine's memory
so a refused file never starts swapping). Raise with ``max_output_bytes``."""
MAX_CODED_EXPANSION = 64
"""Most decoded bytes one stored byte can honestly describe outside the zeros of pruned
tensors: a raw byte decodes to 1 byte; a prefix codeword has at least 1 bit (a one-symbol
"constant" table too: length 0 means no codeword), so a stream byte holds at most 8 symbols,
each decoding to at most 8 bytes (float64)."""
DEFAULT_MAX_OUTPUT_RATIO = MAX_CODED_EXPANSION * 64
"""Default cap on decoded bytes per file byte (4096) for untrusted files. The format does
not bound the zeros of a pruned tensor (escapes advance 65,535 positions a bit; zeros after
the last kept weight cost nothing), so their allowance is policy: 64× beyond the coded
maximum admits a model pruned to 1/64 of its weights even at the format's minimum of 1 bit
per index and per gap symbol, and ~0.05% kept with realistic codes (~15 bits per kept weight); the best
published pruned models compress ~50×. Bombs of 2 GiB from 39 KB (55,000×) are refused."""
OUTPUT_FLOOR_BYTES = 64 << 20
"""The ratio never limits a read below 64 MiB: an allocation that small is harmless, and a
tiny file holding a fully pruned tensor (whose zeros cost only its shape) stays readable."""
ANS_MAX_ALPHABET = 1 << 16  # gap symbols use up to 65,536; codebooks at most 256 here
ANS_MAX_TABLE_BYTES_PER_SYMBOL = 4  # a serialized rANS frequency never takes more
_MAX_NUMEL = 1 << 48  # 256 T elements: keeps numel * itemsize and numpy's sizes in int64

QUANTIZED_DTYPES = ("float32", "float16", "bfloat16", "float64")
RAW_DTYPES = QUANTIZED_DTYPES + ("int64", "int32", "int16", "int8", "uint8", "bool")
_MAX_NDIM = 32
S3_PART_BYTES = 64 << 20  # object-store uploads: one part per this many bytes (S3: >= 5 MiB)

MapFn = Callable[[Callable[[Any], Any], Sequence[Any]], Iterable[Any]]


class HwqFormatError(ValueError):
    """A .hwq file is malformed, truncated, corrupt or hostile. ``path`` names the file."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class UnknownTensorError(KeyError, ValueError):
    """A tensor name the file does not hold. A KeyError for lookups, a ValueError (a user
    error, one line in the CLI); the message suggests close names."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass
class TensorEntry:
    """One tensor to store.

    Attributes:
        name: unique name (e.g. a state-dict key).
        shape: the tensor's shape.
        dtype: decoded dtype: for ``quantized`` one of float32/float16/bfloat16/float64 (the
            float32 codebook values are cast to it); for ``raw`` the array's dtype (one of
            RAW_DTYPES; bfloat16 arrays are passed as uint16 bit patterns).
        codes: [n_kept] unsigned ints, the codebook index of each KEPT element in flat C order.
        mask: bool [prod(shape)] or ``shape``; None = dense (all kept).
        codebook: name of a codebook in the ``codebooks`` dict: float32 [k] (one value per
            code) or [shape[0], k] (per output channel: element (r, ...) uses row r).
        raw: for kind ``raw``: the tensor itself, stored as is (little-endian).
    """

    name: str
    shape: tuple[int, ...] = ()
    dtype: str = "float32"
    codes: np.ndarray | None = None
    mask: np.ndarray | None = None
    codebook: str | None = None
    raw: np.ndarray | None = None

    @property
    def kind(self) -> str:
        return "raw" if self.raw is not None else "quantized"

    @classmethod
    def quantized(
        cls,
        name: str,
        shape: Sequence[int],
        codes: np.ndarray,
        codebook: str,
        mask: np.ndarray | None = None,
        dtype: str = "float32",
    ) -> TensorEntry:
        return cls(name, tuple(int(s) for s in shape), dtype, codes, mask, codebook, None)

    @classmethod
    def raw_tensor(cls, name: str, array: np.ndarray, dtype: str | None = None) -> TensorEntry:
        """A tensor stored as is. dtype defaults to the array's (give "bfloat16" for uint16 bits)."""
        a = np.asarray(array)
        return cls(name, tuple(a.shape), dtype or _dtype_name(a), None, None, None, a)


# ---------------------------------------------------------------------------------------------
# dtype helpers


def _dtype_name(a: np.ndarray) -> str:
    if a.dtype.name == "bfloat16":  # ml_dtypes arrays, if the caller uses them
        return "bfloat16"
    return a.dtype.name


def _np_dtype(name: str) -> np.dtype:
    """Storage dtype (little-endian); bfloat16 is stored and returned as uint16 bit patterns."""
    return np.dtype("<u2") if name == "bfloat16" else np.dtype(name).newbyteorder("<")


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


# ---------------------------------------------------------------------------------------------
# writing


def _flat_mask(entry: TensorEntry, shape: tuple[int, ...], numel: int) -> np.ndarray | None:
    if entry.mask is None:
        return None
    m = np.asarray(entry.mask)
    if m.dtype != np.bool_:
        raise ValueError(f"{entry.name}: mask must be bool, got {m.dtype}")
    if m.size != numel or (m.ndim > 1 and tuple(m.shape) != shape):
        raise ValueError(f"{entry.name}: mask shape {m.shape} does not match {shape}")
    m = m.reshape(-1)
    return None if m.all() else m


@dataclass
class _Prepared:
    entry: TensorEntry
    shape: tuple[int, ...]
    numel: int
    k: int = 0
    codes: np.ndarray | None = None  # [n_kept]
    mask: np.ndarray | None = None  # flat bool or None (dense)
    raw_bytes: bytes | memoryview = b""
    scope: str | None = None
    index_group: str | None = None
    pos_group: str | None = None
    gaps: np.ndarray | None = None
    # Rows grouped by their codebook row's level count ("levels" order): [(L, symbols)].
    classes: list[tuple[int, np.ndarray]] | None = None


def _check_codebooks(codebooks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    cbs: dict[str, np.ndarray] = {}
    for name, cb in codebooks.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"codebook names must be non-empty strings, got {name!r}")
        a = np.ascontiguousarray(cb, dtype="<f4")
        if a.ndim not in (1, 2) or a.shape[-1] < 1 or a.shape[-1] > (1 << MAX_CODE_LENGTH):
            raise ValueError(f"codebook {name!r} must be [k] or [rows, k], 1 <= k, got {a.shape}")
        cbs[name] = a
    return cbs


def _prepare_one(e: TensorEntry, cbs: dict[str, np.ndarray], code_sharing: str) -> _Prepared:
    """Validate one entry and derive what its streams need (scope is set by the caller, who
    knows how many tensors share each codebook)."""
    if not isinstance(e, TensorEntry):
        raise TypeError(f"an entry must be a TensorEntry (or a callable returning one), got "
                        f"{type(e).__name__}")
    if not isinstance(e.name, str) or not e.name:
        raise ValueError(f"tensor names must be non-empty strings, got {e.name!r}")
    shape = tuple(int(s) for s in e.shape)
    if any(s < 0 for s in shape) or len(shape) > _MAX_NDIM:
        raise ValueError(f"{e.name}: invalid shape {shape}")
    numel = math.prod(shape)
    if e.raw is not None:
        a = np.asarray(e.raw)
        if tuple(a.shape) != shape:
            raise ValueError(f"{e.name}: raw array shape {a.shape} != {shape}")
        if e.dtype not in RAW_DTYPES:
            raise ValueError(f"{e.name}: raw dtype {e.dtype!r} not in {RAW_DTYPES}")
        if e.dtype == "bfloat16":
            if a.dtype.name == "bfloat16":
                a = a.view(np.uint16)
            if a.dtype != np.uint16:
                raise ValueError(f"{e.name}: bfloat16 raw tensors are uint16 bit patterns")
        elif a.dtype != np.dtype(e.dtype):
            raise ValueError(f"{e.name}: raw array dtype {a.dtype} != declared {e.dtype}")
        # A view of the bytes, not a copy (a raw embedding can be hundreds of MB).
        data = memoryview(np.ascontiguousarray(a, dtype=_np_dtype(e.dtype)).reshape(-1)
                          .view(np.uint8))
        return _Prepared(e, shape, numel, raw_bytes=data)
    if e.dtype not in QUANTIZED_DTYPES:
        raise ValueError(f"{e.name}: quantized dtype {e.dtype!r} not in {QUANTIZED_DTYPES}")
    if e.codebook not in cbs or e.codes is None:
        raise ValueError(f"{e.name}: a quantized tensor needs codes and a known codebook")
    cb = cbs[e.codebook]
    k = int(cb.shape[-1])
    if cb.ndim == 2 and (len(shape) == 0 or cb.shape[0] % max(shape[0], 1)
                         or numel % max(cb.shape[0], 1)):
        raise ValueError(f"{e.name}: a per-row codebook {cb.shape} needs shape[0] rows "
                         f"(channel) or a multiple of them that divides {numel} (group)")
    mask = _flat_mask(e, shape, numel)
    codes = np.asarray(e.codes).reshape(-1)
    if codes.size and codes.dtype.kind not in "ui":
        raise ValueError(f"{e.name}: codes must be integers, got {codes.dtype}")
    n_kept = numel if mask is None else int(mask.sum())
    if codes.size != n_kept:
        raise ValueError(f"{e.name}: {codes.size} codes for {n_kept} kept elements")
    if codes.size and (int(codes.min()) < 0 or int(codes.max()) >= k):
        raise ValueError(f"{e.name}: codes out of range [0, {k}) of codebook {e.codebook!r}")
    codes = codes.astype(symbol_dtype(k), copy=False)
    p = _Prepared(e, shape, numel, k, codes, mask)
    p.index_group = e.codebook if code_sharing == "network" else e.name
    if mask is not None:
        p.gaps = gaps_from_mask(mask)
        p.pos_group = "" if code_sharing == "network" else e.name
    return p


def _scope(p: _Prepared, cb: np.ndarray, refs: int) -> str:
    if cb.ndim == 2:
        return "channel" if cb.shape[0] == p.shape[0] else "group"
    return "network" if refs > 1 else "tensor"


def _default_map(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    return [fn(x) for x in items]


def _gap_entropy_total(values: np.ndarray, counts: np.ndarray) -> float:
    """Order-0 entropy in bits of a gap stream with this histogram (all its gaps together;
    a value may repeat, as when several tensors' histograms are pooled)."""
    _, inv = np.unique(np.asarray(values, np.int64), return_inverse=True)
    c = np.bincount(inv.reshape(-1), weights=np.asarray(counts, np.float64))
    c = c[c > 0]
    n = c.sum()
    if n <= 0:
        return 0.0
    return float(-(c * np.log2(c / n)).sum())


def write_hwq(
    path_or_url: str | os.PathLike,
    entries: Sequence[TensorEntry],
    codebooks: dict[str, np.ndarray],
    *,
    code_sharing: str = "network",
    fixed_length: bool = False,
    chunk_symbols: int = 4_000_000,
    metadata: dict | None = None,
    storage_options: dict | None = None,
    map_fn: MapFn | None = None,
    codebook_dtype: str = "float32",
    coder: str = "huffman",
    positions: str = "gaps",
    indices: str = "static",
    stream_symbols: int = 1 << 26,
    spool_bytes: int = 256 << 20,
    spill_dir: str | None = None,
) -> dict:
    """Encode tensors into one .hwq file, atomically; return its bit accounting.

    Args:
        path_or_url: local path or fsspec URL (``s3://bucket/key`` ...).
        entries: tensors in file order: each a `TensorEntry`, or a zero-argument callable
            returning one (loaded when needed, two or three times, never all at once: how a
            model larger than memory is written; the bytes are the same either way).
        codebooks: name -> float32 [k] or [rows, k]. All are stored.
        code_sharing: ``"network"``: one Huffman table per codebook (indices) and one for all
            pruned tensors' positions; ``"tensor"``: one table per tensor for each stream.
        fixed_length: fixed-length codes instead of Huffman (for comparison: Han et al.'s
            fixed-width fields).
        chunk_symbols: symbols per independently decodable chunk.
        metadata: JSON-serializable dict stored in the header (e.g. the resolved run config).
        storage_options: fsspec options for URLs (credentials, endpoint).
        map_fn: ``map_fn(fn, jobs) -> results`` used to encode chunks, e.g. a Ray-backed map;
            default: in-process, in order.
        codebook_dtype: ``"float32"`` or ``"float16"`` (values must be exact in fp16). With
            float16, a per-row codebook [rows, k] is stored ragged: row r keeps only the levels
            its codes use (1 + its largest code), so a row with 5 levels costs 5 values.
        coder: the static code of every table-coded stream (indices, gap symbols):
            ``"huffman"`` (canonical, length-limited) or ``"ans"`` (rANS, within a fraction of
            a percent of the order-0 entropy).
        positions: ``"gaps"`` (gap symbols under a static table) or ``"context"`` (the mask
            bits, row by row, by the adaptive context-mixing coder).
        indices: ``"static"`` (a table per group) or ``"context"`` (adaptive, the row as
            context; tensors whose indices are level-ordered keep static tables).

        stream_symbols: with callable entries, tensors are encoded in windows of about this
            many elements (memory: the window's codes and their encoded bytes).
        spool_bytes: the payload is kept in memory up to this size, then in a temporary file
            in `spill_dir` (default: the system's), and copied into the destination at the end.

    Returns:
        The accounting dict (see :func:`hwq_accounting`).
    """
    if code_sharing not in ("network", "tensor"):
        raise ValueError(f"code_sharing must be 'network' or 'tensor', got {code_sharing!r}")
    if chunk_symbols < 1:
        raise ValueError("chunk_symbols must be >= 1")
    if codebook_dtype not in ("float32", "float16"):
        raise ValueError(f"codebook_dtype must be 'float32' or 'float16', got {codebook_dtype!r}")
    if coder not in ("huffman", "ans"):
        raise ValueError(f"coder must be 'huffman' or 'ans', got {coder!r}")
    if fixed_length and coder != "huffman":
        raise ValueError("fixed_length codes are a Huffman-table setting; use coder='huffman'")
    if positions not in ("gaps", "context"):
        raise ValueError(f"positions must be 'gaps' or 'context', got {positions!r}")
    if indices not in ("static", "context"):
        raise ValueError(f"indices must be 'static' or 'context', got {indices!r}")
    version = 1 if (coder, positions, indices) == ("huffman", "gaps", "static") else 2
    cbs = _check_codebooks(codebooks)
    lazy = any(callable(x) for x in entries)

    def load(i: int) -> _Prepared:
        x = entries[i]
        return _prepare_one(x() if callable(x) else x, cbs, code_sharing)

    # Pass 1, one tensor at a time: validation, codebook references, per-row level counts,
    # gap histograms (and index histograms when no level count can change them).
    seen: set[str] = set()
    refs: dict[str, int] = {}
    levels: dict[str, np.ndarray] = {}
    kept: list[_Prepared] = []  # in-memory entries only: prepared once
    idx_hist: dict[Any, np.ndarray] = {}
    ctx_idx_hist: dict[Any, np.ndarray] = {}  # context-coded indices: for the entropy only
    pos_gaps: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    late_hist = codebook_dtype == "float16"  # level classes known only after pass 1

    def add_index_hist(p: _Prepared) -> None:
        ctx = indices == "context" and p.classes is None
        parts = ([(p.index_group, p.codes)] if p.classes is None else
                 [((p.index_group, L), sym) for L, sym in p.classes])
        for key, sym in parts:
            h = np.bincount(sym, minlength=p.k if p.classes is None else key[1])
            pool = ctx_idx_hist if ctx else idx_hist
            pool[key] = pool.get(key, 0) + h.astype(np.int64)

    for i in range(len(entries)):
        p = load(i)
        if p.entry.name in seen:
            raise ValueError(f"duplicate tensor name {p.entry.name!r}")
        seen.add(p.entry.name)
        if p.codes is not None:
            refs[p.entry.codebook] = refs.get(p.entry.codebook, 0) + 1
            if late_hist:
                for name, need in row_levels([p], cbs).items():
                    prev = levels.get(name)
                    levels[name] = need if prev is None else np.maximum(prev, need)
            else:
                add_index_hist(p)
        if p.gaps is not None:
            pos_gaps.setdefault(p.pos_group, []).append(gap_histogram(p.gaps))
        if not lazy:
            kept.append(p)

    def final(i: int) -> _Prepared:
        p = kept[i] if not lazy else load(i)
        if p.codes is not None:
            p.scope = _scope(p, cbs[p.entry.codebook], refs[p.entry.codebook])
            if p.mask is None and p.entry.codebook in levels and p.classes is None:
                p.classes = level_classes(p.codes, levels[p.entry.codebook])
        return p

    if late_hist:  # Pass 2: index histograms by level class, in tensor order.
        for i in range(len(entries)):
            p = final(i)
            if p.codes is not None:
                add_index_hist(p)

    # Code tables: pooled histograms per group; a group with no symbols gets no table.
    # Level-ordered tensors: one table per (group, level count).
    tables: list[Any] = []
    table_hist: list[np.ndarray] = []
    table_of: dict[tuple[str, str], int] = {}
    for g, h in idx_hist.items():
        if h.sum() > 0:
            table_of[("i", g)] = len(tables)
            tables.append(make_table(h, coder, fixed=fixed_length))
            table_hist.append(h)
    max_gap_of: dict[str, int] = {}
    gap_entropy = 0.0  # order-0 entropy of the gap values, pooled as the tables would be
    for g, hists in pos_gaps.items():
        vals = np.concatenate([v for v, _ in hists])
        cnts = np.concatenate([c for _, c in hists])
        if vals.size == 0:
            continue
        gap_entropy += _gap_entropy_total(vals, cnts)
        if positions == "context":
            continue
        m, table = choose_max_gap(vals, cnts, fixed=fixed_length, coder=coder)
        max_gap_of[g] = m
        table_of[("p", g)] = len(tables)
        tables.append(table)
        table_hist.append(gap_symbol_counts(vals, cnts, m))
    del pos_gaps

    def tensor_jobs(p: _Prepared) -> list[tuple[str, tuple, int | None]]:
        """(stream, job, own table) of one tensor's chunks, in payload order."""
        out: list[tuple[str, tuple, int | None]] = []
        if indices == "context" and p.classes is None:
            _, cols, _ = mask_geometry(p.shape)
            flat = np.flatnonzero(p.mask) if p.mask is not None else None
            for i in range(0, p.codes.shape[0], chunk_symbols):
                c = p.codes[i : i + chunk_symbols]
                at = flat[i : i + c.shape[0]] if flat is not None else \
                    np.arange(i, i + c.shape[0], dtype=np.int64)
                rows = at // max(cols, 1)
                out.append(("indices", ("index", c, p.k, rows - (rows[0] if rows.size else 0)),
                            None))
        else:
            pieces = ([(p.codes, table_of.get(("i", p.index_group)), False)]
                      if p.classes is None else
                      [(sym, table_of.get(("i", (p.index_group, L))), True)
                       for L, sym in p.classes])
            for sym, t, own in pieces:
                for i in range(0, sym.shape[0], chunk_symbols):
                    out.append(("indices", ("table", sym[i : i + chunk_symbols], tables[t]),
                                t if own else None))
        if p.gaps is None:
            return out
        if positions == "context":
            rows, cols, group = mask_geometry(p.shape)
            bits = p.mask.reshape(rows, cols)
            step = max(1, chunk_symbols // max(cols, 1))
            for r in range(0, rows, step):
                out.append(("positions", ("mask", bits[r : r + step], group), None))
        else:
            sym = gaps_to_symbols(p.gaps, max_gap_of.get(p.pos_group, 1))
            t = table_of.get(("p", p.pos_group))
            for i in range(0, sym.shape[0], chunk_symbols):
                out.append(("positions", ("table", sym[i : i + chunk_symbols], tables[t]), None))
        return out

    # Pass 3: the payload, section by section, into a spool (memory, then a file past
    # spool_bytes); tensors are encoded in windows of about stream_symbols symbols.
    payload = tempfile.SpooledTemporaryFile(max_size=spool_bytes, dir=spill_dir)  # noqa: SIM115
    try:
        offset = 0

        def put(data: bytes) -> list[int]:
            nonlocal offset
            payload.write(data)
            sec = [offset, len(data), zlib.crc32(data)]
            offset += len(data)
            return sec

        h_codebooks = []
        for name, a in cbs.items():
            blob, extra = encode_codebook(name, a, codebook_dtype, levels.get(name))
            o, n, c = put(blob)
            h_codebooks.append(
                {"name": name, "shape": list(a.shape), "dtype": codebook_dtype, **extra,
                 "offset": o, "length": n, "crc32": c}
            )  # fmt: skip
        h_tables = []
        for t in tables:
            d: dict[str, Any] = {"kind": table_kind(t), "alphabet": t.alphabet}
            if isinstance(t, AnsTable):
                o, n, c = put(t.pack())
                d.update(offset=o, length=n, crc32=c)
            elif t.fixed:
                d.update(fixed_length=t.max_length, width=None, offset=offset, length=0, crc32=0)
            else:
                data, width = pack_lengths(t.lengths)
                o, n, c = put(data)
                d.update(fixed_length=None, width=width, offset=o, length=n, crc32=c)
            h_tables.append(d)
        h_tensors: list[dict] = []

        def emit(window: list[tuple[_Prepared, list]]) -> None:
            jobs = [job for _, tj in window for _, job, _ in tj]
            encoded = list((map_fn or _default_map)(encode_job, jobs)) if jobs else []
            if len(encoded) != len(jobs):
                raise RuntimeError(f"map_fn returned {len(encoded)} results for {len(jobs)} "
                                   f"jobs")
            it = iter(encoded)
            for p, tj in window:
                e = p.entry
                d = {"name": e.name, "kind": e.kind, "shape": list(p.shape), "dtype": e.dtype}
                if p.codes is None:
                    o, n, c = put(p.raw_bytes)
                    d.update(offset=o, length=n, crc32=c)
                    h_tensors.append(d)
                    continue
                d.update(scope=p.scope, codebook=e.codebook, n_kept=int(p.codes.shape[0]))
                d["positions"] = None
                for sname in ("indices", "positions"):
                    mine = [own for st, _, own in tj if st == sname]
                    if sname == "positions" and p.gaps is None:
                        continue
                    chunks = []
                    for own in mine:
                        ch = next(it)
                        o, n, c = put(ch.data)
                        chunks.append([o, n, ch.n_symbols, c] + ([] if own is None else [own]))
                    key = ("i", p.index_group) if sname == "indices" else ("p", p.pos_group)
                    context = (positions if sname == "positions" else indices) == "context"
                    if sname == "indices" and p.classes is not None:
                        stream = {"code_table": None, "order": "levels", "chunks": chunks}
                    elif context:
                        stream = {"code_table": None, "coder": "context", "chunks": chunks}
                    else:
                        stream = {"code_table": table_of.get(key), "chunks": chunks}
                    if sname == "positions" and not context:
                        stream["max_gap"] = max_gap_of.get(p.pos_group)
                    d[sname] = stream
                h_tensors.append(d)

        window: list[tuple[_Prepared, list]] = []
        pending = 0
        for i in range(len(entries)):
            p = final(i)
            tj = tensor_jobs(p) if p.codes is not None else []
            window.append((p, tj))
            pending += p.numel if p.codes is not None else len(p.raw_bytes)
            if not lazy or pending < stream_symbols:
                continue
            emit(window)
            window, pending = [], 0
        emit(window)
        header = {
            "format": "hwq",
            "version": version,
            "payload_bytes": offset,
            "code_sharing": code_sharing,
            "fixed_length": bool(fixed_length),
            "codebooks": h_codebooks,
            "code_tables": h_tables,
            "tensors": h_tensors,
            "metadata": metadata or {},
        }
        hjson = zlib.compress(json.dumps(header, separators=(",", ":"), allow_nan=False).encode(),
                              9)
        payload_start = _payload_start(len(hjson))
        prefix = _PREFIX.pack(MAGIC, version, FLAG_HEADER_ZLIB, len(hjson), zlib.crc32(hjson), 0)
        pad = b"\0" * (payload_start - PREFIX_BYTES - len(hjson))
        payload.seek(0)
        _atomic_write(str(path_or_url), prefix + hjson + pad, payload, storage_options)
    finally:
        payload.close()

    parsed = _parse_header(str(path_or_url), header, payload_start + offset)
    ctx_entropy = sum(entropy_bits(h) * float(h.sum()) for h in ctx_idx_hist.values())
    return _accounting(parsed, table_hist, payload_start, ctx_entropy, gap_entropy)


def _payload_start(header_len: int) -> int:
    return -(-(PREFIX_BYTES + header_len) // _ALIGN) * _ALIGN


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


# ---------------------------------------------------------------------------------------------
# header validation (untrusted input)


class _Bad(Exception):
    """Internal: a validation failure, converted to HwqFormatError with the file name."""


def _int(x: Any, what: str, lo: int = 0, hi: int | None = None) -> int:
    if type(x) is not int:
        raise _Bad(f"{what} must be an integer, got {type(x).__name__}")
    if x < lo or (hi is not None and x > hi):
        raise _Bad(f"{what} = {x} out of range [{lo}, {hi if hi is not None else 'inf'}]")
    return x


def _str(x: Any, what: str) -> str:
    if type(x) is not str or not x:
        raise _Bad(f"{what} must be a non-empty string")
    return x


def _dict(x: Any, what: str) -> dict:
    if type(x) is not dict:
        raise _Bad(f"{what} must be an object")
    return x


def _list(x: Any, what: str) -> list:
    if type(x) is not list:
        raise _Bad(f"{what} must be a list")
    return x


@dataclass
class _Section:
    offset: int
    length: int
    crc32: int
    what: str


@dataclass
class _Stream:
    table: int | None
    chunks: list[tuple[_Section, int]]  # (section, n_symbols; rows for context positions)
    n_symbols: int
    max_gap: int | None = None
    chunk_tables: list[int] | None = None  # per chunk, when the stream has no single table
    order: str = "rows"  # "levels": rows grouped by their codebook row's level count
    coder: str = "table"  # "context": adaptive context-mixing coder, no table (version 2)

    def tables(self) -> list[int]:
        return list(self.chunk_tables or []) + ([] if self.table is None else [self.table])


@dataclass
class _Tensor:
    name: str
    kind: str
    shape: tuple[int, ...]
    dtype: str
    numel: int
    scope: str | None = None
    codebook: str | None = None
    n_kept: int = 0
    indices: _Stream | None = None
    positions: _Stream | None = None
    raw: _Section | None = None


@dataclass
class _Table:
    kind: str
    alphabet: int
    width: int | None
    fixed_length: int | None
    section: _Section


@dataclass
class _Header:
    raw: dict
    version: int
    payload_bytes: int
    codebooks: dict[str, tuple[tuple[int, ...], _Section, str, bool]]  # shape, section, dtype, ragged
    tables: list[_Table]
    tensors: dict[str, _Tensor]


def _section(d: dict, what: str, payload: int) -> _Section:
    o = _int(d.get("offset"), f"{what}.offset", 0, payload)
    n = _int(d.get("length"), f"{what}.length", 0, payload - o)
    return _Section(o, n, _int(d.get("crc32"), f"{what}.crc32", 0, 0xFFFFFFFF), what)


def _stream(d: Any, what: str, payload: int, tables: list[_Table], version: int) -> _Stream:
    d = _dict(d, what)
    n_tables = len(tables)
    t = d.get("code_table")
    table = None if t is None else _int(t, f"{what}.code_table", 0, n_tables - 1)
    order = d.get("order", "rows")
    if order not in ("rows", "levels"):
        raise _Bad(f"{what}.order must be 'rows' or 'levels'")
    coder = d.get("coder", "table")
    if coder not in ("table", "context") or (coder != "table" and version < 2):
        raise _Bad(f"{what}.coder must be 'table'" + (" or 'context'" if version >= 2 else ""))
    if coder == "context" and (table is not None or order != "rows"):
        raise _Bad(f"{what}: a context-coded stream has no code table and is in row order")
    # Huffman and fixed codewords have at least one bit, which bounds a chunk's symbols by
    # its bytes. rANS and context-coded chunks can hold more symbols than bits; their counts
    # are bounded by the tensor (checked by the caller against n_kept and numel).
    prefix_coded = coder == "table" and order == "rows" and (
        table is None or tables[table].kind != "rans")
    chunks = []
    own: list[int] = []
    total = 0
    for i, c in enumerate(_list(d.get("chunks"), f"{what}.chunks")):
        c = _list(c, f"{what}.chunks[{i}]")
        if len(c) != (5 if order == "levels" else 4):
            raise _Bad(f"{what}.chunks[{i}] must be [offset, length, symbols, crc32"
                       + (", code_table]" if order == "levels" else "]"))
        sec = _section(
            {"offset": c[0], "length": c[1], "crc32": c[3]}, f"{what}.chunks[{i}]", payload
        )
        # Every codeword has at least one bit: bounds the allocation by the payload size.
        # (A one-symbol table has 0-bit codewords: then the symbols are bounded by the rows.)
        n = _int(c[2], f"{what}.chunks[{i}].symbols", 1,
                 8 * sec.length if prefix_coded else _MAX_NUMEL)
        if order == "levels":
            own.append(_int(c[4], f"{what}.chunks[{i}].code_table", 0, n_tables - 1))
        chunks.append((sec, n))
        total += n
    if order == "levels" and table is not None:
        raise _Bad(f"{what}: a level-ordered stream names a table per chunk, not one")
    if total and table is None and order == "rows" and coder == "table":
        raise _Bad(f"{what} has symbols but no code table")
    return _Stream(table, chunks, total, chunk_tables=own if order == "levels" else None,
                   order=order, coder=coder)


def _parse_header(path: str, h: Any, file_bytes: int) -> _Header:
    try:
        return _parse_header_inner(h, file_bytes)
    except _Bad as exc:
        raise HwqFormatError(path, f"invalid header: {exc}") from None


def _parse_header_inner(h: Any, file_bytes: int) -> _Header:
    h = _dict(h, "header")
    version = h.get("version")
    if h.get("format") != "hwq" or type(version) is not int or version not in READ_VERSIONS:
        raise _Bad(f"not an hwq header of version {' or '.join(map(str, READ_VERSIONS))}")
    payload = _int(h.get("payload_bytes"), "payload_bytes", 0, file_bytes)
    if h.get("code_sharing") not in ("network", "tensor"):
        raise _Bad("code_sharing must be 'network' or 'tensor'")
    if type(h.get("fixed_length")) is not bool:
        raise _Bad("fixed_length must be a boolean")
    _dict(h.get("metadata"), "metadata")
    sections: list[_Section] = []

    codebooks: dict[str, tuple[tuple[int, ...], _Section, str, bool]] = {}
    for i, c in enumerate(_list(h.get("codebooks"), "codebooks")):
        c = _dict(c, f"codebooks[{i}]")
        name = _str(c.get("name"), f"codebooks[{i}].name")
        if name in codebooks:
            raise _Bad(f"duplicate codebook {name!r}")
        dtype = c.get("dtype")
        if dtype not in ("float32", "float16"):
            raise _Bad(f"codebook {name!r}: dtype must be float32 or float16")
        ragged = c.get("ragged", False)
        if not isinstance(ragged, bool) or (ragged and dtype != "float16"):
            raise _Bad(f"codebook {name!r}: ragged must be a boolean, only for float16")
        shape = tuple(
            _int(s, f"codebook {name!r} shape", 0) for s in _list(c.get("shape"), "shape")
        )
        if len(shape) not in (1, 2) or not 1 <= shape[-1] <= (1 << MAX_CODE_LENGTH):
            raise _Bad(f"codebook {name!r}: shape {shape} must be [k] or [rows, k], k >= 1")
        if ragged and len(shape) != 2:
            raise _Bad(f"codebook {name!r}: a ragged codebook is [rows, k]")
        sec = _section(c, f"codebook {name!r}", payload)
        if ragged:
            rows, k = shape
            cw = np.dtype(count_dtype(k)).itemsize
            if not rows * (cw + 2) <= sec.length <= rows * (cw + 2 * k):
                raise _Bad(f"codebook {name!r}: {sec.length} bytes for a ragged {shape}")
        elif sec.length != (4 if dtype == "float32" else 2) * math.prod(shape):
            raise _Bad(f"codebook {name!r}: {sec.length} bytes for shape {shape}")
        codebooks[name] = (shape, sec, dtype, ragged)
        sections.append(sec)

    tables: list[_Table] = []
    for i, t in enumerate(_list(h.get("code_tables"), "code_tables")):
        t = _dict(t, f"code_tables[{i}]")
        kind = t.get("kind")
        sec = _section(t, f"code_tables[{i}]", payload)
        if kind == "huffman":
            width = _int(t.get("width"), f"code_tables[{i}].width", 1, 5)
            # The section size fixes the alphabet, so a table cannot claim more than it holds.
            alphabet = _int(
                t.get("alphabet"), f"code_tables[{i}].alphabet", 1, 1 << MAX_CODE_LENGTH
            )
            if sec.length != (alphabet * width + 7) >> 3:
                raise _Bad(f"code_tables[{i}]: {sec.length} bytes for {alphabet} x {width} bits")
            tables.append(_Table(kind, alphabet, width, None, sec))
        elif kind == "fixed":
            alphabet = _int(
                t.get("alphabet"), f"code_tables[{i}].alphabet", 1, 1 << MAX_CODE_LENGTH
            )
            fl = _int(t.get("fixed_length"), f"code_tables[{i}].fixed_length", 1, MAX_CODE_LENGTH)
            if fl != max(1, (alphabet - 1).bit_length()) or sec.length != 0:
                raise _Bad(f"code_tables[{i}]: fixed table inconsistent with its alphabet")
            tables.append(_Table(kind, alphabet, None, fl, sec))
        elif kind == "rans" and version >= 2:
            alphabet = _int(t.get("alphabet"), f"code_tables[{i}].alphabet", 1, ANS_MAX_ALPHABET)
            # The serialized frequencies: at least a byte, at most a few bytes per symbol.
            if not 1 <= sec.length <= ANS_MAX_TABLE_BYTES_PER_SYMBOL * alphabet + 16:
                raise _Bad(f"code_tables[{i}]: {sec.length} bytes for an rANS table of "
                           f"{alphabet} symbols")
            tables.append(_Table(kind, alphabet, None, None, sec))
        else:
            kinds = "'huffman', 'fixed'" + (" or 'rans'" if version >= 2 else "")
            raise _Bad(f"code_tables[{i}].kind must be {kinds}")
        sections.append(sec)

    tensors: dict[str, _Tensor] = {}
    for i, d in enumerate(_list(h.get("tensors"), "tensors")):
        d = _dict(d, f"tensors[{i}]")
        name = _str(d.get("name"), f"tensors[{i}].name")
        if name in tensors:
            raise _Bad(f"duplicate tensor {name!r}")
        what = f"tensor {name!r}"
        shape_l = _list(d.get("shape"), f"{what}.shape")
        if len(shape_l) > _MAX_NDIM:
            raise _Bad(f"{what}: more than {_MAX_NDIM} dimensions")
        shape = tuple(_int(s, f"{what}.shape", 0, _MAX_NUMEL) for s in shape_l)
        numel = math.prod(shape)
        if numel > _MAX_NUMEL:
            raise _Bad(f"{what}: shape {list(shape)} has more than 2^48 elements")
        kind = d.get("kind")
        dtype = d.get("dtype")
        if kind == "raw":
            if dtype not in RAW_DTYPES:
                raise _Bad(f"{what}: dtype {dtype!r} not in {RAW_DTYPES}")
            sec = _section(d, what, payload)
            if sec.length != numel * _np_dtype(dtype).itemsize:
                raise _Bad(f"{what}: {sec.length} bytes for shape {shape} {dtype}")
            tensors[name] = _Tensor(name, kind, shape, dtype, numel, raw=sec)
            sections.append(sec)
            continue
        if kind != "quantized":
            raise _Bad(f"{what}: kind must be 'quantized' or 'raw'")
        if dtype not in QUANTIZED_DTYPES:
            raise _Bad(f"{what}: dtype {dtype!r} not in {QUANTIZED_DTYPES}")
        cbname = _str(d.get("codebook"), f"{what}.codebook")
        if cbname not in codebooks:
            raise _Bad(f"{what}: unknown codebook {cbname!r}")
        cbshape = codebooks[cbname][0]
        scope = d.get("scope")
        if scope not in ("network", "tensor", "channel", "group"):
            raise _Bad(f"{what}: scope must be network, tensor, channel or group")
        if (scope in ("channel", "group")) != (len(cbshape) == 2):
            raise _Bad(f"{what}: scope {scope} does not match codebook shape {cbshape}")
        if scope == "channel" and (not shape or cbshape[0] != shape[0]):
            raise _Bad(f"{what}: channel codebook {cbshape} needs {shape[:1]} rows")
        if scope == "group" and (not shape or cbshape[0] % max(shape[0], 1) or
                                 numel % max(cbshape[0], 1) or cbshape[0] <= shape[0]):
            raise _Bad(f"{what}: group codebook {cbshape} does not split {shape} into groups")
        n_kept = _int(d.get("n_kept"), f"{what}.n_kept", 0, numel)
        ind = _stream(d.get("indices"), f"{what}.indices", payload, tables, version)
        if ind.n_symbols != n_kept:
            raise _Bad(f"{what}: {ind.n_symbols} index symbols for {n_kept} kept weights")
        if ind.coder == "context" and cbshape[-1] >= 2:
            for sec, n in ind.chunks:
                if n > max_decisions(sec.length):
                    raise _Bad(f"{sec.what}: {n} symbols cannot fit in {sec.length} bytes")
        if any(tables[i].alphabet > cbshape[-1] for i in ind.tables()):
            raise _Bad(f"{what}: code table alphabet exceeds codebook size {cbshape[-1]}")
        if ind.order == "levels" and (not codebooks[cbname][3] or d.get("positions") is not None):
            raise _Bad(f"{what}: level-ordered indices need a ragged codebook and a dense tensor")
        pos = None
        if d.get("positions") is not None:
            pos = _stream(d.get("positions"), f"{what}.positions", payload, tables, version)
            if pos.table is not None:
                mg = _int(d["positions"].get("max_gap"), f"{what}.max_gap", 1, MAX_GAP_LIMIT)
                if tables[pos.table].alphabet != mg + 1:
                    raise _Bad(f"{what}: positions table alphabet != max_gap + 1")
                pos.max_gap = mg
                # Each kept weight is one symbol, each escape skips max_gap positions.
                if pos.n_symbols > n_kept + numel // mg + 1:
                    raise _Bad(f"{what}: {pos.n_symbols} position symbols for {numel} "
                               f"elements")
            if pos.coder == "context":
                rows, cols, _ = mask_geometry(shape)
                if pos.n_symbols != rows:
                    raise _Bad(f"{what}: context-coded positions hold {pos.n_symbols} rows "
                               f"of {rows}")
                # The adaptive coder's densest case bounds the bits a chunk can describe.
                for sec, n in pos.chunks:
                    if n * cols > max_decisions(sec.length):
                        raise _Bad(f"{sec.what}: {n} rows of {cols} cannot fit in "
                                   f"{sec.length} bytes")
            elif pos.n_symbols < n_kept:
                raise _Bad(f"{what}: {pos.n_symbols} position symbols for {n_kept} kept")
        elif n_kept != numel:
            raise _Bad(f"{what}: dense tensor with n_kept {n_kept} != {numel} elements")
        tensors[name] = _Tensor(
            name, kind, shape, dtype, numel, scope, cbname, n_kept, ind, pos, None
        )
        sections += [s for s, _ in ind.chunks] + ([s for s, _ in pos.chunks] if pos else [])

    # Every table must serve a stream (the writer never stores another): a table's alphabet
    # is then bounded by its codebook (4 bytes a symbol) or by max_gap + 1, so building its
    # decoder costs memory in proportion to the payload, not 2^24 symbols per 2 MB section.
    used = {i for t in tensors.values() for st in (t.indices, t.positions)
            if st is not None for i in st.tables()}  # fmt: skip
    for i in range(len(tables)):
        if i not in used:
            raise _Bad(f"code_tables[{i}] is used by no stream")

    # Sections must tile the payload exactly: every payload byte is under one checksum.
    end = 0
    for s in sorted(sections, key=lambda s: (s.offset, s.length)):
        if s.offset != end:
            what = "overlaps" if s.offset < end else "leaves a gap before"
            raise _Bad(f"{s.what} {what} byte {end} of the payload")
        end += s.length
    if end != payload:
        raise _Bad(f"sections cover {end} of {payload} payload bytes")
    return _Header(h, version, payload, codebooks, tables, tensors)


# ---------------------------------------------------------------------------------------------
# reading


def _unknown_name(name: str, names: list[str]) -> str:
    """'no tensor named X; did you mean ...? (N tensors: a, b, ...)' in one line."""
    import difflib

    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    return f"no tensor named {name!r}{hint} (the file has {len(names)}: {shown})"


_BLOCK = 1 << 20
"""Elements per block when turning gap symbols into positions and scattering codebook values:
the int64 temporaries stay ~10 MB whatever the tensor or stream size."""


class HwqReader:
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
        self._tables: dict[int, CodeTable] = {}
        self._codebooks: dict[str, np.ndarray] = {}
        self._levels: dict[str, np.ndarray] = {}  # level counts of ragged codebooks
        self.file_bytes = int(self._fs.size(self._fpath))
        if self.file_bytes < PREFIX_BYTES:
            self._fail(f"{self.file_bytes} bytes is too short for an hwq file")
        magic, version, flags, hlen, hcrc, reserved = _PREFIX.unpack(self._read(0, PREFIX_BYTES))
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
        if i not in self._tables:
            t = self._h.tables[i]
            try:
                if t.kind == "fixed":
                    ct = CodeTable(fixed_lengths(t.alphabet), fixed=True)
                elif t.kind == "rans":
                    ct = AnsTable.unpack(bytes(data[id(t.section)]), t.alphabet)
                else:
                    ct = CodeTable(unpack_lengths(bytes(data[id(t.section)]), t.alphabet, t.width))
            except DecodeError as exc:
                self._fail(f"invalid code_tables[{i}]: {exc}")
            self._tables[i] = ct
        return self._tables[i]

    def _needed(self, t: _Tensor) -> list[_Section]:
        if t.kind == "raw":
            return [t.raw]
        secs = [self._h.codebooks[t.codebook][1]]
        for st in (t.indices, t.positions):
            if st is None:
                continue
            secs += [s for s, _ in st.chunks]
            for i in dict.fromkeys(st.tables()):
                if i not in self._tables:
                    secs.append(self._h.tables[i].section)
        return secs

    def _rows_in_order(self, t: _Tensor, codes: np.ndarray) -> np.ndarray:
        """Level-ordered codes (rows grouped by level count, ascending) back in row order."""
        levels = self._levels.get(t.codebook)
        if levels is None:
            self._fail(f"tensor {t.name!r}: level-ordered indices without level counts")
        rows = levels.shape[0]
        per_row = t.numel // max(rows, 1)
        order = np.argsort(levels, kind="stable")
        if codes.shape[0] != rows * per_row:
            self._fail(f"tensor {t.name!r}: {codes.shape[0]} codes for {rows} rows of {per_row}")
        out = np.empty((rows, per_row), codes.dtype)
        out[order] = codes.reshape(rows, per_row)
        if rows and int(np.max(out.max(axis=1, initial=0) - (levels - 1).astype(np.int64))) > 0:
            self._fail(f"tensor {t.name!r}: a code beyond its row's levels")
        return out.reshape(-1)

    def _check_names(self, names: Iterable[str] | None) -> list[str]:
        if names is None:
            return list(self.names)
        names = [names] if isinstance(names, str) else list(names)
        for n in names:
            if n not in self._h.tensors:
                raise UnknownTensorError(f"{self.path}: {_unknown_name(n, self.names)}")
        return names

    def _stream_parts(self, st: _Stream, data, map_fn, extra=None) -> Iterable[np.ndarray]:
        """The decoded chunks of a stream, in order; in-process they are decoded lazily, one
        at a time. A prefix-coded chunk holds at most 8 symbols per byte, an rANS or context
        chunk at most what its tensor bounds (both checked in the header).

        extra: for context-coded streams, per chunk the arguments after (data, n) of its
        decode job (positions: cols, group; indices: k, the chunk's rows)."""
        if not st.chunks:
            return []
        # Workers of a distributed map_fn need picklable bytes, not memoryviews.
        blobs = [bytes(data[id(s)]) if map_fn else data[id(s)] for s, _ in st.chunks]
        if st.coder == "context":
            kind = "mask" if extra and extra[0] == "mask" else "index"
            jobs = [(kind, b, n, *x) for b, (_, n), x in zip(blobs, st.chunks, extra[1],
                                                             strict=True)]
        else:
            per_chunk = st.chunk_tables or [st.table] * len(st.chunks)
            tables = {i: self._table(i, data) for i in dict.fromkeys(per_chunk)}
            jobs = [("table", b, n, tables[i])
                    for b, (_, n), i in zip(blobs, st.chunks, per_chunk, strict=True)]
        if map_fn is None:
            return (self._decode_one(j) for j in jobs)
        try:
            return list(map_fn(decode_job, jobs))
        except DecodeError as exc:
            self._fail(f"corrupt stream: {exc}")

    def _decode_one(self, job: tuple[Any, ...]) -> np.ndarray:
        try:
            return decode_job(job)
        except DecodeError as exc:
            self._fail(f"corrupt stream: {exc}")

    def _decode_stream(self, st: _Stream, data, map_fn, extra=None) -> np.ndarray:
        parts = list(self._stream_parts(st, data, map_fn, extra))
        if not parts:
            return np.zeros(0, np.uint8)
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

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
        extra = ("mask", [(cols, group)] * len(t.positions.chunks))
        for part in self._stream_parts(t.positions, data, map_fn, extra):
            p = np.flatnonzero(part.reshape(-1)) + row * cols
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
        if t.indices.coder == "context":
            _, cols, _ = mask_geometry(t.shape)
            extra, start = [], 0
            for _, n in t.indices.chunks:
                at = positions[start : start + n] if positions is not None else \
                    np.arange(start, start + n, dtype=np.int64)
                rows = at // max(cols, 1)
                extra.append((k, rows - (rows[0] if rows.size else 0)))
                start += n
            codes = self._decode_stream(t.indices, data, map_fn, ("index", extra))
        else:
            codes = self._decode_stream(t.indices, data, map_fn)
        if t.indices.order == "levels":
            codes = self._rows_in_order(t, codes)
        if codes.size and int(codes.max()) >= k:
            self._fail(f"tensor {t.name!r}: code out of range of its {k}-entry codebook")
        return codes, positions

    def _load(self, names: list[str]) -> dict[int, bytes]:
        tensors = [self._h.tensors[n] for n in names]
        if len(names) == len(self.names):
            # Everything: one read of the whole payload, verifying every section's checksum.
            secs = [s for t in self._h.tensors.values() for s in self._needed(t)]
            secs += [c[1] for c in self._h.codebooks.values()]
            secs += [t.section for t in self._h.tables]
        else:
            secs = [s for t in tensors for s in self._needed(t)]
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
            cb = _cast_codebook(self._codebooks[t.codebook], t.dtype)
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
            "shape": t.shape, "dtype": t.dtype,
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
                        sym = self._decode_stream(one, data, map_fn)
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
        return _inspect_rows(self._h, self.payload_start, self.file_bytes)


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


def _accounting(h: _Header, table_hist: list[np.ndarray], payload_start: int,
                context_index_entropy: float = 0.0, gap_entropy: float = 0.0) -> dict:
    """context_index_entropy: order-0 entropy (bits, all kept weights) of the context-coded
    indices, pooled as tables would pool them; gap_entropy: order-0 entropy of the gap values
    of every pruned tensor, pooled likewise (the yardstick for any position coder)."""
    bits = dict.fromkeys(
        ("indices", "positions", "codebooks", "code_tables", "raw_tensors", "header"), 0
    )
    bits["header"] = 8 * payload_start
    bits["codebooks"] = 8 * sum(c[1].length for c in h.codebooks.values())
    bits["code_tables"] = 8 * sum(t.section.length for t in h.tables)
    n_weights = n_kept = n_raw = fixed_bits = raw_baseline = 0
    idx_entropy = pos_entropy = 0.0
    idx_tables: set[int] = set()
    pos_tables: set[int] = set()
    for t in h.tensors.values():
        if t.kind == "raw":
            bits["raw_tensors"] += 8 * t.raw.length
            n_raw += t.numel
            raw_baseline += 8 * t.raw.length
            continue
        n_weights += t.numel
        n_kept += t.n_kept
        k = h.codebooks[t.codebook][0][-1]
        fixed_bits += t.n_kept * max(1, (k - 1).bit_length())
        bits["indices"] += 8 * sum(s.length for s, _ in t.indices.chunks)
        idx_tables.update(t.indices.tables())
        if t.positions is not None:
            bits["positions"] += 8 * sum(s.length for s, _ in t.positions.chunks)
            if t.positions.table is not None and t.positions.coder == "table":
                pos_tables.add(t.positions.table)
    idx_entropy = context_index_entropy
    for i in idx_tables:
        idx_entropy += entropy_bits(table_hist[i]) * float(table_hist[i].sum())
    for i in pos_tables:
        pos_entropy += entropy_bits(table_hist[i]) * float(table_hist[i].sum())
    file_bytes = payload_start + h.payload_bytes
    assert sum(bits.values()) == 8 * file_bytes
    per = 1.0 / n_kept if n_kept else 0.0
    return {
        "file_bytes": file_bytes,
        "bits": bits,
        "n_weights": n_weights,
        "n_kept": n_kept,
        "n_raw_elements": n_raw,
        "index_entropy_bits": idx_entropy * per,
        "position_entropy_bits": pos_entropy * per,
        "gap_entropy_bits": gap_entropy * per,
        "index_bits_per_weight": bits["indices"] * per,
        "position_bits_per_weight": bits["positions"] * per,
        "fixed_length_index_bits": fixed_bits,
        "ratio_fixed_length_bits": fixed_bits / bits["indices"] if bits["indices"] else None,
        "compression_ratio": (32 * n_weights + raw_baseline) / (8 * file_bytes),
    }


# ---------------------------------------------------------------------------------------------
# inspection


def _inspect_rows(h: _Header, payload_start: int, file_bytes: int) -> list[dict]:
    rows: list[dict] = [{"kind": "header", "name": "(header)", "bytes": payload_start}]
    for name, (shape, sec, *_) in h.codebooks.items():
        rows.append({"kind": "codebook", "name": name, "shape": shape, "bytes": sec.length})
    for i, t in enumerate(h.tables):
        rows.append(
            {"kind": "code_table", "name": f"table {i} ({t.kind}, {t.alphabet} symbols)",
             "bytes": t.section.length}
        )  # fmt: skip
    for t in h.tensors.values():
        r: dict[str, Any] = {
            "kind": t.kind, "name": t.name, "shape": t.shape, "dtype": t.dtype,
            "numel": t.numel, "decoded_bytes": HwqReader._out_bytes(t),
        }  # fmt: skip
        if t.kind == "raw":
            r.update(bytes=t.raw.length, kept_fraction=1.0)
        else:
            ib = sum(s.length for s, _ in t.indices.chunks)
            pb = sum(s.length for s, _ in t.positions.chunks) if t.positions else 0
            r.update(
                scope=t.scope, codebook=t.codebook, n_kept=t.n_kept,
                kept_fraction=t.n_kept / t.numel if t.numel else 1.0,
                index_bytes=ib, position_bytes=pb, bytes=ib + pb,
                index_bits_per_kept=8 * ib / t.n_kept if t.n_kept else 0.0,
                position_bits_per_kept=8 * pb / t.n_kept if t.n_kept else 0.0,
            )  # fmt: skip
        r["bits_per_weight"] = 8 * r["bytes"] / t.numel if t.numel else 0.0
        rows.append(r)
    for r in rows:
        r["share"] = r["bytes"] / file_bytes if file_bytes else 0.0
    return rows


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


def format_inspect(rows: list[dict]) -> str:
    """A human-readable table of :func:`inspect_hwq` rows, with totals."""
    head = f"{'name':<36} {'kind':<10} {'shape':<18} {'kept':>7} {'b/weight':>9} {'bytes':>12} {'share':>7}"
    lines = [head, "-" * len(head)]
    total = sum(r["bytes"] for r in rows)
    n_weights = sum(r.get("numel", 0) for r in rows if r["kind"] == "quantized")
    n_kept = sum(r.get("n_kept", 0) for r in rows if r["kind"] == "quantized")
    for r in rows:
        shape = "x".join(map(str, r["shape"])) if "shape" in r else ""
        kept = f"{r['kept_fraction']:.2%}" if "kept_fraction" in r else ""
        bpw = f"{r['bits_per_weight']:.3f}" if "bits_per_weight" in r else ""
        name = r["name"] if len(r["name"]) <= 36 else "..." + r["name"][-33:]
        lines.append(
            f"{name:<36} {r['kind']:<10} {shape:<18} {kept:>7} {bpw:>9} {r['bytes']:>12,} "
            f"{r['share']:>7.2%}"
        )
    lines.append("-" * len(head))
    kept = f"{n_kept / n_weights:.2%}" if n_weights else ""
    bpw = f"{8 * total / n_weights:.3f}" if n_weights else ""
    lines.append(
        f"{'total (quantized weights)':<36} {'':<10} {'':<18} {kept:>7} {bpw:>9} {total:>12,} {1:>7.2%}"
    )
    # The whole file over every parameter it holds (raw tensors too): what a user comparing
    # file sizes of whole models reads.
    n_all = sum(r.get("numel", 0) for r in rows if r["kind"] in ("quantized", "raw"))
    if n_all:
        lines.append(f"{'total (all ' + format(n_all, ',') + ' parameters)':<36} {'':<10} "
                     f"{'':<18} {'':>7} {8 * total / n_all:>9.3f} {total:>12,} {1:>7.2%}")
    return "\n".join(lines)
