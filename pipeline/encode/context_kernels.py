"""The numba kernels of the context-mixing coder (:mod:`.context`, whose docstring describes
the models): integer logistic tables, LZMA's binary range coder, the mask model and the index
model. They share one file because numba's on-disk cache only notices changes to the file of
the function it compiled, and every kernel here inlines the range coder and the tables.

Kernel modes: 0 measures (ideal bits into ``cost[0]``), 1 encodes into ``out``, 2 decodes
``data``. Everything is integer arithmetic (tables built from integers at import, no libm),
so the bytes are a pure function of the input on every machine.
"""

from __future__ import annotations

import numpy as np
from numba import njit

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
