"""Bit packing (vectorized numpy) and prefix-code decoding (numba) for MSB-first bitstreams.

Bit order: a chunk is a big-endian bitstring. Each codeword is written most significant bit
first, codewords follow each other with no gap, and the last byte is padded with zero bits.
MSB-first order keeps canonical codewords numerically ordered, which is what lets the slow
path of the decoder find a long codeword with one comparison per code length.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["DecodeError", "decode_prefix", "pack_codewords"]

MAX_CODE_LENGTH = 24
"""Longest codeword the format allows. 24 bits keeps every codeword inside one 64-bit refill
window with room to spare, and 2**24 symbols is far beyond any codebook."""


class DecodeError(ValueError):
    """A bitstream or code table is invalid (corrupt or hostile input)."""


_BLOCK = 1 << 16
"""Symbols per vectorized block in :func:`pack_codewords`: the block's temporaries (a few
int64 arrays) stay in L2 instead of being page-faulted in afresh for a multi-MB chunk."""


def pack_codewords(
    symbols: np.ndarray, codewords: np.ndarray, lengths: np.ndarray
) -> tuple[np.ndarray, int]:
    """Concatenate the codewords of ``symbols`` into an MSB-first byte string.

    Args:
        symbols: [n] unsigned ints, each < len(codewords).
        codewords: [alphabet] uint64, the canonical codeword of each symbol (right-aligned,
            < 2**24).
        lengths: [alphabet] uint8, codeword lengths in bits (1..24; 0 = symbol has no code).

    Returns:
        (data, n_bits): data is uint8 [ceil(n_bits / 8)], the last byte zero-padded.

    Vectorized numpy, no per-symbol Python loop (a loop per block of 65,536 symbols). Each
    codeword is shifted so that its last bit lands at its place in the 64-bit word holding
    that bit; the words are OR-reduced over the (contiguous) runs of codewords ending in
    them; the high bits of the few codewords that straddle a word boundary are OR-ed into
    the previous word. Codewords are at most 24 bits, so a boundary is straddled at most once.
    """
    sym = np.asarray(symbols)
    n = sym.shape[0]
    if n == 0:
        return np.zeros(0, np.uint8), 0
    ln_tab = np.asarray(lengths).astype(np.int64)
    # One gather per symbol instead of two: codeword and length packed in one int64.
    table = (np.asarray(codewords).astype(np.int64) << 5) | ln_tab
    hist = np.bincount(sym, minlength=ln_tab.shape[0])
    if hist.shape[0] > ln_tab.shape[0]:
        raise ValueError(f"symbols must be < {ln_tab.shape[0]}")
    if np.any(hist[ln_tab == 0]):
        raise ValueError("a symbol to encode has no codeword (its count was zero)")
    n_bits = int(np.dot(hist, ln_tab))
    out = np.zeros((n_bits + 63) >> 6, np.int64)
    base = 0
    for b0 in range(0, n, _BLOCK):
        # intp indices: numpy converts narrower index arrays on every gather otherwise.
        e = table[sym[b0 : b0 + _BLOCK].astype(np.intp)]
        ln = e & 31
        e >>= 5
        end = np.cumsum(ln)
        end += base
        base = int(end[-1])
        sh = -end
        sh &= 63  # free bits after the codeword in its last word
        low = e << sh  # int64 wraps: the bits that belong to the previous word fall off
        np.subtract(63, sh, out=sh)
        # e >> (64 - sh) without a shift by 64, which numpy handles on a slow path.
        high = (e >> 1) >> sh
        end -= 1
        end >>= 6  # index of the word holding the codeword's last bit
        runs = np.flatnonzero(end[1:] != end[:-1])
        runs += 1
        runs = np.concatenate(([0], runs))
        out[end[runs]] |= np.bitwise_or.reduceat(low, runs)
        spill = np.flatnonzero(high != 0)
        if spill.size:
            out[end[spill] - 1] |= high[spill]
    data = out.view(np.uint64).astype(">u8").view(np.uint8)[: (n_bits + 7) >> 3]
    return data, n_bits


@njit(cache=True, nogil=True)
def _decode_kernel(
    data, n, lut, lut_bits, first_code, count, first_index, sorted_syms, max_len, out
):  # pragma: no cover - compiled
    """Decode ``n`` symbols into ``out``; return bits consumed, or -(i+1) for a bad codeword.

    Every loop is bounded: the main loop by ``n`` (checked by the caller against the data
    size), the refill loop by 8 iterations, the slow path by ``max_len``. Reads past the end
    of ``data`` see zero bytes; the caller compares the bits consumed with the data size.
    """
    size = data.shape[0]
    pos = 0
    buf = np.int64(0)
    nbits = 0
    lmask = (np.int64(1) << lut_bits) - 1
    for i in range(n):
        if nbits < max_len:
            while nbits <= 56:
                b = np.int64(0)
                if pos < size:
                    b = np.int64(data[pos])
                buf = (buf << 8) | b
                pos += 1
                nbits += 8
        e = lut[(buf >> (nbits - lut_bits)) & lmask]
        if e >= 0:
            out[i] = e >> 5
            nbits -= e & 31
        else:
            found = False
            for ln in range(lut_bits + 1, max_len + 1):
                code = (buf >> (nbits - ln)) & ((np.int64(1) << ln) - 1)
                d = code - first_code[ln]
                if d >= 0 and d < count[ln]:
                    out[i] = sorted_syms[first_index[ln] + d]
                    nbits -= ln
                    found = True
                    break
            if not found:
                return -(i + 1)
    return pos * 8 - nbits


def decode_prefix(
    data: np.ndarray,
    n: int,
    lut: np.ndarray,
    lut_bits: int,
    first_code: np.ndarray,
    count: np.ndarray,
    first_index: np.ndarray,
    sorted_syms: np.ndarray,
    max_len: int,
    out: np.ndarray,
) -> None:
    """Decode ``n`` symbols of a canonical prefix code from ``data`` into ``out`` (in place).

    Args:
        data: uint8 [m], one chunk (MSB-first, zero-padded to a byte).
        n: number of symbols; must satisfy n <= 8 * m (every codeword has >= 1 bit).
        lut: int32 [2**lut_bits], entry = symbol << 5 | length for codewords of length
            <= lut_bits indexed by the next lut_bits bits, or -1 (longer codeword / invalid).
        first_code, count, first_index: int64 [max_len + 1], canonical code per length:
            codewords of length l are first_code[l] .. first_code[l] + count[l] - 1 and map to
            sorted_syms[first_index[l] + (code - first_code[l])].
        sorted_syms: int32 [n_coded] symbols sorted by (length, symbol).
        out: [n] unsigned int array receiving the symbols.

    Raises:
        DecodeError: invalid codeword, or the chunk does not end exactly at its last byte.
    """
    m = int(data.shape[0])
    if n < 0 or n > 8 * m:
        raise DecodeError(f"{n} symbols cannot fit in {m} bytes")
    if n == 0:
        if m:
            raise DecodeError(f"an empty chunk has {m} bytes")
        return
    if max_len == 0:
        raise DecodeError("symbols to decode but the code table has no codewords")
    r = int(
        _decode_kernel(
            data, n, lut, lut_bits, first_code, count, first_index, sorted_syms, max_len, out
        )
    )
    if r < 0:
        raise DecodeError(f"invalid codeword at symbol {-r - 1}")
    if r > 8 * m:
        raise DecodeError(f"the chunk ends inside a codeword ({r} bits needed, {8 * m} given)")
    if (r + 7) >> 3 != m:
        raise DecodeError(f"the chunk has {m} bytes but its symbols use {(r + 7) >> 3}")
    pad = 8 * m - r
    if pad and int(data[m - 1]) & ((1 << pad) - 1):
        raise DecodeError("the padding bits after the last codeword are not zero")
