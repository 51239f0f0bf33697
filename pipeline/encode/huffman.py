"""Canonical, length-limited Huffman codes and chunked encode/decode of symbol streams.

The pieces a distributed encoder needs are separate: build one :class:`CodeTable` from the
pooled symbol counts (cheap, on the driver), then :func:`encode_chunk` / :func:`decode_chunk`
any slice of the stream independently (byte-aligned chunks, e.g. one Ray task each).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from numba import njit

from .bitio import MAX_CODE_LENGTH, DecodeError, decode_prefix, pack_codewords

__all__ = [
    "MAX_CODE_LENGTH",
    "CodeTable",
    "EncodedChunk",
    "canonical_codewords",
    "decode_chunk",
    "decode_stream",
    "encode_chunk",
    "encode_stream",
    "entropy_bits",
    "fixed_lengths",
    "huffman_lengths",
    "kraft_ok",
    "pack_lengths",
    "symbol_dtype",
    "unpack_lengths",
]

LUT_BITS = 11
"""Decoder lookup-table width: 2**11 int32 entries (8 KiB) stay in L1 and cover every
codeword of a ~3-bit-entropy alphabet; longer codewords take the per-length slow path."""


@njit(cache=True)
def _package_merge(w, max_len):  # pragma: no cover - compiled
    """Optimal code lengths with every length <= max_len (Larmore & Hirschberg 1990).

    w: int64 [n] weights sorted ascending, n >= 2, 2**max_len >= n. Returns int64 [n].
    Builds max_len lists, each the merge of the leaves with the pairwise packages of the
    previous list, keeping only an is-leaf flag per item; then walks back from the top list
    selecting its first 2n - 2 items. Each selected leaf adds one bit to that symbol's length.
    """
    n = w.shape[0]
    cap = 2 * n
    flags = np.zeros((max_len, cap), np.uint8)
    sizes = np.zeros(max_len, np.int64)
    prev = np.empty(cap, np.int64)
    cur = np.empty(cap, np.int64)
    prev[:n] = w
    flags[0, :n] = 1
    sizes[0] = n
    size_prev = n
    for j in range(1, max_len):
        npk = size_prev // 2
        a = 0
        b = 0
        k = 0
        while a < n or b < npk:
            if b < npk:
                pk = prev[2 * b] + prev[2 * b + 1]
            else:
                pk = 0
            # Ties go to the leaf: keeps codes short for equal weights.
            if b >= npk or (a < n and w[a] <= pk):
                cur[k] = w[a]
                flags[j, k] = 1
                a += 1
            else:
                cur[k] = pk
                b += 1
            k += 1
        sizes[j] = k
        size_prev = k
        prev, cur = cur, prev
    lengths = np.zeros(n, np.int64)
    m = 2 * n - 2
    for j in range(max_len - 1, -1, -1):
        leaves = 0
        for t in range(m):
            leaves += flags[j, t]
        for t in range(leaves):
            lengths[t] += 1
        m = 2 * (m - leaves)
    return lengths


def huffman_lengths(counts: np.ndarray, max_len: int = MAX_CODE_LENGTH) -> np.ndarray:
    """Optimal prefix-code lengths for symbol counts, every length <= ``max_len``.

    Args:
        counts: [alphabet] non-negative ints (symbol frequencies).
        max_len: length limit, 1..24; must satisfy 2**max_len >= number of used symbols.

    Returns:
        uint8 [alphabet]: 0 for unused symbols (count 0); a single used symbol gets 1.
        The lengths are optimal among codes with lengths <= max_len (package-merge), so they
        equal Huffman's when Huffman's tree is no deeper than max_len; Kraft sum == 1 when
        two or more symbols are used.
    """
    counts = np.asarray(counts)
    if counts.ndim != 1:
        raise ValueError(f"counts must be 1-D, got shape {counts.shape}")
    if counts.size and counts.min() < 0:
        raise ValueError("counts must be non-negative")
    if not 1 <= max_len <= MAX_CODE_LENGTH:
        raise ValueError(f"max_len must be in 1..{MAX_CODE_LENGTH}, got {max_len}")
    out = np.zeros(counts.shape[0], np.uint8)
    used = np.flatnonzero(counts)
    if used.size == 0:
        return out
    if used.size == 1:
        out[used] = 1
        return out
    if used.size > (1 << max_len):
        raise ValueError(f"{used.size} symbols cannot have codes of <= {max_len} bits")
    order = used[np.argsort(counts[used], kind="stable")]
    lengths = _package_merge(counts[order].astype(np.int64), max_len)
    out[order] = lengths
    return out


def fixed_lengths(alphabet: int) -> np.ndarray:
    """Fixed-length code: uint8 [alphabet], every symbol max(1, ceil(log2(alphabet))) bits."""
    width = max(1, (int(alphabet) - 1).bit_length())
    if width > MAX_CODE_LENGTH:
        raise ValueError(f"alphabet {alphabet} needs more than {MAX_CODE_LENGTH} bits")
    return np.full(int(alphabet), width, np.uint8)


def kraft_ok(lengths: np.ndarray) -> bool:
    """True if uint lengths [alphabet] (0 = unused) are all <= 24 and sum 2**-l <= 1."""
    ln = np.asarray(lengths).astype(np.int64)
    if ln.size == 0:
        return True
    if ln.min() < 0 or ln.max() > MAX_CODE_LENGTH:
        return False
    used = ln[ln > 0]
    # Exact integer Kraft sum in units of 2**-24.
    return int(np.sum(np.left_shift(1, MAX_CODE_LENGTH - used))) <= (1 << MAX_CODE_LENGTH)


def canonical_codewords(lengths: np.ndarray) -> np.ndarray:
    """Canonical codewords (DEFLATE order) for valid lengths.

    Args:
        lengths: uint8 [alphabet], 0 = no codeword.

    Returns:
        uint64 [alphabet]: codewords right-aligned; symbols sorted by (length, symbol) get
        consecutive codewords, and each length's first codeword is the previous length's
        next codeword shifted left by the difference in lengths.
    """
    ln = np.asarray(lengths).astype(np.int64)
    codes = np.zeros(ln.shape[0], np.uint64)
    order = np.lexsort((np.arange(ln.shape[0]), ln))
    order = order[ln[order] > 0]
    if order.size == 0:
        return codes
    sl = ln[order]
    # code_i = sum_{j<i} 2**(L_i - L_j): computed as a running value in units of 2**-24.
    unit = np.left_shift(np.int64(1), MAX_CODE_LENGTH - sl)
    acc = np.concatenate(([0], np.cumsum(unit)[:-1]))
    codes[order] = (acc >> (MAX_CODE_LENGTH - sl)).astype(np.uint64)
    return codes


def symbol_dtype(alphabet: int) -> np.dtype:
    """Smallest unsigned dtype holding symbols 0..alphabet-1 (uint8, uint16 or uint32)."""
    if alphabet <= 1 << 8:
        return np.dtype(np.uint8)
    if alphabet <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


def entropy_bits(counts: np.ndarray) -> float:
    """Empirical entropy in bits per symbol of a histogram [alphabet] (0.0 if empty)."""
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum()
    if total <= 0:
        return 0.0
    p = c[c > 0] / total
    return float(-(p * np.log2(p)).sum())


def pack_lengths(lengths: np.ndarray) -> tuple[bytes, int]:
    """Serialize code lengths compactly: ``width`` bits each, MSB-first, zero-padded.

    Args:
        lengths: uint8 [alphabet], values 0..24.

    Returns:
        (data, width): width = bits of the largest length (1..5); data has
        ceil(alphabet * width / 8) bytes.
    """
    ln = np.asarray(lengths).astype(np.uint64)
    width = max(1, int(ln.max()).bit_length()) if ln.size else 1
    # Each length is its own width-bit "codeword".
    data, _ = pack_codewords(np.arange(ln.size), ln, np.full(ln.size, width, np.uint8))
    return data.tobytes(), width


def unpack_lengths(data: bytes, alphabet: int, width: int) -> np.ndarray:
    """Inverse of :func:`pack_lengths`; raises DecodeError on a size mismatch. uint8 [alphabet]."""
    if not 1 <= width <= 5:
        raise DecodeError(f"code-length width {width} not in 1..5")
    need = (alphabet * width + 7) >> 3
    if len(data) != need:
        raise DecodeError(f"code table has {len(data)} bytes, {need} expected")
    bits = np.unpackbits(np.frombuffer(data, np.uint8))
    if bits[alphabet * width :].any():
        raise DecodeError("code table padding bits are not zero")
    bits = bits[: alphabet * width].reshape(alphabet, width)
    # uint8 arithmetic, one column at a time: no int64 [alphabet, width] temporary (8 bytes
    # per bit of the section) for a large hostile alphabet.
    out = np.zeros(alphabet, np.uint8)
    for j in range(width):
        out <<= 1
        out |= bits[:, j]
    return out


@dataclass(frozen=True, eq=False)
class CodeTable:
    """A canonical prefix code over symbols 0..alphabet-1.

    Attributes:
        lengths: uint8 [alphabet] codeword lengths (0 = symbol never occurs).
        fixed: True for a fixed-length code (every length equal; stored without a table).

    Picklable and cheap to ship to workers; derived encode/decode tables are built lazily.
    """

    lengths: np.ndarray
    fixed: bool = False

    def __post_init__(self) -> None:
        ln = np.ascontiguousarray(self.lengths, dtype=np.uint8)
        if ln.ndim != 1:
            raise DecodeError(f"code lengths must be 1-D, got shape {ln.shape}")
        if not kraft_ok(ln):
            raise DecodeError("code lengths are not a prefix code (length > 24 or Kraft sum > 1)")
        object.__setattr__(self, "lengths", ln)

    @classmethod
    def from_counts(cls, counts: np.ndarray, *, fixed: bool = False) -> CodeTable:
        """Huffman (or fixed-length) code for counts [alphabet]."""
        counts = np.asarray(counts)
        if fixed:
            return cls(fixed_lengths(counts.shape[0]), fixed=True)
        return cls(huffman_lengths(counts))

    @property
    def alphabet(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def max_length(self) -> int:
        return int(self.lengths.max()) if self.lengths.size else 0

    @cached_property
    def codewords(self) -> np.ndarray:
        """uint64 [alphabet] canonical codewords."""
        return canonical_codewords(self.lengths)

    def cost_bits(self, counts: np.ndarray) -> int:
        """Bits to code a stream with histogram counts [alphabet] (no chunk padding)."""
        return int(np.dot(np.asarray(counts, np.int64), self.lengths.astype(np.int64)))

    def table_bytes(self) -> int:
        """Bytes the serialized table takes in a container (0 for fixed-length codes)."""
        if self.fixed:
            return 0
        width = max(1, self.max_length.bit_length())
        return (self.alphabet * width + 7) >> 3

    @cached_property
    def _decoder(self) -> tuple:
        ln = self.lengths.astype(np.int64)
        max_len = self.max_length
        lut_bits = min(LUT_BITS, max_len)
        codes = self.codewords.astype(np.int64)
        count = np.zeros(max_len + 1, np.int64)
        np.add.at(count, ln[ln > 0], 1)
        first_code = np.zeros(max_len + 1, np.int64)
        first_index = np.zeros(max_len + 1, np.int64)
        code = 0
        idx = 0
        for length in range(1, max_len + 1):
            # DEFLATE's next_code recurrence (count[0] == 0).
            code = (code + count[length - 1]) << 1
            first_code[length] = code
            first_index[length] = idx
            idx += count[length]
        order = np.lexsort((np.arange(ln.shape[0]), ln))
        sorted_syms = order[ln[order] > 0].astype(np.int32)
        lut = np.full(1 << lut_bits, -1, np.int32)
        short = np.flatnonzero((ln > 0) & (ln <= lut_bits))
        if short.size:
            span = np.left_shift(1, lut_bits - ln[short])
            base = codes[short] << (lut_bits - ln[short])
            rep = np.repeat(np.arange(short.size), span)
            offs = np.arange(rep.size) - np.repeat(np.cumsum(span) - span, span)
            lut[base[rep] + offs] = ((short[rep] << 5) | ln[short[rep]]).astype(np.int32)
        return lut, lut_bits, first_code, count, first_index, sorted_syms, max_len


@dataclass(frozen=True)
class EncodedChunk:
    """One independently decodable piece of a stream.

    Attributes:
        data: the chunk's bytes (MSB-first codewords, last byte zero-padded).
        n_symbols: symbols it holds.
        n_bits: bits used before padding.
        crc32: zlib.crc32 of ``data``.
    """

    data: bytes
    n_symbols: int
    n_bits: int
    crc32: int


def encode_chunk(symbols: np.ndarray, table: CodeTable) -> EncodedChunk:
    """Encode symbols [n] (unsigned ints < table.alphabet) into one byte-aligned chunk."""
    sym = np.asarray(symbols)
    if sym.ndim != 1:
        raise ValueError(f"symbols must be 1-D, got shape {sym.shape}")
    if sym.size and (sym.min() < 0 or sym.max() >= table.alphabet):
        raise ValueError(f"symbols must be in [0, {table.alphabet})")
    data, n_bits = pack_codewords(sym, table.codewords, table.lengths)
    raw = data.tobytes()
    return EncodedChunk(raw, int(sym.shape[0]), n_bits, zlib.crc32(raw))


def _as_readonly_u8(data) -> np.ndarray:
    # One array type for numba (readonly uint8), whatever buffer the caller passes.
    arr = np.frombuffer(data, np.uint8)
    if arr.flags.writeable:
        arr = arr.view()
        arr.flags.writeable = False
    return arr


def decode_chunk(
    data: bytes | bytearray | memoryview | np.ndarray,
    n_symbols: int,
    table: CodeTable,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Decode one chunk into n_symbols symbols.

    Args:
        data: the chunk's bytes.
        n_symbols: symbols to decode (<= 8 * len(data), else DecodeError before allocating).
        table: the code the chunk was written with.
        out: optional [n_symbols] unsigned int array to fill (e.g. a view into a tensor's
            full code array); default a new array of :func:`symbol_dtype` (table.alphabet).

    Returns:
        [n_symbols] symbols, each < table.alphabet.

    Raises:
        DecodeError: corrupt chunk (bad codeword, wrong length, nonzero padding).
    """
    arr = _as_readonly_u8(data)
    n = int(n_symbols)
    if n < 0 or n > 8 * arr.shape[0]:
        raise DecodeError(f"{n} symbols cannot fit in {arr.shape[0]} bytes")
    if out is None:
        out = np.empty(n, symbol_dtype(table.alphabet))
    elif out.shape != (n,):
        raise ValueError(f"out has shape {out.shape}, expected ({n},)")
    decode_prefix(arr, n, *table._decoder[:-1], table._decoder[-1], out)
    return out


def encode_stream(
    symbols: np.ndarray, table: CodeTable, chunk_symbols: int = 4_000_000
) -> list[EncodedChunk]:
    """Encode symbols [n] as ceil(n / chunk_symbols) independent chunks (none if n == 0)."""
    if chunk_symbols < 1:
        raise ValueError("chunk_symbols must be >= 1")
    sym = np.asarray(symbols)
    return [
        encode_chunk(sym[i : i + chunk_symbols], table)
        for i in range(0, sym.shape[0], chunk_symbols)
    ]


def decode_stream(
    chunks: Iterable[EncodedChunk | tuple[bytes, int]] | Sequence, table: CodeTable
) -> np.ndarray:
    """Decode chunks (EncodedChunk or (data, n_symbols)) into one [sum n] symbol array."""
    parts = [(c.data, c.n_symbols) if isinstance(c, EncodedChunk) else c for c in chunks]
    for data, n in parts:
        if int(n) < 0 or int(n) > 8 * len(data):
            raise DecodeError(f"{n} symbols cannot fit in {len(data)} bytes")
    total = sum(int(n) for _, n in parts)
    out = np.empty(total, symbol_dtype(table.alphabet))
    pos = 0
    for data, n in parts:
        decode_chunk(data, n, table, out[pos : pos + int(n)])
        pos += int(n)
    return out
