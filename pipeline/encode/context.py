"""Context-modelled binary arithmetic coding of pruning masks and quantization indices.

An alternative to the static gap/index Huffman codes (:mod:`.positions`, :mod:`.huffman`): an
adaptive model predicts every binary decision from what has already been coded, and a 32-bit
binary range coder spends -log2 p(decision) bits on it. Each call codes one block (a tensor,
or whole rows of one) from a fresh model state, so every block decodes on its own.
This module is the coder's interface (argument checks, output sizing, the bounds a decoder
enforces); the numba kernels it drives (tables, range coder, both models) are in
:mod:`.context_kernels`.

Range coder
    LZMA's binary range coder (32-bit range, 64-bit low with carry propagation through a cached
    byte) driven by 12-bit probabilities of a one, p in 1..4095. The first output byte is
    always zero and is not stored. The flush picks the value in [low, low + range) with the
    most trailing zero bytes and drops those bytes (the decoder reads zeros past the end).
    Before the flush, 16 zero bits are coded with p = 1/2 (2 bytes per stream). The decoder
    refuses a stream unless those decode as zeros and the stream ends exactly as the
    encoder ends one (the canonical final value, and exactly its dropped bytes read past the
    end): truncated, extended, corrupted or wrongly sized data is refused with
    :class:`DecodeError` except with probability ~2**-16 (the container's CRC covers the
    rest; an undetected corruption decodes to a wrong mask of the declared size, boundedly).
    Decoding never reads more than 4 bytes past the end (it stops with an error instead).

    Output bound. A decision coded with p clamped to [1, 4095] shrinks the range by at least
    a factor 1 - 2**-12 + 2**-24, i.e. costs at least 3.52e-4 bits, so a stream of ``m``
    bytes holds at most :func:`max_decisions` (m) = 2840 * (8 * m + 8) decisions: ~22,700
    mask bits or index symbols per stored byte (an all-zero mask reaches it: 4 M bits in
    ~180 bytes). The decoders refuse a larger rows * cols or n before decoding, so their work
    is bounded by the data size as well as by the sizes the header declares.

    Everything a probability depends on is integer arithmetic (tables built from integers at
    import, no libm), so the bytes are a pure function of the input on every machine.

Mask model (:func:`encode_mask`)
    The mask is a [rows, cols] bit matrix (rows = output channels) coded in C order. Eleven
    predictions (12-bit probabilities) and a bias are mixed in the logistic domain (lpaq-style
    stretch/squash; one online-trained weight vector per (left bit, above bit) context) and
    refined by an adaptive probability map (APM, 33 interpolated buckets, same context;
    final p = (3 * mixed + APM) / 4):

    1. the tensor's density so far (KT estimate);
    2. the column's density in the previous rows, 3. the row's density so far (both count
       estimates shrunk towards the tensor density by half a count);
    4. the input channel's density (columns ``group`` at a time, e.g. a conv kernel's taps),
       5. the kernel tap's density (column mod ``group``) — both 0 when group == 1;
    6. an adaptive probability for the 5 neighbouring bits (left, left-left, above,
       above-left, above-right), 7. the same crossed with a 16-level column-density bucket;
    8. an online logistic Rasch model, logit p = logit(tensor density) + a_row + b_col, the
       row and column effects learned by a one-parameter Newton step each bit with Gaussian
       priors whose variances are re-estimated every row by empirical Bayes (EM on the
       effects seen so far) — the model that captures magnitude pruning's structure,
       |W_ij| ~ r_i c_j |N(0, 1)|;
    9. the column's density scaled by the row's kept / expected-kept ratio so far;
    10. the ones so far in the aligned 4-column block with the position in it, 11. the same
        for 8-column blocks (N:M semi-structured sparsity such as 2:4 is then nearly free).

    The mixer starts as the Rasch model alone (weight 1) and learns the others' weights.

    Measured on pruned LeNet-5 (runs/default: conv1 keeps 66%, conv2 12%, fc1 8%, fc2 19%;
    benchmarks/position_coding.py prints the per-tensor table), bits over the four masks
    (36,280 kept weights); models (a)-(c') are ideal adaptive code lengths (mask_cost_bits):

    ==============================================  ========  =============
    positions code                                   bits      bits / kept
    ==============================================  ========  =============
    Huffman gaps today (network table, + 368 table)  179,608   4.951
    gap order-0 entropy, network-pooled gaps         177,878   4.903
    gap order-0 entropy, per tensor                  176,539   4.866
    (a) tensor density only                          178,102   4.909
    (b) context = left bit, above bit                176,369   4.861
    (c) row x column counts, logit product           179,202   4.939
    (c') online Rasch + empirical Bayes alone        171,518   4.728
    (d) mix of 1-11 + APM, ideal                     171,545   4.728
    (d) encode_mask, stored bytes                    171,616   4.730
    ==============================================  ========  =============

    That is -2.8% against the per-tensor gap entropy, -3.5% against the pooled one, -4.5%
    against today's code. fc1 (154,472 bits coded vs 159,557) is where the structure is: a
    Rasch model with known row and column effects would need 151,200 bits, so the rest is
    the cost of learning 1,300 effects. The tiny conv1 and fc2 masks code 2-3% above their
    gap entropy, which as an empirical measure gets its ~100-symbol distribution for free.
    (d) is the coder though the Rasch model alone is as good on LeNet: it keeps unstructured
    masks within 0.3% of the ideal (iid p = 0.5, 256 x 512: 131,440 bits) and codes what the
    Rasch model cannot see: 4x4 block pruning 12,944 bits vs gap entropy 37,886 (Rasch
    94,448); 2:4 sparsity 86,584 vs 121,793 (its entropy is 84,704); synthetic
    |r_i c_j N(0, 1)| magnitude pruning of 500 x 800 to 8%: 108,776 vs 146,730.

Index model (:func:`encode_indices`)
    A code s in 0..k-1 is coded as the ceil(log2 k) bits of s, MSB first, walking a binary
    tree; a bit whose 1-branch holds only codes >= k is implied and not coded. Per tree node
    the mixer (one weight vector per (depth, log2 of the row's codes so far)) combines:
    the node's KT probability over the tensor so far; over the current row so far (shrunk
    towards the tensor's); and an adaptive probability for (node, row-spread bucket), where
    the bucket is log2 of the row's mean |s - tensor mean| so far — rows of a per-channel
    scale share statistics with rows of similar scale instead of learning k - 1 node
    probabilities each. Measured against each tensor's order-0 entropy of its codes (stored
    bytes): LeNet-5 (one network codebook, k = 21; the Huffman code of today shares one
    table over the network) 104,456 bits vs order-0 104,407 per tensor, 109,025 pooled, and
    110,458 for today's Huffman + table (-5.4%): its rows barely differ. Laplace codes with
    per-row scales (exp(0.7 N) spread, k = 64; exp(0.5 N), k = 256): -3.5% / -2.9% below
    order-0; identical rows (k = 64): +0.38%.

Speed (numba, one thread, 2 shared cores, load average 0.4): masks 16 Mbit/s encode and
decode (~60 ns a bit), indices 6 Msym/s at k = 21 (3.8 at k = 256).
"""

from __future__ import annotations

import numpy as np

from .bitio import DecodeError
from .context_kernels import _enc_finish, _enc_flush, _idx_kernel, _mask_kernel
from .huffman import symbol_dtype

__all__ = [
    "DECISIONS_PER_BIT",
    "MASK_MODELS",
    "MAX_INDEX_ALPHABET",
    "decode_indices",
    "decode_mask",
    "encode_indices",
    "encode_mask",
    "indices_cost_bits",
    "mask_cost_bits",
    "max_decisions",
]

DECISIONS_PER_BIT = 2840
"""Upper bound on binary decisions per coded bit: each costs >= -log2(1 - 2**-12 + 2**-24)
= 3.5212e-4 bits (1 / 2839.9), p being clamped to 1..4095 of 4096."""

MAX_INDEX_ALPHABET = 1 << 16
"""Largest k :func:`encode_indices` handles (uint16 codes)."""

MASK_MODELS = ("density", "neighbours", "counts", "rasch", "mix")
"""Models :func:`mask_cost_bits` measures; the coder uses "mix"."""


def max_decisions(nbytes: int) -> int:
    """The most decisions (mask bits; index symbols, for k >= 2) ``nbytes`` bytes can hold."""
    return DECISIONS_PER_BIT * (8 * int(nbytes) + 8)


# ---------------------------------------------------------------------------------------------
# masks


def _mask_args(mask: np.ndarray, group: int) -> tuple[np.ndarray, int, int, int]:
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D [rows, cols], got shape {m.shape}")
    group = int(group)
    if group < 1:
        raise ValueError(f"group must be >= 1, got {group}")
    flat = np.ascontiguousarray(m != 0).view(np.uint8).reshape(-1)
    # a group wider than a row codes like a group of one row (keeps the tap arrays small)
    return flat, int(m.shape[0]), int(m.shape[1]), min(group, max(int(m.shape[1]), 1))


def _flush_bytes(st: np.ndarray, out: np.ndarray) -> bytes | None:
    """The finished stream, or None if ``out`` was too small (st[4] then holds the size)."""
    _enc_finish(st, out)
    n = int(_enc_flush(st, out))
    if st[5]:
        raise AssertionError("range coder: the first byte is not zero")
    if int(st[4]) > out.shape[0]:
        return None
    return out[:n].tobytes()


def encode_mask(mask: np.ndarray, group: int = 1) -> bytes:
    """Code a pruning mask with the adaptive context-mixing model.

    Args:
        mask: bool (or 0/1) [rows, cols]; rows = output channels, cols = the rest in C order.
        group: consecutive columns that belong to one input channel (a conv kernel's
            kh * kw; 1 for a Linear). Any value >= 1 round-trips; the decoder needs the same.

    Returns:
        The coded bytes (b"" when rows * cols == 0; possibly b"" for other masks too).
    """
    flat, rows, cols, group = _mask_args(mask, group)
    if flat.size == 0:
        return b""
    cost = np.zeros(1)
    cap = flat.size // 4 + 64
    for _ in range(2):
        out = np.empty(cap, np.uint8)
        st = np.zeros(6, np.int64)
        _mask_kernel(flat, rows, cols, group, 1, 4, _NO_DATA, out, st, cost)
        data = _flush_bytes(st, out)
        if data is not None:
            return data
        cap = int(st[4]) + 8
    raise AssertionError("range coder: output size changed between two runs")


def _readonly(arr: np.ndarray) -> np.ndarray:
    # One array type for numba (readonly uint8 data), whatever buffer the caller passes.
    if arr.flags.writeable:
        arr = arr.view()
        arr.flags.writeable = False
    return arr


_NO_DATA = _readonly(np.zeros(0, np.uint8))


def _as_u8(data) -> np.ndarray:
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim != 1:
            raise TypeError(f"data must be bytes or 1-D uint8, got {data.dtype} {data.shape}")
        return _readonly(np.ascontiguousarray(data))
    return _readonly(np.frombuffer(data, np.uint8))


def decode_mask(data, rows: int, cols: int, group: int = 1) -> np.ndarray:
    """Inverse of :func:`encode_mask`: bool [rows, cols].

    Raises:
        DecodeError: bad sizes, more bits than the data can hold (:func:`max_decisions`),
            or data that is not exactly a stream :func:`encode_mask` writes for this shape.
    """
    buf = _as_u8(data)
    rows, cols, group = int(rows), int(cols), int(group)
    if rows < 0 or cols < 0 or group < 1:
        raise DecodeError(f"bad mask geometry rows={rows} cols={cols} group={group}")
    numel = rows * cols
    if max(rows, cols) >= 1 << 62:
        raise DecodeError(f"mask geometry rows={rows} cols={cols} is too large")
    if numel == 0:
        if buf.size:
            raise DecodeError(f"an empty mask has {buf.size} bytes")
        return np.zeros((rows, cols), bool)
    if numel > max_decisions(buf.size):
        raise DecodeError(f"{numel} mask bits cannot be coded in {buf.size} bytes")
    group = min(group, cols)
    flat = np.zeros(numel, np.uint8)
    st = np.zeros(4, np.int64)
    r = _mask_kernel(flat, rows, cols, group, 2, 4, buf, np.zeros(0, np.uint8), st, np.zeros(1))
    if r < 0:
        raise DecodeError("corrupt mask stream (it does not end where its bits end)")
    return flat.view(bool).reshape(rows, cols)


def mask_cost_bits(mask, group: int = 1, *, model: str = "mix") -> float:
    """Ideal adaptive code length of a mask in bits (sum of -log2 p over its bits).

    ``model``: one of MASK_MODELS — "density" (the tensor's density so far), "neighbours"
    (context = left and above bits), "counts" (logit p = logit p_row + logit p_col -
    logit p_tensor, count estimates), "rasch" (the online Rasch model with empirical-Bayes
    priors) or "mix" (what :func:`encode_mask` codes with: its output is within a few
    bytes of this).
    """
    if model not in MASK_MODELS:
        raise ValueError(f"model must be one of {MASK_MODELS}, got {model!r}")
    flat, rows, cols, group = _mask_args(mask, group)
    if flat.size == 0:
        return 0.0
    cost = np.zeros(1)
    st = np.zeros(6, np.int64)
    out = np.zeros(0, np.uint8)
    _mask_kernel(flat, rows, cols, group, 0, MASK_MODELS.index(model), _NO_DATA, out, st, cost)
    return float(cost[0])


# ---------------------------------------------------------------------------------------------
# indices


def _index_args(codes, k: int, rows) -> tuple[np.ndarray, int, np.ndarray]:
    c = np.asarray(codes)
    r = np.asarray(rows)
    k = int(k)
    if not 1 <= k <= MAX_INDEX_ALPHABET:
        raise ValueError(f"k must be in 1..{MAX_INDEX_ALPHABET}, got {k}")
    if c.ndim != 1 or r.shape != c.shape:
        raise ValueError(f"codes and rows must be 1-D of one length, got {c.shape}, {r.shape}")
    if c.size and (c.dtype.kind not in "ui" or int(c.min()) < 0 or int(c.max()) >= k):
        raise ValueError(f"codes must be integers in [0, {k})")
    if r.size and r.dtype.kind not in "ui":
        raise ValueError("rows must be integers")
    return np.ascontiguousarray(c, np.int64), k, np.ascontiguousarray(r, np.int64)


def encode_indices(codes: np.ndarray, k: int, rows: np.ndarray) -> bytes:
    """Code codebook indices adaptively, with the row of each code as context.

    Args:
        codes: uint [n], each < k: the kept weights' indices in flat (C) order.
        k: alphabet size, 1..65536 (k == 1 codes nothing: b"").
        rows: int [n], the row (output channel) of each code; a change of value starts a new
            row's statistics (non-decreasing in practice; any sequence round-trips).

    Returns:
        The coded bytes (b"" when n == 0 or k == 1).
    """
    c, k, r = _index_args(codes, k, rows)
    n = c.shape[0]
    if n == 0 or k == 1:
        return b""
    cost = np.zeros(1)
    cap = n + 64
    for _ in range(2):
        out = np.empty(cap, np.uint8)
        st = np.zeros(6, np.int64)
        _idx_kernel(c, n, k, r, 1, _NO_DATA, out, st, cost)
        data = _flush_bytes(st, out)
        if data is not None:
            return data
        cap = int(st[4]) + 8
    raise AssertionError("range coder: output size changed between two runs")


def decode_indices(data, n: int, k: int, rows: np.ndarray) -> np.ndarray:
    """Inverse of :func:`encode_indices`: codes [n] of dtype ``symbol_dtype(k)``.

    Raises:
        DecodeError: bad n / k / rows, more symbols than the data can hold
            (:func:`max_decisions`; k >= 2), or data that is not exactly a stream
            :func:`encode_indices` writes for these arguments.
    """
    buf = _as_u8(data)
    n, k = int(n), int(k)
    if n < 0 or not 1 <= k <= MAX_INDEX_ALPHABET:
        raise DecodeError(f"bad index stream arguments n={n} k={k}")
    r = np.asarray(rows)
    if r.shape != (n,) or (n and r.dtype.kind not in "ui"):
        raise DecodeError(f"rows must be {n} integers, got {r.dtype} {r.shape}")
    dtype = symbol_dtype(k)
    if n == 0 or k == 1:
        if buf.size:
            raise DecodeError(f"an index stream without decisions has {buf.size} bytes")
        return np.zeros(n, dtype)
    if n > max_decisions(buf.size):
        raise DecodeError(f"{n} index symbols cannot be coded in {buf.size} bytes")
    # Narrow arrays (2 bytes a code, rows as given: uint32 from the reader), not int64: the
    # decoder's working memory stays a small multiple of its output. One compiled variant
    # for the codes (uint16), and rows as uint32 unless they need int64.
    codes = np.zeros(n, np.uint16)
    st = np.zeros(4, np.int64)
    narrow = (r.dtype.kind == "u" and r.dtype.itemsize <= 4) or (
        int(r.min()) >= 0 and int(r.max()) < 1 << 32)
    rr = np.ascontiguousarray(r, np.uint32 if narrow else np.int64)
    if _idx_kernel(codes, n, k, rr, 2, buf, np.zeros(0, np.uint8), st, np.zeros(1)) < 0:
        raise DecodeError("corrupt index stream (it does not end where its symbols end)")
    return codes if dtype == codes.dtype else codes.astype(dtype)


def indices_cost_bits(codes, k: int, rows) -> float:
    """Ideal adaptive code length in bits of :func:`encode_indices`' model (sum of -log2 p)."""
    c, k, r = _index_args(codes, k, rows)
    if c.shape[0] == 0 or k == 1:
        return 0.0
    cost = np.zeros(1)
    st = np.zeros(6, np.int64)
    _idx_kernel(c, c.shape[0], k, r, 0, _NO_DATA, np.zeros(0, np.uint8), st, cost)
    return float(cost[0])
