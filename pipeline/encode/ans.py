"""Static rANS: an entropy coder within a few hundredths of a percent of the order-0 entropy.

A static model is an :class:`~.ans_table.AnsTable` (in :mod:`.ans_table`, with its
normalization and serialization): symbol frequencies normalized to sum to
``M = 1 << prob_bits``. :func:`ans_encode` turns a symbol array into a header-free byte
string, :func:`ans_decode` turns it back given the symbol count and the table (a container
stores both separately).

Coder (Duda's range variant of ANS, in the byte-renormalizing form of Giesen's rans_byte):
the state x is an integer below 2**31; coding symbol s (frequency f, cumulative frequency c)
maps x to ``(x // f) * M + c + x % f`` and decoding inverts it with one table lookup on the
low ``prob_bits`` bits. Before coding a symbol the encoder writes the low bytes of x until the
result will stay below 2**31; the decoder reads bytes back whenever its state drops below
``L = 2**23``. The encoder runs over the symbols in reverse and writes bytes back to front,
so that the decoder reads forward.

Stream layout (deterministic: one valid stream per symbol array and table):

- ``n_symbols == 0``, or a table whose only used symbol has frequency M: no bytes.
- ``n_symbols < MULTI_LANE_MIN`` (one lane): the encoder starts in state ``2 * M`` (small,
  so a short stream wastes few bits). The stream starts with the final state, big-endian
  and without leading zero bytes, followed by the renormalization bytes. The decoder reads a
  byte while its state is below L and bytes remain; at the end its state must be ``2 * M``.
- ``n_symbols >= MULTI_LANE_MIN`` (four lanes): symbol i is coded by lane ``i % 4``, each
  lane starting in state L; the stream starts with the four final states (lane 0 first,
  3 or 4 bytes each), then the interleaved renormalization bytes. Four independent states
  let the decoder overlap four dependency chains (about twice the speed of one lane). Every
  lane must end in state L.

Either way the decoder must end exactly at the last byte; any inconsistency is a
:class:`~pipeline.encode.bitio.DecodeError`. Flushed states have no leading zero byte, so a
stream the decoder accepts is exactly what :func:`ans_encode` writes for the decoded symbols.

Limits: ``prob_bits`` 0..20 (decoder state at least 8 after a step keeps renormalization at
<= 3 bytes a symbol), alphabets of 1..2**20 symbols, at most 2**prob_bits used symbols; a
serialized table's ``prob_bits`` at most :func:`max_prob_bits` of its alphabet (what
:meth:`AnsTable.from_counts` can choose), so a decoder's 2**prob_bits slots are bounded by
the alphabet.
:meth:`AnsTable.max_symbols` bounds the symbols a stream of a given size can hold.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .ans_search import SEARCH_MAX_FRACTION, decode_one_lane_search
from .ans_table import AnsTable
from .bitio import DecodeError
from .huffman import _as_readonly_u8, symbol_dtype

__all__ = [
    "MULTI_LANE_MIN",
    "ans_decode",
    "ans_encode",
]

MULTI_LANE_MIN = 1 << 17
"""Streams of at least this many symbols use four interleaved lanes (~14 bytes beyond the
model's cost, 0.1% of a 1-bit stream of this length); shorter ones one lane (about
prob_bits + 5 bits)."""
LANES = 4
_L = 1 << 23  # lower end of the normalized state interval [L, 256 L)


def _one_lane_start(m: int) -> int:
    """Initial encoder state of a one-lane stream (the decoder's required final state): 2M,
    the smallest from which every decoding step shrinks the state (see
    AnsTable.max_symbols); its prob_bits + 1 bits are the stream's fixed cost. (A larger
    start would not detect corruption much better: a decoder that has gone astray often
    falls back into step, see ans_decode.)"""
    return 2 * m


# ---------------------------------------------------------------------------------------------
# coding kernels


@njit(cache=True, nogil=True)
def _encode_kernel(sym, stop, freq, cum, prob_bits, st, buf, pos):  # pragma: no cover
    """Code sym[:stop] in reverse into buf[:pos], back to front, lane i % len(st) for
    symbol i (len(st) is 1 or 4; st holds the lane states, updated in place).

    Returns (pos, stop, err): the bytes written are buf[pos:]. It stops early, with the
    symbols before ``stop`` still to code, when fewer than 4 bytes of room are left.
    err = 0, or i + 1 for a symbol out of range at index i, or -(i + 1) for a symbol of
    frequency 0.
    """
    k = freq.shape[0]
    lm = st.shape[0] - 1
    base = (np.int64(_L) >> prob_bits) << 8
    for i in range(stop - 1, -1, -1):
        if pos < 4:  # room for the <= 3 renormalization bytes of a symbol
            return pos, i + 1, 0
        s = np.int64(sym[i])
        if s < 0 or s >= k:
            return pos, i + 1, i + 1
        f = freq[s]
        if f == 0:
            return pos, i + 1, -(i + 1)
        x = st[i & lm]
        xmax = base * f
        while x >= xmax:
            pos -= 1
            buf[pos] = x & 255
            x >>= 8
        st[i & lm] = ((x // f) << prob_bits) + (x % f) + cum[s]
    return pos, 0, 0


@njit(cache=True, nogil=True)
def _decode_one_lane(data, n, lut, syms, prob_bits, mask, x_end, out):  # pragma: no cover
    """One-lane stream: 0 if consistent, else 1 (final state or end position wrong) or
    2 (the flushed state has a leading zero byte)."""
    size = data.shape[0]
    fmask = np.int64(mask)
    pos = 0
    x = np.int64(0)
    if size > 0 and data[0] == 0:
        return 2
    while x < _L and pos < size:
        x = (x << 8) | data[pos]
        pos += 1
    for i in range(n):
        x, out[i] = _step(x, lut, syms, prob_bits, fmask)
        while x < _L and pos < size:
            x = (x << 8) | data[pos]
            pos += 1
    if x != x_end or pos != size:
        return 1
    return 0


@njit(cache=True, nogil=True, inline="always")
def _step(x, lut, syms, prob_bits, fmask):  # pragma: no cover - compiled
    """One decoding step: (next state before renormalization, symbol)."""
    slot = x & fmask
    e = np.int64(lut[slot])
    return (((e >> prob_bits) & fmask) + 1) * (x >> prob_bits) + (e & fmask), syms[slot]


@njit(cache=True, nogil=True)
def _decode_four_lanes(data, n, lut, syms, prob_bits, mask, out):  # pragma: no cover
    """Four-lane stream: 0 if consistent; 1 final states or end position wrong; 2 a flushed
    state with a leading zero byte; 3 reads past the end."""
    size = data.shape[0]
    fmask = np.int64(mask)
    st = np.zeros(4, np.int64)
    pos = 0
    for j in range(4):
        if pos >= size:
            return 3
        if data[pos] == 0:
            return 2
        x = np.int64(0)
        while x < _L:
            if pos >= size:
                return 3
            x = (x << 8) | data[pos]
            pos += 1
        st[j] = x
    x0 = st[0]
    x1 = st[1]
    x2 = st[2]
    x3 = st[3]
    i = 0
    # Each step leaves a state >= L >> prob_bits >= 8, so at most 3 reads a lane: 12 a round.
    while i + 4 <= n and pos + 12 <= size:
        x0, s0 = _step(x0, lut, syms, prob_bits, fmask)
        x1, s1 = _step(x1, lut, syms, prob_bits, fmask)
        x2, s2 = _step(x2, lut, syms, prob_bits, fmask)
        x3, s3 = _step(x3, lut, syms, prob_bits, fmask)
        out[i] = s0
        out[i + 1] = s1
        out[i + 2] = s2
        out[i + 3] = s3
        while x0 < _L:
            x0 = (x0 << 8) | data[pos]
            pos += 1
        while x1 < _L:
            x1 = (x1 << 8) | data[pos]
            pos += 1
        while x2 < _L:
            x2 = (x2 << 8) | data[pos]
            pos += 1
        while x3 < _L:
            x3 = (x3 << 8) | data[pos]
            pos += 1
        i += 4
    st[0] = x0
    st[1] = x1
    st[2] = x2
    st[3] = x3
    while i < n:  # the last few symbols, reads checked
        x, s = _step(st[i & 3], lut, syms, prob_bits, fmask)
        out[i] = s
        while x < _L:
            if pos >= size:
                return 3
            x = (x << 8) | data[pos]
            pos += 1
        st[i & 3] = x
        i += 1
    for j in range(4):
        if st[j] != _L:
            return 1
    return 0 if pos == size else 1


_DECODE_ERRORS = {
    1: "the stream does not end in the initial state at its last byte",
    2: "a flushed state has a leading zero byte",
    3: "the stream ends early",
}


def ans_encode(symbols: np.ndarray, table: AnsTable) -> bytes:
    """Encode symbols [n] (ints < table.alphabet, each of nonzero frequency) as a header-free
    rANS stream; ValueError for a symbol out of range or of frequency 0."""
    sym = np.asarray(symbols)
    if sym.ndim != 1:
        raise ValueError(f"symbols must be 1-D, got shape {sym.shape}")
    if sym.dtype.kind not in "iub":
        raise ValueError(f"symbols must be integers, got dtype {sym.dtype}")
    if sym.dtype.kind == "b" or not sym.dtype.isnative:  # what the kernel compiles for
        sym = sym.astype(np.uint8 if sym.dtype.kind == "b" else sym.dtype.newbyteorder("="))
    n = int(sym.shape[0])
    if n == 0:
        return b""
    if table.single_symbol is not None:
        bad = np.flatnonzero(sym != table.single_symbol)
        if bad.size:
            s = int(sym[bad[0]])
            if not 0 <= s < table.alphabet:
                raise ValueError(f"symbol {s} at {bad[0]} not in [0, {table.alphabet})")
            raise ValueError(f"symbol {s} at {bad[0]} has frequency 0 in the table")
        return b""
    freq, cum = table._encoder
    m = 1 << table.prob_bits
    lanes, x_init = (LANES, _L) if n >= MULTI_LANE_MIN else (1, _one_lane_start(m))
    st = np.full(lanes, x_init, np.int64)
    sym = np.ascontiguousarray(sym)
    # Room for about the entropy plus a margin; grown (doubled) when the kernel runs out.
    buf = np.empty(n // 2 + n // 16 + 4 * lanes + 64, np.uint8)
    pos, stop = buf.shape[0], n
    while True:
        pos, stop, err = _encode_kernel(sym, stop, freq, cum, table.prob_bits, st, buf, pos)
        if err:
            i = abs(int(err)) - 1
            s = int(sym[i])
            if err > 0:
                raise ValueError(f"symbol {s} at {i} not in [0, {table.alphabet})")
            raise ValueError(f"symbol {s} at {i} has frequency 0 in the table")
        if stop == 0 and pos >= 4 * lanes:  # done, with room for the flushed states
            break
        grown = np.empty(2 * buf.shape[0], np.uint8)
        used = buf.shape[0] - pos
        grown[grown.shape[0] - used :] = buf[pos:]
        buf, pos = grown, grown.shape[0] - used
    # The final states, lane 0 first, each big-endian without leading zero bytes.
    head = b"".join(int(x).to_bytes((int(x).bit_length() + 7) // 8, "big") for x in st)
    buf[pos - len(head) : pos] = np.frombuffer(head, np.uint8)
    return buf[pos - len(head) :].tobytes()


def ans_decode(
    data: bytes | bytearray | memoryview | np.ndarray, n_symbols: int, table: AnsTable
) -> np.ndarray:
    """Decode n_symbols symbols from a stream of :func:`ans_encode`.

    Returns:
        [n_symbols] of dtype symbol_dtype(table.alphabet).

    Raises:
        DecodeError: the stream is inconsistent with n_symbols and the table (wrong final
            state, not ending at its last byte, reading past its end, more symbols than
            :meth:`AnsTable.max_symbols` allows for its size — checked before allocating).
            Every loop is bounded by n_symbols or the stream size, and every read checked.

    A stream the decoder accepts is exactly what :func:`ans_encode` writes for the symbols
    it returns. Corruption is refused in most cases, not all: an rANS stream has almost no
    redundancy (a decoder thrown off by a bad byte often falls back into step, and only the
    final state and length are checked), so a corrupted stream can be a valid stream of other
    symbols; a checksum (the container's CRC32) is what detects corruption. The output is
    allocated for n_symbols once it passes max_symbols: a one-symbol table's streams are empty
    whatever n_symbols, and a very skewed table's bound is large, so the caller bounds
    n_symbols too (the container: by the tensor's size). A one-lane stream of fewer than
    M / 16 symbols, under a table whose lookup table is not built yet, is decoded by search
    (:mod:`pipeline.encode.ans_search`) rather than by building M slots for a few symbols.
    """
    arr = _as_readonly_u8(data)
    if isinstance(n_symbols, bool) or not isinstance(n_symbols, (int, np.integer)):
        raise DecodeError(f"n_symbols must be an int, got {n_symbols!r}")
    n = int(n_symbols)
    size = int(arr.shape[0])
    if n < 0:
        raise DecodeError(f"negative symbol count {n}")
    dtype = symbol_dtype(table.alphabet)
    if n == 0 or table.single_symbol is not None:
        if size:
            raise DecodeError(f"a stream of {n} symbols of this table has no bytes, got {size}")
        return np.full(n, table.single_symbol or 0, dtype)
    limit = table.max_symbols(size)
    if n > limit:
        raise DecodeError(f"{n} symbols cannot fit in {size} bytes with this table")
    out = np.empty(n, dtype)
    pb = table.prob_bits
    if n < MULTI_LANE_MIN and n * SEARCH_MAX_FRACTION < 1 << pb and "_decoder" not in vars(table):
        # Short, and no lookup table yet: search rather than build 2**prob_bits slots.
        freq, cum = table._encoder
        r = decode_one_lane_search(arr, n, cum, freq, pb, _one_lane_start(1 << pb), _L, out)
        if r:
            raise DecodeError(f"rANS stream: {_DECODE_ERRORS[int(r)]}")
        return out
    lut, syms, mask = table._decoder
    if n >= MULTI_LANE_MIN:
        r = _decode_four_lanes(arr, n, lut, syms, pb, mask, out)
    else:
        r = _decode_one_lane(arr, n, lut, syms, pb, mask, _one_lane_start(1 << pb), out)
    if r:
        raise DecodeError(f"rANS stream: {_DECODE_ERRORS[int(r)]}")
    return out
