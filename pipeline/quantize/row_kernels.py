"""Numba kernels of the per-row quantizers (:mod:`pipeline.quantize.rows`).

Single-threaded and GIL-free: callers run disjoint row ranges on threads. Each penalised ECSQ
pass costs ~17 ns/weight on the development machine: the nearest centre by a branch-free
count, the window of ±2 levels around it with selects, and the rare exact continuation of the
search in a separate loop (in one loop the compiler turned the selects into mispredicted
branches, about 3× slower).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

__all__ = ["bin_rows_kernel", "ecsq_kernel", "ecuq_kernel", "entropy_kernel", "sse_kernel"]

# Up to this many midpoints the nearest centre is found by a linear, branch-free count (SIMD);
# beyond it by a branch-free bisection over midpoints padded to a power of two.
_LINEAR_MIDS = 64


@njit(cache=True, nogil=True)
def _fill_mids(c, L, mids):
    """mids[:L-1] = midpoints of the sorted c[:L]; the rest +inf. Returns the padded length p
    (a power of two minus one, >= L - 1) for _nearest."""
    p = 1
    while p - 1 < L - 1:
        p *= 2
    for j in range(mids.shape[0]):
        mids[j] = 0.5 * (c[j] + c[j + 1]) if j < L - 1 else np.inf
    return p - 1


@njit(cache=True, nogil=True, inline="always")
def _nearest(x, mids, L, p):
    """Index of the nearest of L sorted centres = number of their midpoints <= x."""
    if L - 1 <= _LINEAR_MIDS:
        j = 0
        for q in range(L - 1):
            j += x >= mids[q]
        return j
    j = 0
    step = (p + 1) >> 1
    while step > 0:
        j += step * (x >= mids[j + step - 1])
        step >>= 1
    return j


@njit(cache=True, nogil=True, inline="always")
def _window(x, hx, cp, pp, j0):
    """(j, cost) minimising hx (x − c_j)² + pen_j over the window j0 − 2 .. j0 + 2 around the
    nearest centre j0; c and pen padded by two slots each side (cp[j + 2] = c_j,
    pp[j + 2] = pen_j, pads: pen = inf). Selects only, no branches."""
    d = x - cp[j0 + 2]
    b1 = hx * d * d + pp[j0 + 2]
    j1 = j0
    for off in (-1, 1, -2, 2):
        jj = j0 + off
        d = x - cp[jj + 2]
        t = hx * d * d + pp[jj + 2]
        sel = t < b1
        b1 = t if sel else b1
        j1 = jj if sel else j1
    return j1, b1


@njit(cache=True, nogil=True)
def _beyond(x, hx, cp, pp, rmin, lmin, L, j0, j1, b1):
    """Continue _window's search past j0 ± 2 (exact): beyond j the cost is at least
    hx·d_j² + min(pen further out), so each side stops once that bound reaches the best."""
    j = j0 + 3
    while j < L:
        d = cp[j + 2] - x
        q = hx * d * d
        if q + rmin[j] >= b1:
            break
        t = q + pp[j + 2]
        if t < b1:
            b1 = t
            j1 = j
        j += 1
    j = j0 - 3
    while j >= 0:
        d = x - cp[j + 2]
        q = hx * d * d
        if q + lmin[j] >= b1:
            break
        t = q + pp[j + 2]
        if t < b1:
            b1 = t
            j1 = j
        j -= 1
    return j1


@njit(cache=True, nogil=True, inline="always")
def _window2(x, hx, cp, pp, j0, L):
    """Best two (j1, j2, cost1, cost2) of the window j0 − 2 .. j0 + 2 (padded arrays as in
    _window; pads never win, so j2 = -1 only when L == 1). Selects only."""
    d = x - cp[j0 + 2]
    b1 = hx * d * d + pp[j0 + 2]
    j1 = j0
    b2 = np.inf
    j2 = -1
    for off in (-1, 1, -2, 2):
        jj = j0 + off
        d = x - cp[jj + 2]
        t = hx * d * d + pp[jj + 2]
        s1 = t < b1
        s2 = t < b2
        nb2 = b1 if s1 else (t if s2 else b2)
        nj2 = j1 if s1 else (jj if s2 else j2)
        b1 = t if s1 else b1
        j1 = jj if s1 else j1
        b2 = nb2
        j2 = nj2
    return j1, j2, b1, b2


@njit(cache=True, nogil=True)
def _beyond2(x, hx, cp, pp, rmin, lmin, L, j0, j1, j2, b1, b2):
    """_beyond for the best two: each side stops once its bound reaches the second best."""
    j = j0 + 3
    while j < L:
        d = cp[j + 2] - x
        q = hx * d * d
        if q + rmin[j] >= b2:
            break
        t = q + pp[j + 2]
        if t < b1:
            b2 = b1
            j2 = j1
            b1 = t
            j1 = j
        elif t < b2:
            b2 = t
            j2 = j
        j += 1
    j = j0 - 3
    while j >= 0:
        d = x - cp[j + 2]
        q = hx * d * d
        if q + lmin[j] >= b2:
            break
        t = q + pp[j + 2]
        if t < b1:
            b2 = b1
            j2 = j1
            b1 = t
            j1 = j
        elif t < b2:
            b2 = t
            j2 = j
        j -= 1
    return j1, j2, b1, b2


@njit(cache=True, nogil=True)
def ecsq_kernel(W, H, C0, L0, lam, lb, iters, tol, prune, hist, use_hist, M, use_m, P0,
                use_p0, out_c, out_idx, out_L, out_cnt, out_H, out_J, out_it):
    """Iterative ECSQ of every row of W [R, n] (float32) with weights H [R, n] (float32 ≥ 0).

    C0 float64 [R, K]: sorted starting centres, row r uses C0[r, :L0[r]] (duplicates merged).
    Minimises J_r = Σ h (w − c_a)² + λ (n H_r + lb L_r) (H_r in bits/weight).
    Iteration 0 assigns to the nearest centre; iterations 1..iters add the penalty
    −λ log2 p_j. hist [R, iters + 1] receives J after each update when use_hist.
    Outputs per row: out_c [R, K] sorted levels (padding repeats the last), out_idx [R, n],
    out_L, out_cnt [R, K], out_H (bits/weight), out_J (the Lagrangian), out_it (iterations).

    use_m: element i of row r stands for M[r, i] ≥ 0 weights (a bin of the row, see
    bin_rows_kernel; W its h-weighted mean, H the mean h of its members): every sum counts it
    M[r, i] times, and n is Σ M[r]. M = 1 gives the plain kernel, bit for bit.
    use_p0: iteration 0 is already penalised, with P0[r, :L0[r]] the penalties of C0's levels
    (the last stage of the binned solver: one exact pass from the bins' solution).
    """
    R, n = W.shape
    K = C0.shape[1]
    nw = (K + 63) >> 6
    c = np.empty(K)
    pen = np.zeros(K)
    cnt = np.zeros(K, np.int64)
    # acc[j] = (count, Σh, Σh·d, Σh·d², Σd) with d = w − c_j: one cache line per level.
    acc = np.zeros((K, 5))
    mids = np.full(2 * K + 1, np.inf)
    cp = np.empty(K + 4)
    pp = np.empty(K + 4)
    rmin = np.empty(K)
    lmin = np.empty(K)
    nc = np.empty(K)
    ncnt = np.zeros(K, np.int64)
    lab = np.empty(K, np.int64)
    inv = np.empty(K, np.int64)
    gain = np.zeros(K)
    blocked = np.zeros(K, np.bool_)
    removed = np.zeros(K, np.bool_)
    # mark[j, j2 >> 6] bit j2: some member of level j has level j2 as its second best.
    mark = np.zeros((K, nw), np.uint64)
    a = np.empty(n, np.int64)
    a2 = np.empty(n, np.int64)
    a3 = np.empty(n, np.int64)
    bst = np.empty(n)
    bst2 = np.empty(n)
    nf = float(n)
    log2n = np.log2(nf) if n > 0 else 0.0
    nlog = nf * log2n
    one = np.uint64(1)
    for r in range(R):
        w = W[r]
        h = H[r]
        if use_m:
            nf = 0.0
            for i in range(n):
                nf += M[r, i]
            log2n = np.log2(nf) if nf > 0 else 0.0
            nlog = nf * log2n
        L = 0
        for j in range(L0[r]):
            v = C0[r, j]
            if L == 0 or v != c[L - 1]:
                c[L] = v
                pen[L] = P0[r, j] if use_p0 else 0.0
                L += 1
        Jp = np.inf
        J = 0.0
        t = 0
        while True:
            penal = t > 0 or use_p0
            do_pr = prune and penal and L >= 2
            if penal:
                m = np.inf
                for j in range(L - 1, -1, -1):
                    m = min(m, pen[j])
                    rmin[j] = m
                m = np.inf
                for j in range(L):
                    m = min(m, pen[j])
                    lmin[j] = m
                for j in range(L):
                    cp[j + 2] = c[j]
                    pp[j + 2] = pen[j]
                for j in (0, 1):
                    cp[j] = c[0]
                    pp[j] = np.inf
                    cp[L + 2 + j] = c[L - 1]
                    pp[L + 2 + j] = np.inf
            for j in range(L):
                for q in range(5):
                    acc[j, q] = 0.0
                gain[j] = 0.0
                for q in range(nw):
                    mark[j, q] = 0
            p = _fill_mids(c, L, mids)
            # Assignment, accumulating the moments of each level about its current centre
            # (no cancellation when the new centre is formed and its distortion measured).
            # The search is split into straight-line loops: with the rare, branchy exact tail
            # in the same loop the compiler turns the window's selects into branches, which
            # mispredict (measured ~4x slower).
            if not penal:
                for i in range(n):
                    a[i] = _nearest(np.float64(w[i]), mids, L, p)
            elif not do_pr:
                for i in range(n):
                    x = np.float64(w[i])
                    j0 = _nearest(x, mids, L, p)
                    j1, b1 = _window(x, np.float64(h[i]), cp, pp, j0)
                    a[i] = j1
                    a2[i] = j0
                    bst[i] = b1
                for i in range(n):
                    x = np.float64(w[i])
                    hx = np.float64(h[i])
                    j0 = a2[i]
                    b1 = bst[i]
                    jr = min(j0 + 3, L - 1)
                    jl = max(j0 - 3, 0)
                    dr = cp[jr + 2] - x
                    dl = x - cp[jl + 2]
                    if (j0 + 3 < L and hx * dr * dr + rmin[jr] < b1) or (
                            j0 - 3 >= 0 and hx * dl * dl + lmin[jl] < b1):
                        a[i] = _beyond(x, hx, cp, pp, rmin, lmin, L, j0, a[i], b1)
            else:
                for i in range(n):
                    x = np.float64(w[i])
                    j0 = _nearest(x, mids, L, p)
                    j1, j2, b1, b2 = _window2(x, np.float64(h[i]), cp, pp, j0, L)
                    a[i] = j1
                    a2[i] = j2
                    a3[i] = j0
                    bst[i] = b1
                    bst2[i] = b2
                for i in range(n):
                    x = np.float64(w[i])
                    hx = np.float64(h[i])
                    j0 = a3[i]
                    j1 = a[i]
                    j2 = a2[i]
                    b1 = bst[i]
                    b2 = bst2[i]
                    jr = min(j0 + 3, L - 1)
                    jl = max(j0 - 3, 0)
                    dr = cp[jr + 2] - x
                    dl = x - cp[jl + 2]
                    if (j0 + 3 < L and hx * dr * dr + rmin[jr] < b2) or (
                            j0 - 3 >= 0 and hx * dl * dl + lmin[jl] < b2):
                        j1, j2, b1, b2 = _beyond2(x, hx, cp, pp, rmin, lmin, L, j0, j1, j2,
                                                  b1, b2)
                        a[i] = j1
                        a2[i] = j2
                    gain[j1] += (b2 - b1) * (M[r, i] if use_m else 1.0)
                    mark[j1, j2 >> 6] |= one << np.uint64(j2 & 63)
            for i in range(n):
                j = a[i]
                x = np.float64(w[i])
                mi = M[r, i] if use_m else 1.0
                hx = np.float64(h[i]) * mi
                d = x - c[j]
                hd = hx * d
                acc[j, 0] += mi
                acc[j, 1] += hx
                acc[j, 2] += hd
                acc[j, 3] += hd * d
                acc[j, 4] += mi * d
            if do_pr:
                # Removing level j moves its members to their second best: J changes by
                # gain_j − λ·lb (p unchanged for the others; renewing p afterwards only lowers
                # J). Removals are additive when no removed level's members go to another
                # removed level, which the blocking below guarantees.
                thr = lam * lb
                nrem = 0
                for j in range(L):
                    blocked[j] = False
                    removed[j] = False
                cand = np.argsort(gain[:L], kind="mergesort")
                for q in range(L):
                    j = cand[q]
                    if gain[j] >= thr:
                        break
                    if acc[j, 0] == 0.0 or blocked[j]:
                        continue
                    removed[j] = True
                    blocked[j] = True
                    nrem += 1
                    jb = np.uint64(j & 63)
                    for i2 in range(L):
                        if (mark[j, i2 >> 6] >> np.uint64(i2 & 63)) & one:
                            blocked[i2] = True
                        if (mark[i2, j >> 6] >> jb) & one:
                            blocked[i2] = True
                if nrem > 0:
                    for j in range(L):
                        for q in range(5):
                            acc[j, q] = 0.0
                    for i in range(n):
                        j = a[i]
                        if removed[j]:
                            j = a2[i]
                            a[i] = j
                        x = np.float64(w[i])
                        mi = M[r, i] if use_m else 1.0
                        hx = np.float64(h[i]) * mi
                        d = x - c[j]
                        hd = hx * d
                        acc[j, 0] += mi
                        acc[j, 1] += hx
                        acc[j, 2] += hd
                        acc[j, 3] += hd * d
                        acc[j, 4] += mi * d
            # Update: weighted means rounded to float32 (the nearest float32 to the mean is no
            # further from it than the old float32 centre, so D cannot grow); a level whose
            # members all have h = 0 takes their plain mean (its D is 0 either way).
            Ln = 0
            D = 0.0
            S = 0.0
            for j in range(L):
                cj = acc[j, 0]
                if cj == 0.0:
                    lab[j] = -1
                    continue
                if acc[j, 1] > 0.0:
                    dm = acc[j, 2] / acc[j, 1]
                else:
                    dm = acc[j, 4] / cj
                cn = np.float64(np.float32(c[j] + dm))
                dd = cn - c[j]
                D += acc[j, 3] - 2.0 * dd * acc[j, 2] + dd * dd * acc[j, 1]
                S += cj * np.log2(cj)
                nc[Ln] = cn
                ncnt[Ln] = np.int64(cj)
                lab[j] = Ln
                Ln += 1
            perm = np.argsort(nc[:Ln], kind="mergesort")
            for q in range(Ln):
                inv[perm[q]] = q
                c[q] = nc[perm[q]]
                cnt[q] = ncnt[perm[q]]
            for j in range(L):
                if lab[j] >= 0:
                    lab[j] = inv[lab[j]]
            L = Ln
            for j in range(L):
                pen[j] = lam * (log2n - np.log2(np.float64(cnt[j])))
            J = D + lam * (nlog - S) + lam * lb * L
            if use_hist:
                hist[r, t] = J
            done = t >= iters or (t > 0 and Jp - J <= tol * abs(Jp))
            Jp = J
            if done:
                break
            t += 1
        if use_hist:
            for q in range(t + 1, iters + 1):
                hist[r, q] = J
        # The last assignment's labels number the levels before the final update: relabel.
        for i in range(n):
            out_idx[r, i] = lab[a[i]]
        for q in range(K):
            qq = min(q, L - 1)
            out_c[r, q] = c[qq]
            out_cnt[r, q] = cnt[q] if q < L else 0
        out_L[r] = L
        out_H[r] = max(nlog - S, 0.0) / nf
        out_J[r] = J
        out_it[r] = t


@njit(cache=True, nogil=True)
def bin_rows_kernel(W, H, B, spread, out_x, out_h, out_m):
    """Each row of W [R, n] (weights H [R, n] ≥ 0) summarised by B bins of equal width over
    the row's mean ± spread·std (its [min, max] if narrower), the weights outside that range
    kept one by one (up to E = out_x.shape[1] − B of them, else the bins span [min, max]).
    Outputs [R, B + E] float64, the non-empty bins first (ascending), then the outliers:
    out_x the h-weighted mean of a bin's members (their plain mean where every h is 0; an
    outlier's value), out_h their mean h, out_m their count; unused slots count 0 (h = 0).

    For a bin b assigned to a level c, Σ_b h_i (w_i − c)² = m_b·h̄_b·(x_b − c)² + (a term
    without c): ecsq_kernel with M = out_m solves the row's problem with each bin's members
    kept together.
    """
    R, n = W.shape
    E = out_x.shape[1] - B
    cnt = np.zeros(B)
    sh = np.zeros(B)
    shw = np.zeros(B)
    sw = np.zeros(B)
    for r in range(R):
        lo = np.inf
        hi = -np.inf
        s1 = 0.0
        s2 = 0.0
        for i in range(n):
            x = np.float64(W[r, i])
            lo = min(lo, x)
            hi = max(hi, x)
            s1 += x
            s2 += x * x
        mu = s1 / max(n, 1)
        sd = math.sqrt(max(s2 / max(n, 1) - mu * mu, 0.0))
        a = max(lo, mu - spread * sd)
        z = min(hi, mu + spread * sd)
        out = 0
        for i in range(n):
            x = np.float64(W[r, i])
            out += (x < a) | (x > z)
        if out > E or not z > a:
            a = lo
            z = hi
        for b in range(B):
            cnt[b] = 0.0
            sh[b] = 0.0
            shw[b] = 0.0
            sw[b] = 0.0
        scale = B / (z - a) if z > a else 0.0
        q = 0
        for i in range(n):
            x = np.float64(W[r, i])
            hx = np.float64(H[r, i])
            if x < a or x > z:
                out_x[r, B + q] = x
                out_h[r, B + q] = hx
                q += 1
                continue
            b = min(np.int64((x - a) * scale), B - 1)
            cnt[b] += 1.0
            sh[b] += hx
            shw[b] += hx * x
            sw[b] += x
        k = 0
        for b in range(B):
            if cnt[b] > 0.0:
                out_m[r, k] = cnt[b]
                out_h[r, k] = sh[b] / cnt[b]
                out_x[r, k] = shw[b] / sh[b] if sh[b] > 0.0 else sw[b] / cnt[b]
                k += 1
        for i in range(q):
            out_x[r, k] = out_x[r, B + i]
            out_h[r, k] = out_h[r, B + i]
            out_m[r, k] = 1.0
            k += 1
        for i in range(k, B + E):
            out_x[r, i] = a
            out_h[r, i] = 0.0
            out_m[r, i] = 0.0


@njit(cache=True, nogil=True, inline="always")
def _bin_of(x, inv):
    return np.floor(x * inv + 0.5)


@njit(cache=True, nogil=True)
def _ecuq_eval(xs, hs, n, d, nlog, lam, lb):
    """(J, L) of the 0-centred uniform quantizer with step d on sorted xs [n] with hs [n]."""
    inv = 1.0 / d
    mp = _bin_of(xs[0], inv)
    cnt = 0
    sh = 0.0
    sx = 0.0
    sxx = 0.0
    D = 0.0
    S = 0.0
    L = 0
    for q in range(n):
        m = _bin_of(xs[q], inv)
        if m != mp:
            L += 1
            S += cnt * np.log2(np.float64(cnt))
            if sh > 0.0:
                D += sxx - sx * sx / sh
            cnt = 0
            sh = 0.0
            sx = 0.0
            sxx = 0.0
            mp = m
        x = xs[q] - m * d
        hx = hs[q] * x
        cnt += 1
        sh += hs[q]
        sx += hx
        sxx += hx * x
    L += 1
    S += cnt * np.log2(np.float64(cnt))
    if sh > 0.0:
        D += sxx - sx * sx / sh
    return max(D, 0.0) + lam * (nlog - S) + lam * lb * L, L


@njit(cache=True, nogil=True)
def ecuq_kernel(W, H, lam, lb, fixed, rel, kmax, out_c, out_idx, out_L, out_cnt, out_H,
                 out_step):
    """Entropy-coded uniform quantization of every row of W [R, n] with weights H [R, n].

    fixed float64 [R]: a step per row (> 0; inf = one level), or NaN to search: the step
    minimising J = D + λ (n H + lb L) among σ_r·rel[s] (σ_r the row's weighted std) and one
    level, with at most kmax levels (ties keep the coarser step). Outputs as ecsq_kernel
    (no Lagrangian), and out_step [R] the chosen step (inf for one level). out_L[r] = -1 flags
    a fixed step that needs more than kmax levels.
    """
    R, n = W.shape
    K = out_c.shape[1]
    xs = np.empty(n)
    hs = np.empty(n)
    nf = float(n)
    nlog = nf * np.log2(nf) if n > 0 else 0.0
    for r in range(R):
        w = W[r]
        order = np.argsort(w, kind="mergesort")
        sh = 0.0
        shx = 0.0
        sx = 0.0
        for q in range(n):
            i = order[q]
            xs[q] = w[i]
            hs[q] = H[r, i]
            sh += hs[q]
            shx += hs[q] * xs[q]
            sx += xs[q]
        mu = shx / sh if sh > 0.0 else sx / nf
        var = 0.0
        for q in range(n):
            e = xs[q] - mu
            var += (hs[q] if sh > 0.0 else 1.0) * e * e
        D1 = 0.0
        for q in range(n):
            e = xs[q] - mu
            D1 += hs[q] * e * e
        sig = math.sqrt(var / (sh if sh > 0.0 else nf))
        best = np.inf
        f = fixed[r]
        if not np.isnan(f):
            best = f
        else:
            bJ = D1 + lam * lb
            if sig > 0.0:
                for s in range(rel.shape[0] - 1, -1, -1):
                    d = sig * rel[s]
                    J, L = _ecuq_eval(xs, hs, n, d, nlog, lam, lb)
                    if L <= kmax and J < bJ:
                        bJ = J
                        best = d
        out_step[r] = best
        # Final pass with the chosen step: levels, indices, counts, entropy.
        L = 0
        S = 0.0
        if best == np.inf or n == 0:
            c0 = np.float64(np.float32(mu))
            for q in range(n):
                out_idx[r, q] = 0
            L = 1
            out_cnt[r, 0] = n
            out_c[r, 0] = c0
            S = nlog
        else:
            inv = 1.0 / best
            q0 = 0
            while q0 < n:
                m = _bin_of(xs[q0], inv)
                q1 = q0
                bsh = 0.0
                bx = 0.0
                ux = 0.0
                while q1 < n and _bin_of(xs[q1], inv) == m:
                    e = xs[q1] - m * best
                    bsh += hs[q1]
                    bx += hs[q1] * e
                    ux += e
                    q1 += 1
                if L >= K:
                    L = -1
                    break
                cnt = q1 - q0
                dm = bx / bsh if bsh > 0.0 else ux / cnt
                out_c[r, L] = np.float64(np.float32(m * best + dm))
                out_cnt[r, L] = cnt
                S += cnt * np.log2(np.float64(cnt))
                for q in range(q0, q1):
                    out_idx[r, order[q]] = L
                L += 1
                q0 = q1
        out_L[r] = L
        if L < 0:
            continue
        for q in range(L, K):
            out_c[r, q] = out_c[r, L - 1]
            out_cnt[r, q] = 0
        out_H[r] = max(nlog - S, 0.0) / nf if n > 0 else 0.0


@njit(cache=True, nogil=True)
def sse_kernel(W, H, C, idx, out):
    """out[r] = Σ_i H[r, i] (W[r, i] − C[r, idx[r, i]])² in float64."""
    R, n = W.shape
    for r in range(R):
        s = 0.0
        for i in range(n):
            d = np.float64(W[r, i]) - np.float64(C[r, idx[r, i]])
            s += np.float64(H[r, i]) * d * d
        out[r] = s


@njit(cache=True, nogil=True)
def entropy_kernel(counts, n, out):
    """out[r] = entropy (bits/weight) of counts [R, K] over n weights per row; row-local."""
    R, K = counts.shape
    nf = float(n)
    nlog = nf * np.log2(nf) if n > 0 else 0.0
    for r in range(R):
        S = 0.0
        for j in range(K):
            cj = counts[r, j]
            if cj > 0:
                S += cj * np.log2(np.float64(cj))
        out[r] = max(nlog - S, 0.0) / nf if n > 0 else 0.0


