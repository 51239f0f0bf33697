"""The static model of :mod:`.ans` (rANS): :class:`AnsTable`, symbol frequencies normalized to
sum to ``M = 1 << prob_bits``, how they are chosen from a histogram (:func:`normalize_freqs`,
the precision that minimises coded plus table bits) and their compact serialization
(:meth:`AnsTable.pack`, :meth:`AnsTable.unpack`).

Limits: ``prob_bits`` 0..20, alphabets of 1..2**20 symbols, at most 2**prob_bits used
symbols; a serialized table's ``prob_bits`` at most :func:`max_prob_bits` of its alphabet
(what :meth:`AnsTable.from_counts` can choose), so a decoder's 2**prob_bits slots are bounded
by the alphabet. :meth:`AnsTable.max_symbols` bounds the symbols a stream of a given size can
hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from numba import njit

from .bitio import DecodeError
from .huffman import _as_readonly_u8, symbol_dtype

__all__ = [
    "MAX_ALPHABET",
    "PROB_BITS_MAX",
    "AnsTable",
    "max_prob_bits",
    "normalize_freqs",
]

PROB_BITS_MAX = 20
"""Largest frequency precision: 2**20 slots (decode tables of 10-12 MiB at most)."""
AUTO_PROB_BITS_MAX = 16
"""Largest precision :meth:`AnsTable.from_counts` picks by itself, unless the number of used
symbols needs more: beyond 16 bits the model gain is a few thousandths of a percent while the
decode table leaves the L2 cache."""
MAX_ALPHABET = 1 << 20
"""Largest alphabet (the container allows 2**16)."""
_MAX_GAMMA_ZEROS = 24  # longest Elias-gamma prefix in a serialized table (values < 2**25)


# ---------------------------------------------------------------------------------------------
# frequency normalization


@njit(cache=True, nogil=True, inline="always")
def _sift_down(key, idx, j):  # pragma: no cover - compiled
    """Restore the max-heap (key larger first, then index smaller) below position j."""
    k = key.shape[0]
    while True:
        best = 2 * j + 1
        if best >= k:
            return
        r = best + 1
        if r < k and (key[r] > key[best] or (key[r] == key[best] and idx[r] < idx[best])):
            best = r
        if key[best] > key[j] or (key[best] == key[j] and idx[best] < idx[j]):
            key[j], key[best] = key[best], key[j]
            idx[j], idx[best] = idx[best], idx[j]
            j = best
        else:
            return


@njit(cache=True, nogil=True)
def _fill_greedy(c, f, total):  # pragma: no cover - compiled
    """Raise f (int64 [K], each >= 1) in place until it sums to ``total``, one unit at a time,
    always to the symbol whose coded bits drop most: gain c_i * log(1 + 1/f_i); ties go to the
    lowest index. A binary max-heap over the K symbols."""
    k = c.shape[0]
    rem = total - f.sum()
    if rem <= 0 or k == 0:
        return
    key = np.empty(k, np.float64)
    idx = np.arange(k)
    for i in range(k):
        key[i] = c[i] * np.log1p(1.0 / f[i])
    for j in range(k // 2 - 1, -1, -1):
        _sift_down(key, idx, j)
    for _ in range(rem):
        i = idx[0]
        f[i] += 1
        key[0] = c[i] * np.log1p(1.0 / f[i])
        _sift_down(key, idx, 0)


def normalize_freqs(counts: np.ndarray, prob_bits: int) -> np.ndarray:
    """Frequencies summing to ``1 << prob_bits`` that minimise the coded bits of ``counts``.

    Args:
        counts: [alphabet] non-negative integer counts.
        prob_bits: precision, 0..PROB_BITS_MAX; ``1 << prob_bits`` must be at least the number
            of used (count > 0) symbols.

    Returns:
        uint32 [alphabet]: zero exactly where the count is zero; minimises
        sum c_i * (prob_bits - log2 f_i) over integer f_i >= 1 (i.e. the KL divergence from
        the empirical distribution). With no used symbol, symbol 0 gets everything.

    Exact: the optimum takes the M - K largest marginal gains c_i * log2((f + 1) / f), f >= 1,
    over all used symbols. ``max(1, floor(c_i (M - K) / N))`` is below the optimum for every
    symbol (KKT), so a greedy fill from there (at most 2K steps) reaches it.
    """
    c_all = np.asarray(counts)
    if c_all.ndim != 1 or c_all.size == 0:
        raise ValueError(f"counts must be 1-D and non-empty, got shape {c_all.shape}")
    c_all = _int_counts(c_all)
    pb = _check_prob_bits(prob_bits, ValueError)
    m = 1 << pb
    out = np.zeros(c_all.shape[0], np.uint32)
    used = np.flatnonzero(c_all)
    k = used.size
    if k == 0:
        out[0] = m
        return out
    if k > m:
        raise ValueError(f"{k} used symbols do not fit in {pb}-bit frequencies")
    c = c_all[used]
    if k == 1:
        out[used] = m
        return out
    n = float(c.sum())
    # A safe lower bound: the float product is within a few ulps, far inside the margin.
    f = np.floor(c.astype(np.float64) * ((m - k) / n) * (1.0 - 2.0**-40)).astype(np.int64)
    np.maximum(f, 1, out=f)
    _fill_greedy(c, f, m)
    out[used] = f
    return out


def _int_counts(c: np.ndarray) -> np.ndarray:
    if c.dtype.kind not in "iub":
        if c.dtype.kind != "f" or not np.all(np.isfinite(c)) or np.any(c != np.floor(c)):
            raise ValueError("counts must be non-negative integers")
    if c.size and c.min() < 0:
        raise ValueError("counts must be non-negative integers")
    return c.astype(np.int64)


def max_prob_bits(alphabet: int) -> int:
    """Largest ``prob_bits`` a serialized table of ``alphabet`` symbols may have: what
    :meth:`AnsTable.from_counts` can pick for it, max(16, ceil(log2 alphabet) + 2), at most
    PROB_BITS_MAX. A reader refuses more: a 2-symbol table at 20 bits would cost a 2**20-slot
    decoder (9 MiB) for three bytes of file."""
    lo = (int(alphabet) - 1).bit_length() if alphabet > 1 else 0
    return min(PROB_BITS_MAX, max(AUTO_PROB_BITS_MAX, lo + 2))


def _check_prob_bits(prob_bits, exc) -> int:
    if isinstance(prob_bits, bool) or not isinstance(prob_bits, (int, np.integer)):
        raise exc(f"prob_bits must be an int, got {prob_bits!r}")
    if not 0 <= int(prob_bits) <= PROB_BITS_MAX:
        raise exc(f"prob_bits must be in 0..{PROB_BITS_MAX}, got {prob_bits}")
    return int(prob_bits)


# ---------------------------------------------------------------------------------------------
# table serialization
#
# Byte 0: prob_bits. Then a bit string, most significant bit first, zero-padded to a byte:
# per symbol, the bit length b of its frequency as the change from the previous symbol's
# (zigzag, Elias gamma), then the frequency's b - 1 bits below its leading one. A zero
# frequency (b = 0) is followed by the length of its run of zeros (Elias gamma), so a sparse
# 65,536-symbol alphabet costs a few bits per run. Smooth histograms (neighbouring symbols of
# similar frequency) cost about log2(f) + 1 bits a symbol.


@njit(cache=True, nogil=True, inline="always")
def _bit_length(v):  # pragma: no cover - compiled
    b = 0
    while (v >> b) > 0:
        b += 1
    return b


@njit(cache=True, nogil=True, inline="always")
def _put(out, p, acc, nacc, v, nbits):  # pragma: no cover - compiled
    """Append the nbits (<= 48) low bits of v; returns (p, acc, nacc) with nacc < 8."""
    acc = (acc << nbits) | v
    nacc += nbits
    while nacc >= 8:
        out[p] = (acc >> (nacc - 8)) & 255
        p += 1
        nacc -= 8
    return p, acc & ((np.int64(1) << nacc) - 1), nacc


@njit(cache=True, nogil=True)
def _pack_kernel(freqs, prob_bits, out):  # pragma: no cover - compiled
    """Serialize freqs (int64 [k]) into out (uint8, >= 1 + 4 k + 8 bytes); return the size.

    Per symbol at most 11 bits of length change plus 20 mantissa bits; a run of r zeros at
    most 11 + 2 log2(r) + 1 bits: never more than 4 bytes a symbol."""
    k = freqs.shape[0]
    out[0] = prob_bits
    p = 1
    acc = np.int64(0)
    nacc = 0
    prev = 0
    i = 0
    while i < k:
        f = freqs[i]
        b = _bit_length(f)
        d = b - prev
        z = 2 * d if d >= 0 else -2 * d - 1  # zigzag
        vb = _bit_length(z + 1)  # Elias gamma: vb - 1 zeros, then the vb bits of the value
        p, acc, nacc = _put(out, p, acc, nacc, z + 1, 2 * vb - 1)
        if b == 0:
            r = 1
            while i + r < k and freqs[i + r] == 0:
                r += 1
            vb = _bit_length(r)
            p, acc, nacc = _put(out, p, acc, nacc, r, 2 * vb - 1)
            i += r
        else:
            p, acc, nacc = _put(out, p, acc, nacc, f & ((np.int64(1) << (b - 1)) - 1), b - 1)
            i += 1
        prev = b
    if nacc > 0:
        out[p] = (acc << (8 - nacc)) & 255
        p += 1
    return p


@njit(cache=True, nogil=True)
def _read_bits(data, pos, nbits, total):  # pragma: no cover - compiled
    """(value, new pos) of nbits bits at bit pos (MSB first, after byte 0); pos -1 past the end."""
    if pos + nbits > total:
        return np.int64(0), -1
    v = np.int64(0)
    for _ in range(nbits):
        v = (v << 1) | ((data[1 + (pos >> 3)] >> (7 - (pos & 7))) & 1)
        pos += 1
    return v, pos


@njit(cache=True, nogil=True)
def _read_gamma(data, pos, total):  # pragma: no cover - compiled
    z = 0
    while True:
        if pos >= total:
            return np.int64(0), -1
        bit = (data[1 + (pos >> 3)] >> (7 - (pos & 7))) & 1
        pos += 1
        if bit:
            break
        z += 1
        if z > _MAX_GAMMA_ZEROS:
            return np.int64(0), -2
    v, pos = _read_bits(data, pos, z, total)
    return (np.int64(1) << z) | v, pos


@njit(cache=True, nogil=True)
def _unpack_kernel(data, prob_bits, freqs):  # pragma: no cover - compiled
    """Fill freqs (int64 [k], zeros) from data; 0 if well formed, else a negative error code:
    -1 past the end, -2 bad gamma code, -3 bit length out of range, -4 zero run past the
    alphabet, -5 a zero run not maximal (a zero after a run), -6 trailing bytes or nonzero
    padding."""
    k = freqs.shape[0]
    total = 8 * (data.shape[0] - 1)
    pos = 0
    prev = 0
    after_run = False
    i = 0
    while i < k:
        z, pos = _read_gamma(data, pos, total)
        if pos < 0:
            return pos
        z -= 1
        d = (z >> 1) if (z & 1) == 0 else -((z + 1) >> 1)
        b = prev + d
        if b < 0 or b > prob_bits + 1:
            return -3
        if b == 0:
            if after_run:
                return -5
            r, pos = _read_gamma(data, pos, total)
            if pos < 0:
                return pos
            if r > k - i:
                return -4
            i += r
            prev = 0
            after_run = True
            continue
        m, pos = _read_bits(data, pos, b - 1, total)
        if pos < 0:
            return pos
        freqs[i] = (np.int64(1) << (b - 1)) | m
        prev = b
        after_run = False
        i += 1
    if (pos + 7) >> 3 != data.shape[0] - 1:
        return -6
    if pos & 7:
        pad, _ = _read_bits(data, pos, 8 - (pos & 7), total)
        if pad != 0:
            return -6
    return 0


_UNPACK_ERRORS = {
    -1: "the table ends early",
    -2: "an Elias-gamma code in the table is too long",
    -3: "a frequency bit length is out of range",
    -4: "a run of zero frequencies runs past the alphabet",
    -5: "a run of zero frequencies is split (not canonical)",
    -6: "trailing bytes or nonzero padding after the table",
}


# ---------------------------------------------------------------------------------------------
# the table


@dataclass(frozen=True, eq=False)
class AnsTable:
    """A static rANS model over symbols 0..alphabet-1.

    Attributes:
        freqs: uint32 [alphabet], summing to ``1 << prob_bits``; 0 = symbol cannot be coded.
        prob_bits: frequency precision, 0..PROB_BITS_MAX.

    Picklable (the derived coding tables are rebuilt lazily, not shipped).
    """

    freqs: np.ndarray
    prob_bits: int

    def __post_init__(self) -> None:
        pb = _check_prob_bits(self.prob_bits, DecodeError)
        f = np.asarray(self.freqs)
        if f.ndim != 1 or not 1 <= f.shape[0] <= MAX_ALPHABET:
            raise DecodeError(f"freqs must be 1-D with 1..{MAX_ALPHABET} entries, got {f.shape}")
        if f.dtype.kind not in "iu" or (f.size and (f.min() < 0 or f.max() > 1 << pb)):
            raise DecodeError(f"freqs must be integers in 0..{1 << pb}")
        if int(f.astype(np.int64).sum()) != 1 << pb:
            raise DecodeError(f"freqs sum to {int(f.astype(np.int64).sum())}, not {1 << pb}")
        f = np.array(f, dtype=np.uint32)  # a copy: read-only without touching the caller's
        f.flags.writeable = False
        object.__setattr__(self, "freqs", f)
        object.__setattr__(self, "prob_bits", pb)

    def __reduce__(self):
        return (self.__class__, (self.freqs, self.prob_bits))

    @classmethod
    def from_counts(cls, counts: np.ndarray, prob_bits: int | None = None) -> AnsTable:
        """The table for a histogram counts [alphabet].

        Args:
            counts: non-negative integer counts; every used symbol gets a frequency >= 1.
            prob_bits: precision; None picks the one of ceil(log2(used symbols)) ..
                max(16, that + 2) (at most 20) minimising coded bits + table bits (ties: the
                smaller).
        """
        c = np.asarray(counts)
        if c.ndim != 1 or not 1 <= c.shape[0] <= MAX_ALPHABET:
            raise ValueError(f"counts must be 1-D with 1..{MAX_ALPHABET} entries, got {c.shape}")
        c = _int_counts(c)
        if prob_bits is not None:
            return cls(normalize_freqs(c, prob_bits), _check_prob_bits(prob_bits, ValueError))
        k = int(np.count_nonzero(c))
        lo = (k - 1).bit_length() if k > 1 else 0
        if lo > PROB_BITS_MAX:
            raise ValueError(f"{k} used symbols need more than {PROB_BITS_MAX}-bit frequencies")
        hi = min(PROB_BITS_MAX, max(AUTO_PROB_BITS_MAX, lo + 2)) if k > 1 else lo
        best = None
        for pb in range(lo, hi + 1):
            t = cls(normalize_freqs(c, pb), pb)
            bits = t.cost_bits(c) + 8 * t.table_bytes()
            if best is None or bits < best[0]:
                best = (bits, t)
        return best[1]

    @property
    def alphabet(self) -> int:
        return int(self.freqs.shape[0])

    @cached_property
    def single_symbol(self) -> int | None:
        """The symbol whose frequency is all of M (then streams carry no bytes), else None."""
        top = int(np.argmax(self.freqs))
        return top if int(self.freqs[top]) == 1 << self.prob_bits else None

    def cost_bits(self, counts: np.ndarray) -> float:
        """Ideal coded bits of a stream with histogram counts [alphabet]:
        sum c_i * (prob_bits - log2 f_i); inf if a counted symbol has frequency 0. A stream
        adds its flushed state (about prob_bits + 5 bits for one lane, 14 bytes for four)
        and well under 0.01%."""
        c = np.asarray(counts)
        if c.shape != self.freqs.shape:
            raise ValueError(f"counts has shape {c.shape}, expected {self.freqs.shape}")
        c = _int_counts(c)
        used = c > 0
        f = self.freqs[used].astype(np.float64)
        if np.any(f == 0):
            return math.inf
        return float(np.dot(c[used].astype(np.float64), self.prob_bits - np.log2(f)))

    @cached_property
    def _packed(self) -> bytes:
        out = np.zeros(1 + 4 * self.alphabet + 8, np.uint8)
        size = _pack_kernel(self.freqs.astype(np.int64), self.prob_bits, out)
        return out[:size].tobytes()

    def pack(self) -> bytes:
        """Compact serialization (see the notes above :func:`_pack_kernel`): byte 0 is
        prob_bits; at most 1 + 4 * alphabet bytes in all. Deterministic."""
        return self._packed

    def table_bytes(self) -> int:
        """Size of :meth:`pack`."""
        return len(self._packed)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview | np.ndarray, alphabet: int) -> AnsTable:
        """Inverse of :meth:`pack`; DecodeError for anything :meth:`pack` would not write."""
        if isinstance(alphabet, bool) or not isinstance(alphabet, (int, np.integer)):
            raise DecodeError(f"alphabet must be an int, got {alphabet!r}")
        if not 1 <= int(alphabet) <= MAX_ALPHABET:
            raise DecodeError(f"alphabet {alphabet} not in 1..{MAX_ALPHABET}")
        arr = _as_readonly_u8(data)
        if arr.shape[0] == 0:
            raise DecodeError("an rANS table has at least one byte")
        pb = int(arr[0])
        if pb > max_prob_bits(int(alphabet)):
            raise DecodeError(f"rANS table prob_bits {pb} > {max_prob_bits(int(alphabet))}, the "
                              f"most a writer uses for an alphabet of {int(alphabet)}")
        freqs = np.zeros(int(alphabet), np.int64)
        r = int(_unpack_kernel(arr, pb, freqs))
        if r:
            raise DecodeError(f"rANS table: {_UNPACK_ERRORS.get(r, r)}")
        return cls(freqs.astype(np.uint32), pb)

    def max_symbols(self, n_bytes: int) -> int | None:
        """An upper bound on the symbols a stream of ``n_bytes`` bytes written with this table
        can hold; None when unbounded (a single-symbol table codes any count in 0 bytes).

        Each decoding step shrinks the state by a factor of at most 1 - d / (2M), where
        d = M - (largest frequency), and each byte read grows it by a factor of at most
        2**8.17 (the state before a read is >= 8); the state starts below 2**31 and ends at
        >= 2M (per lane, at L). Hence n <= 2 ln 2 (M / d) (8.17 n_bytes + 32): about
        23 symbols a byte when no symbol has more than half the probability.
        """
        if self.single_symbol is not None:
            return None
        m = 1 << self.prob_bits
        d = m - int(self.freqs.max())
        return int(math.ceil(1.3863 * m / d * (8.17 * int(n_bytes) + 32)))

    @cached_property
    def _encoder(self) -> tuple[np.ndarray, np.ndarray]:
        f = self.freqs.astype(np.int64)
        return f, np.cumsum(f) - f

    @cached_property
    def _decoder(self) -> tuple[np.ndarray, np.ndarray, int]:
        """(lut, syms, mask) over the M slots: lut = (f - 1) << prob_bits | (slot - cum) of the
        slot's symbol (uint32 up to 16 bits, else uint64), syms = the symbol. Two small arrays
        rather than one wide one: 5 bytes a slot at 16 bits, 320 KiB, mostly in L2. Built
        without int64 per-slot temporaries: at most decoder_bytes() plus one lut-sized array."""
        pb = self.prob_bits
        m = 1 << pb
        f = self.freqs.astype(np.int64)
        cum = np.cumsum(f) - f
        dt = np.uint32 if pb <= 16 else np.uint64
        syms = np.repeat(np.arange(self.alphabet, dtype=symbol_dtype(self.alphabet)), f)
        lut = np.arange(m, dtype=dt)
        lut -= np.repeat(cum.astype(dt), f)  # slot - cum >= 0
        lut |= np.repeat(((f - 1) << pb).astype(dt), f)
        return lut, syms, m - 1

    def decoder_bytes(self) -> int:
        """Bytes of the decoding tables (:attr:`_decoder`) and the frequencies: what a reader
        holds while this table is in use."""
        m = 1 << self.prob_bits
        lut = 4 if self.prob_bits <= 16 else 8
        return m * (lut + np.dtype(symbol_dtype(self.alphabet)).itemsize) + 12 * self.alphabet
