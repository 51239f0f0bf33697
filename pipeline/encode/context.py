"""Context-modelled binary arithmetic coding of pruning masks and quantization indices.

An alternative to the static gap/index Huffman codes (:mod:`.positions`, :mod:`.huffman`): an
adaptive model predicts every binary decision from what has already been coded, and a 32-bit
binary range coder spends -log2 p(decision) bits on it. Each call codes one block (a tensor,
or whole rows of one) from a fresh model state, so every block decodes on its own.

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
from numba import njit

from .bitio import DecodeError
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
# fixed-point logistic tables (integers only: encoder and decoder agree on every machine)

_SQUASH_KNOTS = (
    1, 2, 3, 6, 10, 16, 27, 45, 73, 120, 194, 310, 488, 747, 1101, 1546, 2047, 2549, 2994,
    3348, 3607, 3785, 3901, 3975, 4022, 4050, 4068, 4079, 4085, 4089, 4092, 4093, 4094,
)  # fmt: skip
"""4096 / (1 + exp(-x)) at x = -8, -7.5, ..., 8 (lpaq1's table); squash interpolates it."""


def _squash_int(d: int) -> int:
    d = min(max(d, -2047), 2047)
    w = d & 127
    i = (d >> 7) + 16
    return (_SQUASH_KNOTS[i] * (128 - w) + _SQUASH_KNOTS[i + 1] * w + 64) >> 7


_SQUASH = np.array([_squash_int(d) for d in range(-2048, 2048)], np.int64)
"""squash(d) = 4096 / (1 + exp(-d / 256)) for d in -2048..2047 (index d + 2048), 1..4095."""


def _stretch_table() -> np.ndarray:
    t = np.full(4096, 2047, np.int64)
    lo = 0
    for d in range(-2047, 2048):
        v = _squash_int(d)
        t[lo : v + 1] = d
        lo = max(lo, v + 1)
    return t


_STRETCH = _stretch_table()
"""stretch(p) = 256 ln(p / (1 - p)) for 12-bit p: the inverse of squash, -2047..2047."""

_RATE = np.array([(2 << 16) // (2 * n + 3) for n in range(256)], np.int64)
"""Adaptive-probability step 2 / (2n + 3) in 1/65536 after n updates (a KT-like average
while young, then an exponential one of rate 1/256)."""

_COST = np.concatenate(([0.0], -np.log2(np.arange(1, 4096) / 4096.0)))
"""-log2(p / 4096): the ideal bits of a decision coded with 12-bit probability p
(measurement only; never part of the coded data)."""


@njit(cache=True, inline="always")
def _sq(d):  # pragma: no cover - compiled
    if d > 2047:
        d = 2047
    elif d < -2047:
        d = -2047
    return _SQUASH[d + 2048]


@njit(cache=True, inline="always")
def _clip12(p):  # pragma: no cover - compiled
    if p < 1:
        return 1
    if p > 4095:
        return 4095
    return p


@njit(cache=True, inline="always")
def _est(n1, n, pt):  # pragma: no cover - compiled
    """12-bit (n1 + pt / 2) / (n + 1/2): a count's rate shrunk towards 12-bit pt."""
    return _clip12((8192 * n1 + pt) // (2 * n + 1))


@njit(cache=True, inline="always")
def _kt(n1, n):  # pragma: no cover - compiled
    return (4096 * (2 * n1 + 1)) // (2 * n + 2)


@njit(cache=True, inline="always")
def _adapt(sp, sn, i, bit):  # pragma: no cover - compiled
    """Update adaptive probability i (22-bit, sp) after ``bit``; sn counts its updates."""
    n = sn[i]
    sp[i] += (((bit << 22) - sp[i]) * _RATE[n]) >> 16
    if n < 255:
        sn[i] = n + 1


@njit(cache=True, inline="always")
def _blen(n):  # pragma: no cover - compiled
    """min(bit length of n, 7)."""
    b = 0
    while n > 0 and b < 7:
        n >>= 1
        b += 1
    return b


# ---------------------------------------------------------------------------------------------
# the binary range coder (LZMA's, with 12-bit probabilities of a one)

_TOP = 1 << 24
_M32 = (1 << 32) - 1
_M24 = (1 << 24) - 1

# Encoder state st: int64 [6] = low, range, cache, cache size, bytes emitted (-1 before the
# dropped first byte), first-byte error. Decoder state ds: int64 [4] = code, range, bytes
# read (zeros past the end), the last four bytes read.


@njit(cache=True, inline="always")
def _put(st, out, byte):  # pragma: no cover - compiled
    pos = st[4]
    if pos < 0:
        if byte != 0:
            st[5] = 1
    elif pos < out.shape[0]:
        out[pos] = byte
    st[4] = pos + 1


@njit(cache=True)
def _shift_low(st, out):  # pragma: no cover - compiled
    low = st[0]
    if low < 0xFF000000 or low > _M32:
        carry = low >> 32
        temp = st[2]
        while True:
            _put(st, out, (temp + carry) & 0xFF)
            temp = 0xFF
            st[3] -= 1
            if st[3] == 0:
                break
        st[2] = (low >> 24) & 0xFF
    st[3] += 1
    st[0] = (low & _M24) << 8


@njit(cache=True, inline="always")
def _enc_init(st):  # pragma: no cover - compiled
    st[0] = 0
    st[1] = _M32
    st[2] = 0
    st[3] = 1
    st[4] = -1
    st[5] = 0


@njit(cache=True, inline="always")
def _enc_bit(st, out, bit, p):  # pragma: no cover - compiled
    rng = st[1]
    bound = (rng >> 12) * p
    if bit:
        rng = bound
    else:
        st[0] += bound
        rng -= bound
    while rng < _TOP:
        rng <<= 8
        _shift_low(st, out)
    st[1] = rng


@njit(cache=True)
def _enc_flush(st, out):  # pragma: no cover - compiled
    """Emit the value with the most trailing zero bytes in [low, low + range); return the
    stream length without them."""
    low = st[0]
    v = (low + _M32) & ~np.int64(_M32)
    if v >= low + st[1]:
        v = (low + _M24) & ~np.int64(_M24)  # range >= 2**24: always inside
    st[0] = v
    for _ in range(5):
        _shift_low(st, out)
    vw = v & _M32
    t = 0
    while t < 4 and (vw & 0xFF) == 0:
        vw >>= 8
        t += 1
    return st[4] - t


@njit(cache=True, inline="always")
def _dec_byte(ds, data):  # pragma: no cover - compiled
    pos = ds[2]
    b = 0
    if pos < data.shape[0]:
        b = np.int64(data[pos])
    ds[2] = pos + 1
    ds[3] = ((ds[3] << 8) | b) & _M32
    return b


@njit(cache=True, inline="always")
def _dec_init(ds, data):  # pragma: no cover - compiled
    ds[0] = 0
    ds[1] = _M32
    ds[2] = 0
    ds[3] = 0
    for _ in range(4):
        ds[0] = (ds[0] << 8) | _dec_byte(ds, data)
    return ds[0] < ds[1]


@njit(cache=True, inline="always")
def _dec_bit(ds, data, p):  # pragma: no cover - compiled
    rng = ds[1]
    code = ds[0]
    bound = (rng >> 12) * p
    if code < bound:
        rng = bound
        bit = 1
    else:
        code -= bound
        rng -= bound
        bit = 0
    while rng < _TOP:
        rng <<= 8
        code = (code << 8) | _dec_byte(ds, data)
    ds[0] = code
    ds[1] = rng
    return bit


_CHECK_BITS = 16
"""Zero bits coded with p = 1/2 after the last decision: the decoder refuses a stream that
does not decode them as zeros (a corrupt stream passes with probability 2**-16)."""


@njit(cache=True)
def _enc_finish(st, out):  # pragma: no cover - compiled
    for _ in range(_CHECK_BITS):
        _enc_bit(st, out, 0, 2048)


@njit(cache=True)
def _dec_finish_ok(ds, data):  # pragma: no cover - compiled
    """True if the check bits are zeros and the stream ends exactly as _enc_flush ends one:
    the value is the one with the most trailing zero bytes in the final interval, and
    exactly those bytes (zeros) were read past the end."""
    for _ in range(_CHECK_BITS):
        if _dec_bit(ds, data, 2048) != 0:
            return False
    code = ds[0]
    vw = ds[3]
    if vw == 0:
        ok = True  # a multiple of 2**32: always the first choice
    else:
        # a multiple of 2**24, < 2**24 above low, and no multiple of 2**32 in the interval
        ok = (vw & _M24) == 0 and code <= _M24 and ((code - vw) & _M32) >= ds[1]
    if not ok:
        return False
    t = 0
    while t < 4 and (vw & 0xFF) == 0:
        vw >>= 8
        t += 1
    return ds[2] - data.shape[0] == t


# ---------------------------------------------------------------------------------------------
# mask model

_NIN = 12  # mixer inputs
_EFFECT_MAX = 16 << 16  # |row/column effect| <= 16 nats (2^-16 nat units)
_PRIOR_H = 4 << 24  # initial prior precision of an effect: variance 1/4 nat^2
_PRIOR_ROWS = 4  # pseudo-rows/columns of the initial variance in the EB estimate
_W_MAX = 1 << 22  # |mixer weight| <= 64


@njit(cache=True)
def _mask_kernel(mask, rows, cols, group, mode, model, data, out, st, cost):  # pragma: no cover
    """Code a [rows, cols] mask (flat uint8, C order).

    mode 0: measure (cost[0] = ideal bits; ``model`` 0..4 = MASK_MODELS), 1: encode into
    ``out`` (model 4), 2: decode ``data`` into ``mask`` (model 4). Returns 0, or -1 when the
    data is inconsistent (mode 2).
    """
    ngroups = (cols + group - 1) // group
    col1 = np.zeros(cols, np.int64)
    grp1 = np.zeros(ngroups, np.int64)
    grpn = np.zeros(ngroups, np.int64)
    tap1 = np.zeros(group, np.int64)
    tapn = np.zeros(group, np.int64)
    bcol = np.zeros(cols, np.int64)  # column effects, 2^-16 nats
    hcol = np.zeros(cols, np.int64)  # their Fisher information, 2^-24
    nbp = np.full(32, 1 << 21, np.int64)
    nbn = np.zeros(32, np.int64)
    ncp = np.full(512, 1 << 21, np.int64)
    ncn = np.zeros(512, np.int64)
    b4p = np.full(16, 1 << 21, np.int64)
    b4n = np.zeros(16, np.int64)
    b8p = np.full(64, 1 << 21, np.int64)
    b8n = np.zeros(64, np.int64)
    w = np.zeros(4 * _NIN, np.int64)
    for s in range(4):
        w[s * _NIN + 8] = 65536
    apm = np.zeros(4 * 33, np.int64)
    for j in range(4 * 33):
        apm[j] = _sq((j % 33 - 16) * 128) * 16
    x = np.zeros(_NIN, np.int64)
    h0r = np.int64(_PRIOR_H)
    h0c = np.int64(_PRIOR_H)
    v0 = (np.int64(1) << 40) // _PRIOR_H  # prior variance, 2^-16 nat^2
    ssr = np.int64(0)
    n1t = np.int64(0)
    nt = np.int64(0)
    total = 0.0
    size = data.shape[0]
    pm = sel = ai = wt = nci = c4 = c8 = 0
    if mode == 1:
        _enc_init(st)
    elif mode == 2:
        if not _dec_init(st, data):
            return -1
    for r in range(rows):
        base = r * cols
        row1 = np.int64(0)
        rowexp = np.int64(0)
        arow = np.int64(0)
        hrow = np.int64(0)
        if r > 0:
            # EM step for the prior variances: mean of (effect^2 + posterior variance)
            vr = (ssr + _PRIOR_ROWS * v0) // (r + _PRIOR_ROWS)
            h0r = (np.int64(1) << 40) // min(max(vr, 1), 1 << 22)
            ssc = np.int64(0)
            for j in range(cols):
                ssc += ((bcol[j] * bcol[j]) >> 16) + (np.int64(1) << 40) // (hcol[j] + h0c)
            vc = (ssc + _PRIOR_ROWS * v0) // (cols + _PRIOR_ROWS)
            h0c = (np.int64(1) << 40) // min(max(vc, 1), 1 << 22)
        b4 = 0
        b8 = 0
        for c in range(cols):
            if (c & 3) == 0:
                b4 = 0
                if (c & 7) == 0:
                    b8 = 0
            g = c // group
            t = c - g * group
            left = np.int64(mask[base + c - 1]) if c > 0 else 0
            above = 0
            al = 0
            ar = 0
            if r > 0:
                above = np.int64(mask[base - cols + c])
                if c > 0:
                    al = np.int64(mask[base - cols + c - 1])
                if c + 1 < cols:
                    ar = np.int64(mask[base - cols + c + 1])
            left2 = np.int64(mask[base + c - 2]) if c > 1 else 0
            nb = left | (above << 1) | (left2 << 2) | (al << 3) | (ar << 4)
            pt = _kt(n1t, nt)
            st_t = _STRETCH[pt]
            pc = _est(col1[c], r, pt)
            # online Rasch model
            z = ((st_t << 8) + arow + bcol[c]) >> 8
            if z > 2047:
                z = 2047
            elif z < -2047:
                z = -2047
            prs = _sq(z)
            if model == 4:
                x[0] = 256
                x[1] = st_t
                x[2] = _STRETCH[pc]
                x[3] = _STRETCH[_est(row1, c, pt)]
                if group > 1:
                    x[4] = _STRETCH[_est(grp1[g], grpn[g], pt)]
                    x[5] = _STRETCH[_est(tap1[t], tapn[t], pt)]
                nci = nb * 16 + ((x[2] + 2048) >> 8)
                x[6] = _STRETCH[nbp[nb] >> 10]
                x[7] = _STRETCH[ncp[nci] >> 10]
                x[8] = z
                x[9] = _STRETCH[_clip12((pc * (4096 * row1 + 4096)) // (rowexp + 4096))]
                c4 = b4 * 4 + (c & 3)
                c8 = b8 * 8 + (c & 7)
                x[10] = _STRETCH[b4p[c4] >> 10]
                x[11] = _STRETCH[b8p[c8] >> 10]
                sel = (left | (above << 1)) * _NIN
                dot = np.int64(0)
                for i in range(_NIN):
                    dot += x[i] * w[sel + i]
                dot >>= 16
                if dot > 2047:
                    dot = 2047
                elif dot < -2047:
                    dot = -2047
                pm = _sq(dot)
                a = (dot + 2048) * 32
                wt = a & 0xFFF
                ai = (left | (above << 1)) * 33 + (a >> 12)
                pap = (apm[ai] * (4096 - wt) + apm[ai + 1] * wt) >> 16
                p = _clip12((3 * pm + pap) >> 2)
            elif model == 0:
                p = pt
            elif model == 1:
                p = _clip12(nbp[left | (above << 1)] >> 10)
            elif model == 2:
                p = _sq(_STRETCH[pc] + _STRETCH[_est(row1, c, pt)] - st_t)
            else:
                p = prs
            if mode == 2:
                bit = _dec_bit(st, data, p)
                if st[2] > size + 4:
                    return -1
                mask[base + c] = bit
            else:
                bit = np.int64(mask[base + c])
                if mode == 1:
                    _enc_bit(st, out, bit, p)
                else:
                    total += _COST[p] if bit else _COST[4096 - p]
            # update
            if model == 4:
                err = (bit << 12) - pm
                for i in range(_NIN):
                    wi = w[sel + i] + ((x[i] * err + 0x8000) >> 16)
                    w[sel + i] = min(max(wi, -_W_MAX), _W_MAX)
                aj = ai + (wt >> 11)
                apm[aj] += ((bit << 16) + (bit << 7) - bit - bit - apm[aj]) >> 7
                _adapt(nbp, nbn, nb, bit)
                _adapt(ncp, ncn, nci, bit)
                _adapt(b4p, b4n, c4, bit)
                _adapt(b8p, b8n, c8, bit)
            elif model == 1:
                _adapt(nbp, nbn, left | (above << 1), bit)
            e = (bit << 12) - prs
            h = prs * (4096 - prs)
            hrow += h
            hcol[c] += h
            arow = min(max(arow + (e << 28) // (hrow + h0r), -_EFFECT_MAX), _EFFECT_MAX)
            bc = bcol[c] + (e << 28) // (hcol[c] + h0c)
            bcol[c] = min(max(bc, -_EFFECT_MAX), _EFFECT_MAX)
            rowexp += pc
            n1t += bit
            nt += 1
            row1 += bit
            col1[c] += bit
            grp1[g] += bit
            grpn[g] += 1
            tap1[t] += bit
            tapn[t] += 1
            b4 += bit
            b8 += bit
        ssr += ((arow * arow) >> 16) + (np.int64(1) << 40) // (hrow + h0r)
    cost[0] = total
    if mode == 2 and not _dec_finish_ok(st, data):
        return -1
    return 0


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
# index model

_NB = 16  # row-spread buckets: 0..14 = min(bit length of 4 * mean |s - mean|, 14), 15 = none
_INIT_W = (0, 40000, 8000, 16384)  # bias, tensor node, row node, spread bucket (x 2^-16)


@njit(cache=True)
def _idx_kernel(codes, n, k, rows, mode, data, out, st, cost):  # pragma: no cover - compiled
    """Code n symbols < k (k >= 2); modes as in _mask_kernel (mode 2 writes ``codes``)."""
    depth = 0
    while (1 << depth) < k:
        depth += 1
    nn = 1 << depth
    tn = np.zeros(nn, np.int64)
    t1 = np.zeros(nn, np.int64)
    rn = np.zeros(nn, np.int64)
    r1 = np.zeros(nn, np.int64)
    touched = np.zeros(nn, np.int64)
    bp = np.full(_NB * nn, 1 << 21, np.int64)
    bn = np.zeros(_NB * nn, np.int64)
    nsets = depth * 8
    w = np.zeros(nsets * 4, np.int64)
    for s in range(nsets):
        for j in range(4):
            w[s * 4 + j] = _INIT_W[j]
    x = np.zeros(4, np.int64)
    ntouch = 0
    tsum = np.int64(0)
    rsum = np.int64(0)
    rcnt = np.int64(0)
    total = 0.0
    size = data.shape[0]
    if mode == 1:
        _enc_init(st)
    elif mode == 2:
        if not _dec_init(st, data):
            return -1
    for i in range(n):
        if i == 0 or rows[i] != rows[i - 1]:
            for j in range(ntouch):
                rn[touched[j]] = 0
                r1[touched[j]] = 0
            ntouch = 0
            rsum = 0
            rcnt = 0
        if rcnt == 0:
            bucket = _NB - 1
        else:
            bucket = min(_blen((rsum * 4) // rcnt), _NB - 2)
        rb = _blen(rcnt)
        sym = np.int64(codes[i]) if mode != 2 else np.int64(0)
        v = np.int64(0)
        node = np.int64(1)
        for d in range(depth):
            sh = depth - 1 - d
            if ((2 * v + 1) << sh) >= k:  # the 1-branch holds only codes >= k
                v = 2 * v
                node = 2 * node
                continue
            pt = _kt(t1[node], tn[node])
            bi = bucket * nn + node
            x[0] = 256
            x[1] = _STRETCH[pt]
            x[2] = _STRETCH[_est(r1[node], rn[node], pt)]
            x[3] = _STRETCH[bp[bi] >> 10]
            sel = (d * 8 + rb) * 4
            dot = (x[0] * w[sel] + x[1] * w[sel + 1] + x[2] * w[sel + 2] + x[3] * w[sel + 3]) >> 16
            p = _clip12(_sq(dot))
            if mode == 2:
                bit = _dec_bit(st, data, p)
                if st[2] > size + 4:
                    return -1
            else:
                bit = (sym >> sh) & 1
                if mode == 1:
                    _enc_bit(st, out, bit, p)
                else:
                    total += _COST[p] if bit else _COST[4096 - p]
            err = ((bit << 12) - _sq(dot)) * 4
            for j in range(4):
                wj = w[sel + j] + ((x[j] * err + 0x8000) >> 16)
                w[sel + j] = min(max(wj, -_W_MAX), _W_MAX)
            tn[node] += 1
            t1[node] += bit
            if rn[node] == 0:
                touched[ntouch] = node
                ntouch += 1
            rn[node] += 1
            r1[node] += bit
            _adapt(bp, bn, bi, bit)
            v = 2 * v + bit
            node = 2 * node + bit
        if mode == 2:
            codes[i] = v
        tsum += v
        cm = (tsum + (i + 1) // 2) // (i + 1)
        rsum += v - cm if v >= cm else cm - v
        rcnt += 1
    cost[0] = total
    if mode == 2 and not _dec_finish_ok(st, data):
        return -1
    return 0


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
