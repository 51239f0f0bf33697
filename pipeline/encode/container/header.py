"""The .hwq layout's constants, the limits a reader enforces, and the header's schema and
validation (untrusted input): a parsed, checked header (`_Header`) or `HwqFormatError`.

Layout: a 24-byte prefix (magic, version, header length, header CRC), a JSON header, zero
padding to a multiple of 8, then the payload: codebooks, code tables, and per tensor its
index chunks and position chunks (or its raw bytes). Every payload byte belongs to exactly
one section with its own CRC-32 (docs/FORMAT.md).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..bitio import MAX_CODE_LENGTH
from ..codebooks import count_dtype
from ..coders import mask_geometry
from ..context import max_decisions
from ..positions import MAX_GAP_LIMIT
from ..rotation import check_width

MAGIC = b"HWQ1"
FORMAT_VERSION = 2
"""Version 2 adds rANS code tables and context-coded positions and indices. A file that uses
none of them is written as version 1, byte for byte what earlier writers produced; readers of
version 1 refuse version 2 files by their version number."""
READ_VERSIONS = (1, 2, 3)
"""Version 3 adds input-side rotations of quantized tensors (`"rotate"`, quantize.rotate);
a file without one is written as version 1 or 2 as before."""
ROTATE_SEED_MAX = (1 << 31) - 1
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

MapFn = Callable[[Callable[[Any], Any], Sequence[Any]], Iterable[Any]]


class HwqFormatError(ValueError):
    """A .hwq file is malformed, truncated, corrupt or hostile. ``path`` names the file."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


def _np_dtype(name: str) -> np.dtype:
    """Storage dtype (little-endian); bfloat16 is stored and returned as uint16 bit patterns."""
    return np.dtype("<u2") if name == "bfloat16" else np.dtype(name).newbyteorder("<")


def _payload_start(header_len: int) -> int:
    return -(-(PREFIX_BYTES + header_len) // _ALIGN) * _ALIGN


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
    rotate: int | None = None  # seed of the input-side rotation (version 3), None: none


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


def _rotation(r: Any, what: str, version: int, shape: tuple[int, ...], masked: bool
              ) -> int | None:
    """A quantized tensor's "rotate" ({"kind": "hadamard", "seed"}) checked: its seed."""
    if r is None:
        return None
    r = _dict(r, f"{what}.rotate")
    if version < 3 or r.get("kind") != "hadamard" or set(r) != {"kind", "seed"}:
        raise _Bad(f"{what}.rotate: not a hadamard rotation of a version-3 file")
    seed = _int(r.get("seed"), f"{what}.rotate.seed", 0, ROTATE_SEED_MAX)
    if masked or not shape or not shape[0]:
        raise _Bad(f"{what}.rotate: only a dense tensor with rows is rotated")
    try:
        check_width(math.prod(shape) // shape[0], what)
    except ValueError as e:
        raise _Bad(str(e)) from None
    return seed


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
        # A level-ordered stream leaves out its one-level rows (their count is known only
        # from the codebook section: the reader checks it exactly).
        if ind.n_symbols != n_kept and not (ind.order == "levels" and ind.n_symbols < n_kept):
            raise _Bad(f"{what}: {ind.n_symbols} index symbols for {n_kept} kept weights")
        if ind.coder == "context" and cbshape[-1] >= 2:
            for sec, n in ind.chunks:
                if n > max_decisions(sec.length):
                    raise _Bad(f"{sec.what}: {n} symbols cannot fit in {sec.length} bytes")
        if any(tables[i].alphabet > cbshape[-1] for i in ind.tables()):
            raise _Bad(f"{what}: code table alphabet exceeds codebook size {cbshape[-1]}")
        # Level order needs the level count of each code's row: a ragged codebook, and a
        # dense tensor or a channel-scope one whose rows keep n_kept / rows each (the
        # reader checks the decoded positions say so).
        if ind.order == "levels" and (not codebooks[cbname][3] or (
                d.get("positions") is not None and (
                    scope != "channel" or not shape or n_kept % max(shape[0], 1)))):
            raise _Bad(f"{what}: level-ordered indices need a ragged codebook and a dense "
                       "tensor, or rows that keep the same count")
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
            name, kind, shape, dtype, numel, scope, cbname, n_kept, ind, pos, None,
            _rotation(d.get("rotate"), what, version, shape, pos is not None),
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
